"""Preprocessing throughput and memory per worker: end to end vs decode vs decode+FaceMesh, same run.

    python benchmarks/preprocess_throughput.py --videos ../shared/fixtures [--repeat 2] [--cores 64]
        [--crop-sizes 128 512] [--no-large] [--match 'vox2_*'] [--workdir /tmp/preprocess_throughput]

Besides the videos in --videos, two large inputs are made once (in --workdir) from a real fixture
face: a 1080x1920 portrait phone-style clip stored as 1920x1080 with a display matrix (rotate -90),
and a 3840x2160 (4K) clip, both HEVC (libx265 from PyAV's wheel; libx264 if that encoder is missing,
which is then printed). Each video is measured in a fresh worker process, as the pipeline runs one:
decode (`open_clip` + `chunks`, with preprocess.decode's cap and chunk size), decode + FaceMesh
(tracking carried across chunks), and end to end (`process_clip`: + crop, pose, gaze, expression,
log-mel, filters, crop mp4 encode, all members serialised) at every crop size. Prints frames/s per
level, the ratio end-to-end / (decode + FaceMesh) per crop size (target >= 0.6), each worker's
peak RSS (VmHWM over the whole measurement, after one untimed warm-up clip), the samples and
failures each clip gave, and a projection for VoxCeleb2 (about 220 M frames) on N cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

VOXCELEB2_FRAMES = 220e6
LARGE_SOURCE = "vid04_retalking_face2.mp4"  # 844x844 real talking head, 5 s at 25 fps
MB = 2**20


def hevc_codec() -> str:
    """libx265 when PyAV's wheel has it (it does for PyAV 18 on manylinux), else libx264."""
    return "libx265" if "libx265" in av.codecs_available else "libx264"


