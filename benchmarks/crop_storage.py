"""What the crop storage costs: per-frame milliseconds of each step at one crop size, and the crop
video's size per libx264 setting, all measured in one run on the same frames.

    python benchmarks/crop_storage.py --videos ../shared/fixtures --crop-size 512 [--frames N]

Steps per frame: decode (the streaming reader, PyAV as process_clip uses it), FaceMesh, the source
sharpness probe, the fixed-box crop (sub-window + resize) and, for each (preset, crf), the H.264
encode of the crops and its bytes per frame. Then end to end (`process_clip`) per setting. The
ratio end-to-end / (decode + FaceMesh) is the figure issue 7 asks >= 0.6 of; the settings are
measured round-robin, and times are CPU seconds of this process (all its threads), which stay
meaningful on a machine shared with other work, where wall-clock time does not. PSNR (dB, RGB) of
each encode against the uncompressed crops says what the bytes buy.
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import av
import cv2
import numpy as np

from preprocessing import audio, decode, face, filters
from preprocessing.media import VideoWriter
from preprocessing.process import BACKEND, process_clip
from vasa.core.config import load_params

SETTINGS = (("veryfast", 18), ("superfast", 18), ("ultrafast", 18), ("ultrafast", 23))


def _ms(seconds: float, frames: int) -> float:
    return 1000 * seconds / frames


def _psnr(mp4: bytes, crops: list[np.ndarray]) -> float:
    """PSNR in dB of the decoded mp4 against the crops it was made from."""
    with av.open(io.BytesIO(mp4)) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    error = np.mean((decoded.astype(np.float64) - np.stack(crops)) ** 2)
    return float(10 * np.log10(255**2 / max(error, 1e-12)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=0, help="frames per video for the step timings (0: all)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    base = load_params(args.params).preprocess.replace(crop_size=args.crop_size)
    size, chunk = base.crop_size, base.decode.chunk_frames
    videos = sorted(args.videos.glob("*.mp4"))
    # librosa's first call compiles with numba (seconds of CPU): pay it before anything is timed.
    audio.log_mel(np.zeros(base.sample_rate, np.float32), base.sample_rate, base.fps, base.audio)
    steps = {"decode": 0.0, "facemesh": 0.0, "sharpness": 0.0, "crop": 0.0}
    encode = {setting: [0.0, 0, []] for setting in SETTINGS}  # seconds, bytes, PSNR per video
    e2e = {setting: 0.0 for setting in SETTINGS}
    total = clip_frames = 0
    for path in videos:
        start = time.process_time()
        frames = []
        opened = decode.open_clip(
            path, fps=base.fps, sample_rate=base.sample_rate, max_side=base.decode.max_side, backend=BACKEND
        )
        with opened as reader:
            for _, block in reader.chunks(chunk):
                frames.extend(block)
                if args.frames and len(frames) >= args.frames:
                    break
        frames = np.stack(frames[: args.frames or None])
        steps["decode"] += time.process_time() - start
        tracker = face.get_tracker(base.face)
        start = time.process_time()
        tracker.reset()
        track = face.FaceTrack.from_detections(*tracker.detect(frames))
        steps["facemesh"] += time.process_time() - start
        start = time.process_time()
        heights, centres = face.face_height(track.landmarks), face.face_centre(track.landmarks)
        for index, frame in enumerate(frames):
            filters.face_sharpness(frame, centres[index], heights[index])
        steps["sharpness"] += time.process_time() - start
        transform = face.box_transform(face.fill_gaps(track.landmarks), size, base.face.crop_scale, frames.shape[1:3])
        start = time.process_time()
        crops = [face.crop_frame(frame, transform, size, base.crop.border) for frame in frames]
        steps["crop"] += time.process_time() - start
        for setting in SETTINGS:
            buffer = io.BytesIO()
            start = time.process_time()
            with VideoWriter(buffer, size, size, base.fps, crf=setting[1], preset=setting[0]) as writer:
                for crop in crops:
                    writer.write(crop)
            encode[setting][0] += time.process_time() - start
            encode[setting][1] += len(buffer.getvalue())
            encode[setting][2].append(_psnr(buffer.getvalue(), crops))
        total += len(frames)
        row = {"clip_id": path.name, "key": "0" * 16, "media_path": str(path), "av_offset": None}
        for setting in SETTINGS:
            cfg = base.replace(crop_preset=setting[0], crop_crf=setting[1])
            start = time.process_time()
            outcome = process_clip(row, cfg)
            e2e[setting] += time.process_time() - start
        clip_frames += sum(sample.frames for sample in outcome.samples) + sum(outcome.frame_rejections.values())
    mesh_ms = _ms(steps["decode"] + steps["facemesh"], total)
    print(f"machine: {platform.machine()}, python {platform.python_version()}; crop {size}², decoder {BACKEND}")
    print(f"{len(videos)} videos, {total} frames for the step timings, {clip_frames} frames end to end")
    print("per frame: " + ", ".join(f"{name} {_ms(seconds, total):.2f} ms" for name, seconds in steps.items()))
    print(f"{'preset':10s} {'crf':>3s} {'encode ms':>9s} {'KB/frame':>8s} {'PSNR dB':>7s} {'e2e ms':>7s} {'ratio':>6s}")
    for setting in SETTINGS:
        seconds, size_bytes, psnr = encode[setting]
        frame_ms = _ms(e2e[setting], clip_frames)
        print(
            f"{setting[0]:10s} {setting[1]:3d} {_ms(seconds, total):9.2f} {size_bytes / total / 1024:8.1f} "
            f"{np.mean(psnr):7.2f} {frame_ms:7.2f} {mesh_ms / frame_ms:6.2f}"
        )
    print("ratio = (decode + FaceMesh) / end to end, per frame (CPU time); target >= 0.6")


if __name__ == "__main__":
    main()
