"""Do the score stage's filters (vasa/stages/score.py) tell tampered copies from their originals?

    python benchmarks/score_separation.py --shards data/shards --judges data/judges [--fixtures ../shared/fixtures]
        [--work /tmp/score_separation] [--json out.json]

1. Sample corpus (or any shards): every sample gets copies in the same shard, as a shard holding such a clip
   would (only what training reads changes: mel.npy for audio, the crop mp4 for video):
     s3, s10, s20   the audio delayed by 3, 10, 20 frames (the first frames repeat the first audio frame)
     swap           the audio of another clip (the next in key order; tiled or cut to the length)
     crf45, crf51   the crop re-encoded by libx264 at CRF 45 / 51 (very low bitrate; kbit/s reported)
     blur1p5, blur2p5  the crop blurred (Gaussian sigma 1.5, 2.5 crop pixels), encoded at preprocess.crop_crf
   then `score.run` with the given judges and params: per copy kind S_C, offset, iq_score, status and reason.
2. Fixtures (real talking heads, when present): the first 100 frames through FaceMesh and the box crop at
   preprocess.crop_size as the shards hold them, the same video degradations, image quality only (the tiny
   sync expert does not judge real speech: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from preprocessing import schema  # noqa: E402
from preprocessing.media import VideoWriter  # noqa: E402
from preprocessing.shards import Sample, write_shard  # noqa: E402
from vasa.core.config import Params, load_params  # noqa: E402
from vasa.evaluation.image_quality import image_quality  # noqa: E402
from vasa.loaders.shards import decode_frames, read_index, read_samples, video_side  # noqa: E402

AUDIO_KINDS = ("s3", "s10", "s20", "swap")
VIDEO_KINDS = ("crf45", "crf51", "blur1p5", "blur2p5")
SHIFTS = {"s3": 3, "s10": 10, "s20": 20}
CRF = {"crf45": 45, "crf51": 51}
SIGMA = {"blur1p5": 1.5, "blur2p5": 2.5}


def encode(frames: np.ndarray, crf: int, preset: str) -> bytes:
    """(T, S, S, 3) uint8 -> H.264 mp4 bytes at 25 fps (as preprocess writes crops)."""
    buffer = io.BytesIO()
    with VideoWriter(buffer, frames.shape[2], frames.shape[1], 25, crf=crf, preset=preset) as writer:
        for frame in frames:
            writer.write(frame)
    return buffer.getvalue()


def delayed(mel: np.ndarray, frames: int, per_frame: int) -> np.ndarray:
    """Log-mel rows (T * k, n_mels) delayed by `frames` video frames: the first rows repeat the first row."""
    rows = frames * per_frame
    return np.concatenate([np.repeat(mel[:1], rows, axis=0), mel[:-rows]]) if rows else mel


def fitted(mel: np.ndarray, rows: int) -> np.ndarray:
    """Another clip's log-mel tiled or cut to `rows` rows."""
    return np.resize(mel, (rows, mel.shape[1])).astype(mel.dtype)


def degraded_mp4(frames: np.ndarray, kind: str, crop_crf: int, preset: str) -> bytes:
    """(T, S, S, 3) uint8 crops as an mp4 degraded as `kind` (VIDEO_KINDS): re-encoded at a very high CRF, or
    blurred and encoded at the shards' crop_crf."""
    if kind in CRF:
        return encode(frames, CRF[kind], preset)
    return encode(np.stack([cv2.GaussianBlur(f, (0, 0), SIGMA[kind]) for f in frames]), crop_crf, preset)


def degrade(frames: np.ndarray, kind: str, crop_crf: int, preset: str) -> np.ndarray:
    """`degraded_mp4` decoded back, as training would read it."""
    return decode_frames(degraded_mp4(frames, kind, crop_crf, preset), frames.shape[1])


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def copies(sample: dict[str, bytes], other: dict[str, bytes], kinds: tuple[str, ...], params: Params) -> list[Sample]:
    """The tampered copies of one shard sample (keys `<key>-<kind>`)."""
    pre = params.preprocess
    mel = np.load(io.BytesIO(sample[schema.MEL]), allow_pickle=False)
    pose = np.load(io.BytesIO(sample[schema.POSE]), allow_pickle=False)
    per_frame = max(1, round(len(mel) / max(len(pose), 1)))
    members = {k: v for k, v in sample.items() if k != "__key__"}
    out = []
    for kind in kinds:
        changed = dict(members)
        if kind in SHIFTS:
            changed[schema.MEL] = _npy(delayed(mel, SHIFTS[kind], per_frame))
        elif kind == "swap":
            changed[schema.MEL] = _npy(fitted(np.load(io.BytesIO(other[schema.MEL]), allow_pickle=False), len(mel)))
        else:
            frames = decode_frames(sample[schema.MP4], video_side(sample[schema.MP4]))
            changed[schema.MP4] = degraded_mp4(frames, kind, pre.crop_crf, pre.crop_preset)
        out.append(Sample(f"{sample['__key__']}-{kind}", changed, frames=len(pose), seconds=len(pose) / pre.fps))
    return out


