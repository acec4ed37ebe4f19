"""Cost of the sample corpus's 3D head warp against the flat-plane homography it replaced.

Usage: .venv/bin/python benchmarks/sample_render.py [--params params.yaml] [--frames 60] [--repeats 3]

For each portrait, renders the same motion track (the first clip's, from params) with
  baseline: the expression warp + a homography of the portrait plane rotated about a point behind it
            (the renderer before the 3D warp: no parallax), and
  3d:       FaceRig.render (per-pixel depth, rotation about the pivot, fixed-point inverse map),
interleaved over `--repeats` rounds on one thread, and prints ms per frame and the ratio. Both are
measured in the same run, so a loaded machine slows both alike.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from preprocessing.sample.animate import FaceRig, MotionTrack, motion_track
from preprocessing.sample.portraits import prepare_portrait
from vasa.core.config import load_params


def homography(size: int, centre: np.ndarray, depth: float, track: MotionTrack, index: int) -> np.ndarray:
    """The replaced renderer's head motion: the image plane rotated about a point `depth` behind it."""
    focal, principal = 3.0 * size, np.array([size / 2, size / 2])
    yaw, pitch, roll = np.radians([track.yaw[index], track.pitch[index], track.roll[index]])
    rot_y = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    rot_z = np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    plane = np.column_stack([corners - principal, np.full(4, focal)])
    pivot = np.array([*(centre - principal), focal + depth])
    moved = (plane - pivot) @ (rot_z @ rot_x @ rot_y).T + pivot
    projected = focal * moved[:, :2] / moved[:, 2:3] + principal
    shift = np.array([track.shift_x[index], track.shift_y[index]]) * size
    projected = (projected - centre) * track.scale[index] + centre + shift
    return cv2.getPerspectiveTransform(corners.astype(np.float32), projected.astype(np.float32))


def render_baseline(rig: FaceRig, track: MotionTrack, index: int) -> np.ndarray:
    drop = float(track.mouth[index]) * rig.max_drop
    shift = drop * rig.jaw
    for field, travel in rig.lids:
        shift = shift + float(track.blink[index]) * travel * field
    face = cv2.remap(
        rig.portrait.image, rig.grid_x, rig.grid_y - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    if drop > 0.5:
        face = rig._paint_mouth(face, drop)
    size = face.shape[0]
    matrix = homography(size, rig.head_centre, 0.5 * rig.face_height, track, index)
    return cv2.warpPerspective(face, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    cfg = load_params(args.params).sample
    envelope = np.abs(np.sin(np.linspace(0, 12, args.frames)))
    track = motion_track(envelope, cfg.fps, cfg.motion, cfg.blinks_per_minute, np.random.default_rng(cfg.seed))
    for identity in cfg.identities:
        start = time.perf_counter()
        rig = FaceRig(prepare_portrait(identity.portrait, cfg.size), cfg.mouth_max_open)
        setup_s = time.perf_counter() - start
        timings: dict[str, list[float]] = {"baseline": [], "3d": []}
        for _ in range(args.repeats):
            for name, render in (("baseline", render_baseline), ("3d", FaceRig.render)):
                start = time.perf_counter()
                for index in range(args.frames):
                    render(rig, track, index)
                timings[name].append((time.perf_counter() - start) / args.frames * 1000)
        base, new = min(timings["baseline"]), min(timings["3d"])
        print(
            f"{identity.portrait}: {cfg.size}², rig setup {setup_s:.2f} s; ms/frame (best of {args.repeats}): "
            f"baseline {base:.1f}, 3d {new:.1f}, ratio {new / base:.2f}"
        )


if __name__ == "__main__":
    main()
