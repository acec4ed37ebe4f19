"""Peak memory of one worker decoding a long clip: streaming (open_clip + chunks) vs whole (load_clip).

    python benchmarks/decode_memory.py [--seconds 60] [--size 1920x1080] [--codec libx264]
        [--chunk 25] [--max-side 1920] [--whole-seconds 60] [--workdir /tmp/decode_memory]

Makes a synthetic clip with PyAV (moving texture, 48 kHz stereo AAC, 25 fps; kept in --workdir and
reused), then measures each way of reading it in a fresh Python process that reports its own peak
resident set size (VmHWM) and its RSS after the imports, so no figure includes another's. The worker
calls `decode.bound_frame_allocations()` first, as pipeline workers should (--default-malloc: not). Prints
the figures, the ratio whole / streaming, and the bound the streaming reader should stay under:

    bound = RSS after imports + (2 x chunk + 2) x frame + 2 x source frame
            + 16 x 1.5 x source pixels + 0.5 MB x clip seconds + 64 MB

frame = width x height x 3 bytes at the decoded size (after --max-side), source frame the same at the
source size. Counted: the chunk the caller still holds, the chunk being filled, the last frame (kept
for a repeat across chunks) and one frame of heap slack; the frame being decoded and its RGB copy at
the source size; the decoder's reference frames (<= 16 YUV 4:2:0 pictures at the source size); the
audio (48 kHz stereo decoded and resampled to 16 kHz mono: ~0.5 MB per second at its peak); and
64 MB for the container index, decoder contexts and the allocator's arenas (measured: the level
reached after the first chunk varies by up to ~85 MB between identical runs, then stays flat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FPS, AUDIO_RATE = 25, 48000
MB = 2**20


def synthetic_clip(path: Path, seconds: float, width: int, height: int, codec: str = "libx264") -> Path:
    """Write (once) a clip of a moving random texture with a 48 kHz stereo tone: frames are made one at
    a time, so writing a long 4K clip needs no more memory than a few frames."""
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(tile, 8, axis=0), 8, axis=1)[:height, :width]
    frames = round(seconds * FPS)
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), "w", format="mp4") as container:
        video = container.add_stream(codec, rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "28"}
        video.thread_count = 0
        sound = container.add_stream("aac", rate=AUDIO_RATE)
        sound.layout = "stereo"
        t = np.arange(AUDIO_RATE // FPS) / AUDIO_RATE
        for index in range(frames):
            picture = np.roll(texture, 4 * index, axis=1)  # everything moves: no free skip blocks
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            container.mux(video.encode(frame))
            tone = (0.2 * np.sin(2 * np.pi * 220 * (t + index / FPS))).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, index * len(t), Fraction(1, AUDIO_RATE)
            container.mux(sound.encode(chunk))
        container.mux(video.encode(None))
        container.mux(sound.encode(None))
    partial.replace(path)
    return path


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    freshly spawned worker would report its parent's size at the fork."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _measure(mode: str, path: str, chunk: int, max_side: int | None, bound_allocations: bool) -> dict:
    """Run in a fresh process: read `path` one way; return peak RSS and timings."""
    from preprocessing.decode import bound_frame_allocations, load_clip, open_clip

    if bound_allocations:
        bound_frame_allocations()
    with contextlib.suppress(ImportError):  # the reader imports decord on first use: count it as baseline
        import decord  # noqa: F401
    imported = _rss_now_mb()
    start = time.perf_counter()
    if mode == "stream":
        with open_clip(path, fps=FPS, sample_rate=16000, max_side=max_side) as reader:
            frames, shape, backend, largest = 0, (reader.height, reader.width), reader.backend, 0
            for _, part in reader.chunks(chunk):
                frames, largest = frames + len(part), max(largest, len(part))
            backend = reader.backend
    else:
        clip = load_clip(path, fps=FPS, sample_rate=16000, max_side=max_side)
        frames, shape, backend, largest = len(clip.frames), clip.frames.shape[1:3], clip.backend, len(clip.frames)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    return {
        "mode": mode,
        "frames": frames,
        "height": shape[0],
        "width": shape[1],
        "backend": backend,
        "largest_chunk": largest,
        "rss_imports_mb": round(imported, 1),
        "peak_rss_mb": round(peak, 1),
        "seconds": round(seconds, 2),
    }


def _run_child(mode: str, path: Path, chunk: int, max_side: int | None, bound_allocations: bool) -> dict:
    flags = [str(chunk), str(max_side or 0), str(int(bound_allocations))]
    command = [sys.executable, __file__, "--measure", mode, str(path), *flags]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{mode} on {path} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_bound_mb(result: dict, chunk: int, source: tuple[int, int], seconds: float) -> float:
    """The streaming bound of the module docstring for this clip, in MB."""
    frame, source_frame = result["width"] * result["height"] * 3, source[0] * source[1] * 3
    references = 16 * 1.5 * source[0] * source[1]
    fixed = result["rss_imports_mb"] + 0.5 * seconds + 64
    return fixed + ((2 * chunk + 2) * frame + 2 * source_frame + references) / MB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the streamed clip")
    parser.add_argument("--whole-seconds", type=float, default=None, help="length for load_clip (default: same)")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the synthetic clip")
    parser.add_argument("--codec", default="libx264", help="PyAV encoder: libx264, libx265, ...")
    parser.add_argument(
        "--chunk", type=int, default=25, help="frames per chunk (params: preprocess.decode.chunk_frames)"
    )
    parser.add_argument("--max-side", type=int, default=1920, help="cap on the decoded longer side; 0 = none")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/decode_memory"))
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's adaptive mmap threshold (no decode.bound_frame_allocations in the worker)",
    )
    parser.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args(argv)
    if args.measure:
        mode, path, chunk, max_side, bound = args.measure
        print(json.dumps(_measure(mode, path, int(chunk), int(max_side) or None, bound == "1")))
        return
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    max_side = args.max_side or None
    whole_seconds = args.whole_seconds or args.seconds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{_total_ram_gb():.0f} GB RAM, python {platform.python_version()}"
    )
    rows = []
    for mode, seconds in (("stream", args.seconds), ("whole", whole_seconds)):
        name = f"{args.codec}_{width}x{height}_{seconds:g}s.mp4"
        made = time.perf_counter()
        path = synthetic_clip(args.workdir / name, seconds, width, height, args.codec)
        if time.perf_counter() - made > 1:
            print(f"made {path} ({path.stat().st_size / MB:.0f} MB) in {time.perf_counter() - made:.0f} s")
        result = _run_child(mode, path, args.chunk, max_side, not args.default_malloc) | {"clip_seconds": seconds}
        rows.append(result)
    print(
        f"{'mode':7s} {'clip':>6s} {'frames':>6s} {'decoded':>10s} {'backend':>7s} {'chunk':>5s} "
        f"{'RSS imports':>11s} {'peak RSS':>9s} {'frames/s':>8s}"
    )
    for r in rows:
        print(
            f"{r['mode']:7s} {r['clip_seconds']:5.0f}s {r['frames']:6d} {r['width']:>5d}x{r['height']:<4d} "
            f"{r['backend']:>7s} {r['largest_chunk']:5d} {r['rss_imports_mb']:8.0f} MB {r['peak_rss_mb']:6.0f} MB "
            f"{r['frames'] / r['seconds']:8.0f}"
        )
    stream, whole = rows
    bound = predicted_bound_mb(stream, args.chunk, (width, height), args.seconds)
    print(f"streaming peak {stream['peak_rss_mb']:.0f} MB <= bound {bound:.0f} MB: {stream['peak_rss_mb'] <= bound}")
    growth = whole["peak_rss_mb"] - whole["rss_imports_mb"]
    print(
        f"whole / streaming peak RSS = {whole['peak_rss_mb'] / stream['peak_rss_mb']:.1f}x "
        f"(load_clip grew {growth:.0f} MB for {whole['clip_seconds']:g} s = {growth / whole['clip_seconds']:.0f} MB/s)"
    )


def _total_ram_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


if __name__ == "__main__":
    main()
