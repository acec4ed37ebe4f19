"""Preprocessing throughput per process: end-to-end vs decode-only vs decode+FaceMesh, same run.

    python benchmarks/preprocess_throughput.py --videos ../shared/fixtures [--repeat 2] [--cores 64]

Prints frames/s for each level on every video and overall, the ratio end-to-end / (decode +
FaceMesh) (target >= 0.6: everything after face tracking should cost little next to it), and a
projection for VoxCeleb2 (about 220 M frames) on N cores. One process, one thread of work: the
per-process figure that scales with worker processes.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from preprocessing import face
from preprocessing.decode import load_clip
from preprocessing.ingest.manifest import clip_key
from preprocessing.process import process_clip
from vasa.config import load_params

VOXCELEB2_FRAMES = 220e6


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, required=True, help="folder of talking-head videos (*.mp4)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeat", type=int, default=2, help="runs per level; the fastest counts")
    parser.add_argument("--cores", type=int, default=64, help="cores for the VoxCeleb2 projection")
    parser.add_argument("--crop-size", type=int, help="override preprocess.crop_size (e.g. 512)")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).preprocess
    if args.crop_size:
        cfg = cfg.replace(crop_size=args.crop_size)
    tracker = face.get_tracker(cfg.face)
    videos = sorted(args.videos.glob("*.mp4"))
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"crop {cfg.crop_size}px, runner: one process"
    )
    print(f"{'video':44s} {'frames':>6s} {'decode':>8s} {'+mesh':>8s} {'e2e':>8s} {'e2e/mesh':>8s}  (frames/s)")
    totals = {"decode": 0.0, "mesh": 0.0, "e2e": 0.0}
    total_frames = 0
    for path in videos:
        clip = load_clip(path, fps=cfg.fps, sample_rate=cfg.sample_rate)
        n = len(clip.frames)
        row = {"clip_id": f"bench:{path.name}", "key": clip_key(path.name), "media_path": str(path), "av_offset": None}

        def decode_only(path=path):
            return load_clip(path, fps=cfg.fps, sample_rate=cfg.sample_rate)

        decode = min(_timed(decode_only) for _ in range(args.repeat))
        mesh = min(_timed(lambda: tracker.track(decode_only().frames)) for _ in range(args.repeat))  # noqa: B023
        e2e = min(_timed(lambda: process_clip(row, cfg)) for _ in range(args.repeat))  # noqa: B023
        totals["decode"] += decode
        totals["mesh"] += mesh
        totals["e2e"] += e2e
        total_frames += n
        print(f"{path.name:44s} {n:6d} {n / decode:8.0f} {n / mesh:8.0f} {n / e2e:8.0f} {mesh / e2e:8.2f}")
    fps = {level: total_frames / seconds for level, seconds in totals.items()}
    ratio = totals["mesh"] / totals["e2e"]
    print(f"{'all':44s} {total_frames:6d} {fps['decode']:8.0f} {fps['mesh']:8.0f} {fps['e2e']:8.0f} {ratio:8.2f}")
    hours = VOXCELEB2_FRAMES / fps["e2e"] / 3600
    print(f"end-to-end / (decode + FaceMesh) = {ratio:.2f} (target >= 0.6)")
    print(
        f"VoxCeleb2 projection: {VOXCELEB2_FRAMES / 1e6:.0f} M frames / {fps['e2e']:.0f} frames/s per process "
        f"= {hours:,.0f} core-hours; on {args.cores} cores {hours / args.cores:,.1f} h"
    )


if __name__ == "__main__":
    main()