def tampered_shards(src: Path, dst: Path, kinds: tuple[str, ...], params: Params) -> dict[str, tuple[str, str]]:
    """A copy of the shards folder `src` in `dst` whose every shard also holds `kinds` copies of its samples.
    Returns copy key -> (original key, kind); originals map to (key, "original")."""
    index = read_index(src / schema.INDEX_FILE)
    samples = {
        entry["shard"]: list(read_samples(src / entry["shard"]))
        for block in index["splits"].values()
        for entry in block.get("shards", [])
    }
    everyone = sorted((s for group in samples.values() for s in group), key=lambda s: s["__key__"])
    nxt = {s["__key__"]: everyone[(i + 1) % len(everyone)] for i, s in enumerate(everyone)}
    dst.mkdir(parents=True, exist_ok=True)
    origin: dict[str, tuple[str, str]] = {}
    for block in index["splits"].values():
        for entry in block.get("shards", []):
            written = []
            for sample in samples[entry["shard"]]:
                members = {k: v for k, v in sample.items() if k != "__key__"}
                original = Sample(sample["__key__"], members, frames=0, seconds=0.0)
                made = copies(sample, nxt[sample["__key__"]], kinds, params)
                written += [original, *made]
                origin[sample["__key__"]] = (sample["__key__"], "original")
                origin.update({c.key: (sample["__key__"], c.key.rsplit("-", 1)[1]) for c in made})
            write_shard(dst / entry["shard"], sorted(written, key=lambda s: s.key))
            entry["samples"] = len(written)
    (dst / schema.INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))
    return origin


def by_kind(rows: list[dict], origin: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """Per copy kind: the ranges of S_C, offsets, iq_score, and the statuses/reasons."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[origin[row["key"]][1]].append(row)
    out = {}
    for kind, found in groups.items():
        out[kind] = {
            "clips": len(found),
            "S_C": _range([r["sync_confidence"] for r in found]),
            "offsets": sorted({r["sync_offset"] for r in found}),
            **{c: _range([r[c] for r in found]) for c in ("iq_score", "blur", "frozen")},
            "status": dict(sorted(_count(f"{r['status']}:{r['reason'] or ''}" for r in found).items())),
        }
    return out


def _range(values: list[float]) -> list[float]:
    return [round(min(values), 3), round(max(values), 3)]


def _count(values) -> dict[str, int]:
    found: dict[str, int] = defaultdict(int)
    for value in values:
        found[value] += 1
    return found


def fixture_quality(fixtures: Path, params: Params, frames_used: int = 100) -> dict[str, dict[str, list[float]]]:
    """[iq_score, blur index, frozen blocks] of each real fixture's crop (as the shards hold it) and of its
    degraded copies."""
    from preprocessing import face as face_mod
    from preprocessing.decode import read_frames

    pre = params.preprocess
    tracker = face_mod.get_tracker(pre.face)
    out = {}
    for path in sorted(fixtures.glob("*.mp4")):
        frames, _ = read_frames(path)
        frames = frames[:frames_used]
        landmarks = face_mod.fill_gaps(tracker.track(frames).landmarks)
        crops, in_crop = fixture_crop(frames, landmarks, params)
        found = {"original": image_quality(crops, in_crop, params.score.quality.blur_frames)}
        for kind in VIDEO_KINDS:
            degraded = degrade(crops, kind, pre.crop_crf, pre.crop_preset)
            found[kind] = image_quality(degraded, in_crop, params.score.quality.blur_frames)
        out[path.stem] = {k: [round(q.score, 1), round(q.blur, 3), round(q.frozen, 3)] for k, q in found.items()}
    return out


def fixture_crop(frames: np.ndarray, landmarks: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The box crop at preprocess.crop_size as preprocess writes it (encoded at crop_crf, decoded back) and the
    landmarks in its pixels."""
    from preprocessing import face as face_mod

    pre = params.preprocess
    transform = face_mod.box_transform(landmarks, pre.crop_size, pre.face.crop_scale, frames.shape[1:3])
    transforms = np.repeat(transform[None], len(frames), 0)
    crops = face_mod.apply_crops(frames, transforms, pre.crop_size)
    crops = decode_frames(encode(crops, pre.crop_crf, pre.crop_preset), pre.crop_size)
    return crops, face_mod.transform_points(landmarks, transforms)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--judges", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--fixtures", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/score_separation"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from vasa.stages.score import run

    params = load_params(args.params)
    shutil.rmtree(args.work, ignore_errors=True)
    origin = tampered_shards(args.shards, args.work / "shards", AUDIO_KINDS + VIDEO_KINDS, params)
    scores = args.work / "scores"
    metrics = run(params.score, params.evaluate, args.work / "shards", args.judges, scores, progress=False)

    rows = pq.read_table(scores / "scores.parquet").to_pylist()
    report = {"judge": metrics["judge"], "shards": by_kind(rows, origin)}
    if args.fixtures is not None and args.fixtures.is_dir():
        report["fixtures_iq_score"] = fixture_quality(args.fixtures, params)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