def make_large_inputs(fixtures: Path, workdir: Path) -> list[Path]:
    """The two large test inputs (made once): a portrait phone clip with rotation metadata and 4K."""
    codec = hevc_codec()
    tag = "hevc" if codec == "libx265" else "h264"
    specs = [
        # (name, upright width, height, display rotation): the portrait one is coded landscape.
        (f"{tag}_1080x1920_rotated.mp4", 1080, 1920, -90),
        (f"{tag}_3840x2160.mp4", 3840, 2160, 0),
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, width, height, rotation in specs:
        path = workdir / name
        if not path.exists():
            started = time.perf_counter()
            _compose(fixtures / LARGE_SOURCE, path, width, height, rotation, codec)
            print(f"made {path} with {codec} in {time.perf_counter() - started:.0f} s")
        paths.append(path)
    return paths


def _compose(source: Path, path: Path, width: int, height: int, rotation: int, codec: str) -> None:
    """Put `source`'s face video, scaled to the canvas's shorter side, on a grey gradient canvas
    (upright width x height); store it turned so that `rotation` (PyAV: counter-clockwise degrees
    applied when shown) shows it upright again, as a phone held upright writes landscape pictures."""
    from preprocessing.decode import open_clip

    side = min(width, height)
    canvas = np.tile(np.linspace(60, 160, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
    top, left = (height - side) // 2, (width - side) // 2
    partial = path.with_name(path.name + ".partial")
    with open_clip(source, fps=25, sample_rate=16000) as reader, av.open(str(partial), "w", format="mp4") as out:
        video = out.add_stream(codec, rate=25)
        coded_w, coded_h = (height, width) if rotation % 180 else (width, height)
        video.width, video.height, video.pix_fmt = coded_w, coded_h, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "23"} | (
            {"x265-params": "log-level=error"} if "265" in codec else {}
        )
        video.thread_count = 0
        if rotation:
            video.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=16000)
        sound.layout = "mono"
        for start, frames in reader.chunks(25):
            for offset, frame in enumerate(frames):
                canvas[top : top + side, left : left + side] = cv2.resize(
                    frame, (side, side), interpolation=cv2.INTER_CUBIC
                )
                coded = np.ascontiguousarray(np.rot90(canvas, -(rotation // 90))) if rotation else canvas
                picture = av.VideoFrame.from_ndarray(coded, format="rgb24")
                picture.pts, picture.time_base = start + offset, Fraction(1, 25)
                out.mux(video.encode(picture))
        out.mux(video.encode(None))
        for start in range(0, len(reader.audio), 1024):
            chunk = av.AudioFrame.from_ndarray(reader.audio[None, start : start + 1024], format="flt", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 16000, start, Fraction(1, 16000)
            out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    partial.replace(path)


def _best(repeat: int, fn) -> float:
    """Fastest of `repeat` runs of fn(), in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _row(path: Path) -> dict:
    """A manifest-like row for `path`: every provenance column present, so any version of
    process_clip finds what it reads (the flow joins the real provenance when it writes shards)."""
    from preprocessing import schema
    from preprocessing.ingest.manifest import clip_key

    row = {column: None for column in schema.PROVENANCE_COLUMNS}
    row |= {"clip_id": f"bench:{path.name}", "key": clip_key(path.name), "media_path": str(path)}
    return row | {"speaker_id": "bench", "source_kind": "local", "licence": "bench", "split": schema.TRAIN}


def measure(path: str, params: str, crop_sizes: tuple[int, ...], repeat: int, warmup: str) -> dict:
    """In a fresh worker process: the three levels on one video, and the worker's peak RSS.

    One untimed end-to-end run on `warmup` (a small clip) first: librosa's numba functions and
    MediaPipe's graph compile on first use (~15 s in a fresh environment), which no level should pay."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ log: warnings about its own graph
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import torch

    torch.set_num_threads(1)
    from preprocessing import face
    from preprocessing.decode import bound_frame_allocations, open_clip
    from preprocessing.process import process_clip
    from vasa.core.config import load_params

    bound_frame_allocations()  # as a pipeline worker should (see decode.bound_frame_allocations)
    cfg = load_params(params).preprocess
    tracker = face.get_tracker(cfg.face)
    opened = dict(fps=cfg.fps, sample_rate=cfg.sample_rate, max_side=cfg.decode.max_side)
    with open_clip(path, **opened) as reader:
        info = {"frames": reader.n_frames, "decoded": f"{reader.width}x{reader.height}", "backend": reader.backend}
        info["source"] = "{}x{}".format(*reader.source_size)

    def decode_only() -> None:
        with open_clip(path, **opened) as reader:
            for _ in reader.chunks(cfg.decode.chunk_frames):
                pass

    def decode_mesh() -> None:
        with open_clip(path, **opened) as reader:
            tracker.reset()
            for _, frames in reader.chunks(cfg.decode.chunk_frames):
                tracker.detect(frames)

    process_clip(_row(Path(warmup)), cfg)
    info["rss_ready_mb"] = _rss_now_mb()
    info["decode_s"] = _best(repeat, decode_only)
    info["mesh_s"] = _best(repeat, decode_mesh)
    row = _row(Path(path))
    for size in crop_sizes:
        sized = cfg.replace(crop_size=size)
        outcomes: list = []
        info[f"e2e{size}_s"] = _best(repeat, lambda sized=sized, got=outcomes: got.append(process_clip(row, sized)))
        outcome = outcomes[-1]
        info[f"samples{size}"] = f"{len(outcome.samples)} ({sum(s.frames for s in outcome.samples)} fr)"
        info[f"failures{size}"] = ",".join(sorted({f["reason"] for f in outcome.failures})) or "-"
    info["peak_rss_mb"] = _peak_rss_mb()
    return info


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    freshly spawned worker would report its parent's size at the fork."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, required=True, help="folder of talking-head videos (*.mp4)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeat", type=int, default=2, help="runs per level; the fastest counts")
    parser.add_argument("--cores", type=int, default=64, help="cores for the VoxCeleb2 projection")
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[128, 512], help="crop sides to run end to end")
    parser.add_argument("--match", default="*.mp4", help="glob of the videos in --videos to use")
    parser.add_argument("--no-large", action="store_true", help="skip the HEVC 1080x1920 and 4K inputs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/preprocess_throughput"), help="large inputs")
    args = parser.parse_args(argv)
    videos = sorted(args.videos.glob(args.match))
    if not args.no_large:
        videos += make_large_inputs(args.videos, args.workdir)
    sizes = tuple(args.crop_sizes)
    warmup = min(videos, key=lambda path: path.stat().st_size)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; one worker process per video, one thread; best of {args.repeat}; "
        f"HEVC encoder: {hevc_codec()}"
    )
    e2e_cols = " ".join(f"{f'e2e {s}²':>8s}" for s in sizes)
    print(
        f"{'video':44s} {'frames':>6s} {'source':>9s} {'decoded':>9s} {'backend':>7s} {'decode':>7s} {'+mesh':>6s} "
        f"{e2e_cols} {'RSS ready':>9s} {'peak RSS':>9s}  (frames/s)"
    )
    totals = {"decode": 0.0, "mesh": 0.0} | {s: 0.0 for s in sizes}
    total_frames, peaks, outcomes = 0, [], []
    spawn = multiprocessing.get_context("spawn")  # a fresh worker per video: its own peak RSS
    for path in videos:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            r = pool.submit(measure, str(path), str(args.params), sizes, args.repeat, str(warmup)).result()
        n = r["frames"]
        totals["decode"] += r["decode_s"]
        totals["mesh"] += r["mesh_s"]
        for s in sizes:
            totals[s] += r[f"e2e{s}_s"]
        total_frames += n
        peaks.append(r["peak_rss_mb"])
        e2e = " ".join(f"{n / r[f'e2e{s}_s']:8.0f}" for s in sizes)
        print(
            f"{path.name:44s} {n:6d} {r['source']:>9s} {r['decoded']:>9s} {r['backend']:>7s} "
            f"{n / r['decode_s']:7.0f} {n / r['mesh_s']:6.0f} {e2e} "
            f"{r['rss_ready_mb']:6.0f} MB {r['peak_rss_mb']:6.0f} MB"
        )
        outcomes.append(
            f"  {path.name}: "
            + "; ".join(f"{s}²: samples {r[f'samples{s}']}, failures {r[f'failures{s}']}" for s in sizes)
        )
    e2e = " ".join(f"{total_frames / totals[s]:8.0f}" for s in sizes)
    print(
        f"{'all':44s} {total_frames:6d} {'':>9s} {'':>9s} {'':>7s} {total_frames / totals['decode']:7.0f} "
        f"{total_frames / totals['mesh']:6.0f} {e2e} {'':>9s} {max(peaks):6.0f} MB (max)"
    )
    print("samples and failures per clip:", *outcomes, sep="\n")
    for s in sizes:
        fps = total_frames / totals[s]
        hours = VOXCELEB2_FRAMES / fps / 3600
        print(
            f"crop {s}²: end-to-end / (decode + FaceMesh) = {totals['mesh'] / totals[s]:.2f} (target >= 0.6); "
            f"VoxCeleb2 {VOXCELEB2_FRAMES / 1e6:.0f} M frames at {fps:.0f} frames/s = {hours:,.0f} core-hours, "
            f"{hours / args.cores:,.1f} h on {args.cores} cores"
        )


if __name__ == "__main__":
    main()
