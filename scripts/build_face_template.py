"""Build preprocessing/assets/face_template.npz, the canonical 3D face that head poses are fitted to.

    python -m scripts.build_face_template --fixtures ../shared/fixtures \
        --out preprocessing/assets/face_template.npz

Steps (the head frame is described in preprocessing/pose.py):
1. FaceMesh (tracking mode, params.yaml's preprocess.face confidences) on every frame of the
   fixture videos in SOURCES; every STEP-th frame with one face is kept: (x, y, z) in pixels.
2. Generalized Procrustes analysis: each shape is aligned to the running mean by a similarity fit
   on pose.RIGID_LANDMARKS (so speech and blinks do not tilt the alignment), all 478 points are
   averaged, the mean is renormalised, until the mean moves less than TOLERANCE.
3. Left/right pairing: in a provisional head frame the mean is mirrored (x -> -x) and matched to
   itself by a minimum-cost one-to-one assignment of nearest neighbours (Hungarian algorithm on
   the distances; plain nearest neighbours can pick one partner twice). The map must be an
   involution (partner of partner is self); points matched to themselves are the midline.
4. Symmetrization: the mirrored, re-indexed mean is rigidly aligned back onto the mean and the two
   are averaged, which is symmetric about the face's own midplane even if the provisional frame
   was slightly off. Then the final frame is fixed: origin at the centroid, x from 33 to 263, y
   from forehead 10 toward chin 152 made orthogonal to x, z = x cross y (away from the camera),
   unit = |263 - 33|. A last exact average with the mirror puts midline points at x = 0.

The output is deterministic: the inputs are fixed, numbers are rounded to 1e-6 before float32,
and the npz is written with fixed zip timestamps. Nothing about when or where it ran is stored.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from preprocessing.decode import read_frames
from preprocessing.face import (
    CHIN,
    FOREHEAD,
    LEFT_EYE_OUTER,
    RIGHT_EYE_OUTER,
    apply_crops,
    crop_transforms,
    get_tracker,
)
from preprocessing.pose import RIGID_LANDMARKS, Template, draw_pose_axes, head_pose, umeyama
from vasa.core.config import FaceConfig, load_params

SOURCES = (
    "vid01_sadtalker_WDA_KatieHill_000.mp4",
    "vid02_sadtalker_WDA_AlexandriaOcasioCortez_000.mp4",
    "vid03_retalking_face1.mp4",
    "vid04_retalking_face2.mp4",
    "vid05_retalking_face5.mp4",
    "vid06_liveportrait_d20.mp4",
    "vox2_517600055.mp4",
    "vox2_620900105.mp4",
    "vox2_681100216.mp4",
    "vox2_731200067.mp4",
    "vox2_796100172.mp4",
)
STEP = 2  # keep every 2nd frame: neighbours are nearly identical, 25 fps is more than needed
TOLERANCE = 1e-9  # GPA stops when no mean point moves more than this (rigid-subset RMS = 1)
MAX_ITERATIONS = 100
MIRROR = np.array([-1.0, 1.0, 1.0])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect_shapes(fixtures: Path, cfg: FaceConfig) -> tuple[np.ndarray, list[dict]]:
    """(N, 478, 3) pixel landmarks of every STEP-th single-face frame, and per-source records."""
    tracker = get_tracker(cfg)
    shapes, sources = [], []
    for name in SOURCES:
        path = fixtures / name
        frames, _ = read_frames(path)
        track = tracker.track(frames)
        keep = np.flatnonzero(track.faces == 1)[::STEP]
        shapes.append(track.landmarks[keep].astype(np.float64))
        sources.append({"file": name, "sha256": sha256(path), "frames": int(len(keep))})
    return np.concatenate(shapes), sources


def _normalise(shapes: np.ndarray, fit: list[int]) -> np.ndarray:
    """Centre on the fit points' centroid and scale their RMS distance from it to 1."""
    centred = shapes - shapes[..., fit, :].mean(axis=-2, keepdims=True)
    size = np.sqrt(np.mean(np.sum(centred[..., fit, :] ** 2, axis=-1), axis=-1))
    return centred / size[..., None, None]


def generalized_procrustes(shapes: np.ndarray, fit: list[int]) -> tuple[np.ndarray, int]:
    """Mean shape (478, 3) of (N, 478, 3) shapes under similarity alignment on `fit`, and iterations.

    Starts from the first shape; each round aligns every shape to the current mean and averages.
    Renormalising the mean each round fixes the gauge (otherwise it shrinks toward zero).
    """
    shapes = _normalise(shapes, fit)
    mean = shapes[0]
    for iteration in range(1, MAX_ITERATIONS + 1):
        scale, rotation, translation = umeyama(shapes[:, fit], np.broadcast_to(mean[fit], shapes[:, fit].shape))
        aligned = scale[:, None, None] * np.einsum("kij,knj->kni", rotation, shapes) + translation[:, None, :]
        new_mean = _normalise(aligned.mean(axis=0), fit)
        # Keep the mean's orientation where it was, so the loop converges instead of drifting.
        _, spin, shift = umeyama(new_mean[fit], mean[fit], with_scale=False)
        new_mean = new_mean @ spin.T + shift
        change = np.abs(new_mean - mean).max()
        mean = new_mean
        if change < TOLERANCE:
            return mean, iteration
    raise RuntimeError(f"GPA did not converge in {MAX_ITERATIONS} iterations (last change {change:.2e})")


