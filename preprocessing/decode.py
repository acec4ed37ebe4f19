"""Reading video frames and audio from media files with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


class DecodeError(RuntimeError):
    """The file could not be decoded (corrupt, truncated, or missing the requested stream)."""


def read_frames(path: str | Path) -> tuple[np.ndarray, float]:
    """All video frames of `path`: ((T, H, W, 3) uint8 RGB, average frame rate in Hz)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
    except av.error.FFmpegError as err:
        raise DecodeError(f"{path}: {err}") from err
    if not frames:
        raise DecodeError(f"{path}: no decodable video frames")
    return np.stack(frames), rate


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """The first audio stream of `path`, downmixed to mono and resampled: (N,) float32 in [-1, 1]."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DecodeError(f"{path}: no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.error.FFmpegError as err:
        raise DecodeError(f"{path}: {err}") from err
    if not chunks:
        raise DecodeError(f"{path}: no decodable audio")
    return np.concatenate(chunks).astype(np.float32)
