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


class VideoWriter:
    """Streaming H.264 mp4 writer: frames go in one at a time, so memory does not grow with length.

    `target` is a path (written to `<name>.partial`, renamed on a clean close, so a killed run never
    leaves a truncated mp4 under the final name) or a seekable binary file object such as
    io.BytesIO (the mp4 muxer seeks back to finish its index). Frames are (H, W, 3) uint8 RGB with
    even H and W (yuv420p); `crf` and `preset` are libx264's quality and speed knobs. Same frames
    and settings give the same bytes (one encoder thread, bitexact flags, fixed timestamps).
    Use as a context manager; optional mono `audio` is added when the writer closes. `metadata`
    becomes container tags; the mp4 muxer keeps only the keys it maps to iTunes-style atoms (title,
    comment, description, synopsis, keywords, copyright, artist, ...) and drops others, `encoder`
    included (under bitexact).
    """

    def __init__(
        self,
        target,
        width: int,
        height: int,
        fps: int,
        crf: int = 18,
        preset: str = "medium",
        audio_rate: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"frame size must be even for yuv420p, got {width}x{height}")
        self._path = Path(target) if isinstance(target, (str, Path)) else None
        self._tmp = self._path.with_name(self._path.name + ".partial") if self._path else None
        output = str(self._tmp) if self._tmp else target
        self._container = av.open(output, "w", format="mp4", options={"fflags": "+bitexact"})
        self._container.metadata.update(metadata or {})
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.thread_count = 1
        self._video.options = {"crf": str(crf), "preset": preset, "flags": "+bitexact"}
        self._audio = None
        if audio_rate is not None:
            self._audio = self._container.add_stream("aac", rate=audio_rate)
            self._audio.layout = "mono"
            self._audio.options = {"flags": "+bitexact"}
        self._fps, self._count, self._closed = fps, 0, False

    def write(self, rgb: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        if rgb.shape != (self._video.height, self._video.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"frame must be ({self._video.height}, {self._video.width}, 3) uint8, got {rgb.shape} {rgb.dtype}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = self._count, Fraction(1, self._fps)
        self._container.mux(self._video.encode(frame))
        self._count += 1

    def close(self, audio: np.ndarray | None = None) -> None:
        """Flush the encoder, add `audio` (N,) float32 in [-1, 1] if the writer has an audio stream,
        finish the file (and rename it into place when writing to a path)."""
        if self._closed:
            return
        self._closed = True
        self._container.mux(self._video.encode(None))
        if self._audio is not None:
            sound = np.asarray(audio if audio is not None else [], dtype=np.float32)
            _encode_audio(self._container, self._audio, sound, self._audio.rate)
        self._container.close()
        if self._tmp is not None:
            self._tmp.replace(self._path)

    def abort(self) -> None:
        """Close without finishing: a partial file is removed, never renamed into place."""
        if not self._closed:
            self._closed = True
            self._container.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 18,
    preset: str = "medium",
    metadata: dict[str, str] | None = None,
) -> None:
    """Encode `frames` (T, H, W, 3) uint8 RGB and optional mono `audio` (N,) float32 in [-1, 1].

    H and W must be even (yuv420p); `metadata` becomes container tags (see VideoWriter). The file is
    written to a temporary name and renamed, so a killed run never leaves a truncated mp4 under the
    final name.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    writer = VideoWriter(
        path,
        frames.shape[2],
        frames.shape[1],
        fps,
        crf,
        preset,
        audio_rate=sample_rate if audio is not None else None,
        metadata=metadata,
    )
    try:
        for rgb in frames:
            writer.write(rgb)
    except BaseException:
        writer.abort()
        raise
    writer.close(audio)


def _encode_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {audio.shape}")
    for start in range(0, len(audio), AAC_FRAME):
        chunk = audio[start : start + AAC_FRAME]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