def to_canonical_frame(points: np.ndarray) -> np.ndarray:
    """Rotate/translate/scale (478, 3) points into the head frame described in the module docstring."""
    centred = points - points.mean(axis=0)
    x = centred[LEFT_EYE_OUTER] - centred[RIGHT_EYE_OUTER]
    x /= np.linalg.norm(x)
    down = centred[CHIN] - centred[FOREHEAD]
    y = down - (down @ x) * x
    y /= np.linalg.norm(y)
    z = np.cross(x, y)  # x right, y down -> z away from the camera (right-handed)
    basis = np.stack([x, y, z])  # rows: head axes in the input frame
    return centred @ basis.T / np.linalg.norm(points[LEFT_EYE_OUTER] - points[RIGHT_EYE_OUTER])


def mirror_pairs(points: np.ndarray) -> np.ndarray:
    """(478,) mirror partner of each point of a roughly symmetric shape in the head frame."""
    mirrored = points * MIRROR
    cost = np.linalg.norm(mirrored[:, None, :] - points[None, :, :], axis=-1)  # (478, 478)
    rows, pairs = linear_sum_assignment(cost)
    if not np.array_equal(pairs[pairs], rows):
        raise RuntimeError("mirror matching is not an involution: the mean shape is too asymmetric")
    return pairs


def symmetrize(points: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Average a shape with its own mirror image aligned onto it, then fix the head frame."""
    mirror = points[pairs] * MIRROR
    _, rotation, translation = umeyama(mirror, points, with_scale=False)
    symmetric = to_canonical_frame((points + mirror @ rotation.T + translation) / 2)
    return (symmetric + symmetric[pairs] * MIRROR) / 2  # exact: midline points get x = 0


def build_template(fixtures: Path, cfg: FaceConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Template points (478, 3) float32, pair map (478,) int16 and build metadata."""
    shapes, sources = collect_shapes(fixtures, cfg)
    mean, iterations = generalized_procrustes(shapes, list(RIGID_LANDMARKS))
    provisional = to_canonical_frame(mean)
    pairs = mirror_pairs(provisional)
    points = symmetrize(provisional, pairs)
    meta = {
        "sources": sources,
        "frames": int(len(shapes)),
        "frame_step": STEP,
        "gpa_iterations": iterations,
        "gpa_fit_landmarks": "preprocessing.pose.RIGID_LANDMARKS",
        "midline_points": int(np.sum(pairs == np.arange(len(pairs)))),
        "min_detection_confidence": cfg.min_detection_confidence,
        "min_tracking_confidence": cfg.min_tracking_confidence,
    }
    return np.round(points, 6).astype(np.float32), pairs.astype(np.int16), meta


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez stamps each member with the current time; this writes the same bytes every time."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)


def contact_sheet(fixtures: Path, cfg: FaceConfig, template: Template, size: int = 160, columns: int = 6) -> np.ndarray:
    """(rows * size, columns * size, 3) uint8 RGB: one row per source video, aligned crops of evenly
    spaced frames with the fitted head axes drawn, for checking the template and the crops by eye."""
    tracker = get_tracker(cfg)
    rows = []
    for name in SOURCES:
        frames, _ = read_frames(fixtures / name)
        track = tracker.track(frames)
        pose = head_pose(track.landmarks, template)
        transforms = crop_transforms(track.landmarks, size, cfg)
        picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        crops = apply_crops(frames[picks], transforms[picks], size)
        tiles = []
        for crop, index in zip(crops, picks, strict=True):
            tile = draw_pose_axes(crop, pose.select(index), transforms[index], template=template)
            label = f"y{pose.yaw[index]:+.0f} p{pose.pitch[index]:+.0f} r{pose.roll[index]:+.0f}"
            cv2.putText(tile, label, (3, size - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    return np.vstack(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, required=True, help="folder with the SOURCES videos")
    parser.add_argument("--out", type=Path, required=True, help="npz to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--sheet", type=Path, help="also write a PNG contact sheet of crops with head axes")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).preprocess.face
    points, pairs, meta = build_template(args.fixtures, cfg)
    write_npz(args.out, {"points": points, "pairs": pairs, "meta": np.array(json.dumps(meta, sort_keys=True))})
    print(f"{args.out}: {meta['frames']} frames, {meta['gpa_iterations']} GPA iterations, "
          f"{meta['midline_points']} midline points")  # fmt: skip
    if args.sheet:
        template = Template(points=points.astype(np.float64), pairs=pairs.astype(np.int64), meta=meta)
        sheet = contact_sheet(args.fixtures, cfg, template)
        cv2.imwrite(str(args.sheet), np.ascontiguousarray(sheet[:, :, ::-1]))


if __name__ == "__main__":
    main()
