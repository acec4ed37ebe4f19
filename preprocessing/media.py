"""Writing H.264 + AAC mp4 files with PyAV (its wheel bundles libx264 and the AAC encoder).

Output is byte-reproducible: one encoder thread, `bitexact` flags on the muxer and codecs so no
library version or wall-clock time lands in the file, and fixed presentation timestamps.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AAC_FRAME = 1024  # samples per AAC frame


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 18,
    preset: str = "medium",
) -> None:
    """Encode `frames` (T, H, W, 3) uint8 RGB and optional mono `audio` (N,) float32 in [-1, 1].

    H and W must be even (yuv420p). `crf` and `preset` are libx264's quality and speed knobs. The
    file is written to a temporary name and renamed, so a killed run never leaves a truncated mp4
    under the final name.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {frames.shape[2]}x{frames.shape[1]}")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.thread_count = 1
        video.options = {"crf": str(crf), "preset": preset, "flags": "+bitexact"}
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
            sound.options = {"flags": "+bitexact"}
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            _encode_audio(container, sound, np.asarray(audio, dtype=np.float32), sample_rate)
    tmp.replace(path)


def _encode_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {audio.shape}")
    for start in range(0, len(audio), AAC_FRAME):
        chunk = audio[start : start + AAC_FRAME]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
