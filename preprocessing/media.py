"""Writing H.264 + AAC mp4 files with PyAV (its wheel bundles libx264, NVENC's wrapper and the AAC encoder).

Output is byte-reproducible: a fixed encoder thread count (one unless asked; x264 gives the same bytes for
the same count), `bitexact` flags on the muxer and codecs so no library version or wall-clock time lands in
the file, and fixed presentation timestamps.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

AAC_FRAME = 1024  # samples per AAC frame
AAC_RATES = frozenset({7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000})
AAC_MAX_BITS = 6144  # per channel per AAC frame (ISO 14496-3): FFmpeg's encoder clamps a higher bit rate to it


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3 H / 2, W) uint8 I420 planes (Y, then U and V at half size), BT.601 limited
    range as FFmpeg's swscale converts for libx264 by default: Y within one level of it, chroma averaged over
    2x2 pixels. OpenCV's conversion costs a seventh of swscale's (0.7 vs 5.2 ms at 1024², docs/BENCHMARKS.md)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420)


def aac_bit_rate(bit_rate: int, rate: int, channels: int) -> int:
    """`bit_rate` bits/s, lowered to what AAC can carry at `rate` Hz with `channels` channels."""
    return min(bit_rate, AAC_MAX_BITS * rate * channels // AAC_FRAME)


class VideoWriter:
    """Streaming H.264 mp4 writer: frames go in one at a time, so memory does not grow with length.

    `target` is a path (written to `<name>.partial`, renamed on a clean close, so a killed run never
    leaves a truncated mp4 under the final name) or a seekable binary file object such as
    io.BytesIO (the mp4 muxer seeks back to finish its index). Frames are (H, W, 3) uint8 RGB with
    even H and W (yuv420p), or I420 planes (`write_yuv`); `crf` and `preset` are libx264's quality and
    speed knobs. Same frames and settings give the same bytes (a fixed encoder thread count, bitexact flags,
    fixed timestamps).
    Use as a context manager; optional mono `audio` is added when the writer closes, or audio of
    `audio_layout` (mono or stereo) goes in as the video advances (`write_audio`), AAC at `audio_bit_rate`
    bits/s (None: FFmpeg's default) with the encoder's `audio_options`. `metadata` becomes container tags;
    the mp4 muxer keeps only the keys it maps to iTunes-style atoms (title, comment, description, synopsis,
    keywords, copyright, artist, ...) and drops others, `encoder` included (under bitexact). `codec` is
    FFmpeg's H.264 encoder (libx264, h264_nvenc): `codec_options` are its options, or libx264's `crf` and
    `preset` when None; `threads` its thread count.
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
        *,
        audio_layout: str = "mono",
        audio_bit_rate: int | None = None,
        audio_options: dict[str, str] | None = None,
        threads: int = 1,
        codec: str = "libx264",
        codec_options: dict[str, str] | None = None,
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"frame size must be even for yuv420p, got {width}x{height}")
        self._path = Path(target) if isinstance(target, (str, Path)) else None
        self._tmp = self._path.with_name(self._path.name + ".partial") if self._path else None
        output = str(self._tmp) if self._tmp else target
        self._container = av.open(output, "w", format="mp4", options={"fflags": "+bitexact"})
        self._container.metadata.update(metadata or {})
        self._video = self._container.add_stream(codec, rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.thread_count = threads
        options = {"crf": str(crf), "preset": preset} if codec_options is None else dict(codec_options)
        self._video.options = options | {"flags": "+bitexact"}
        self._audio = None
        if audio_rate is not None:
            self._audio = self._container.add_stream("aac", rate=audio_rate)
            self._audio.layout = audio_layout
            if audio_bit_rate is not None:
                self._audio.bit_rate = audio_bit_rate
            self._audio.options = dict(audio_options or {}) | {"flags": "+bitexact"}
        self._fps, self._count, self._closed = fps, 0, False
        channels = av.AudioLayout(audio_layout).nb_channels
        self._pending = np.zeros((0, channels), np.float32)  # write_audio's samples short of a whole AAC frame
        self._samples = 0  # audio samples encoded (per channel): the next frame's pts
        self._streamed = False  # write_audio was used

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

    def write_yuv(self, planes: np.ndarray) -> None:
        """Append one frame given as (3 H / 2, W) uint8 I420 planes (`rgb_to_i420`): no conversion in FFmpeg."""
        expected = (self._video.height * 3 // 2, self._video.width)
        if planes.shape != expected or planes.dtype != np.uint8:
            raise ValueError(f"I420 planes must be {expected} uint8, got {planes.shape} {planes.dtype}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(planes), format="yuv420p")
        frame.pts, frame.time_base = self._count, Fraction(1, self._fps)
        self._container.mux(self._video.encode(frame))
        self._count += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """Append (n, C) float32 samples in [-1, 1] (C = the layout's channels; (n,) for mono), encoded in
        whole AAC frames as they fill (the rest when the writer closes), muxed beside the video so far."""
        if self._audio is None:
            raise ValueError("this writer has no audio stream")
        block = np.asarray(samples, np.float32).reshape(len(samples), -1)
        if block.shape[1] != self._pending.shape[1]:
            raise ValueError(f"audio must have {self._pending.shape[1]} channel(s), got {block.shape[1]}")
        self._streamed = True
        self._pending = np.concatenate([self._pending, block])
        whole = len(self._pending) // AAC_FRAME * AAC_FRAME
        self._encode_planar(self._pending[:whole])
        self._pending = self._pending[whole:]

    def _encode_planar(self, block: np.ndarray) -> None:
        """(n, C) float32 -> AAC frames of AAC_FRAME samples (a shorter last one only at the end)."""
        assert self._audio is not None
        layout = self._audio.layout.name
        for start in range(0, len(block), AAC_FRAME):
            part = np.ascontiguousarray(block[start : start + AAC_FRAME].T)  # (C, n) planar
            frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=layout)
            rate = self._audio.rate
            frame.sample_rate, frame.pts, frame.time_base = rate, self._samples, Fraction(1, rate)
            self._container.mux(self._audio.encode(frame))
            self._samples += part.shape[1]

    def close(self, audio: np.ndarray | None = None) -> None:
        """Flush the encoder, add `audio` (N,) float32 in [-1, 1] if the writer has an audio stream and
        `write_audio` was not used (else the samples it holds short of a frame are encoded), finish the file
        (and rename it into place when writing to a path)."""
        if self._closed:
            return
        self._closed = True
        self._container.mux(self._video.encode(None))
        if self._audio is not None and self._streamed:
            self._encode_planar(self._pending)
            self._container.mux(self._audio.encode(None))
        elif self._audio is not None:
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


# libx264 options under which its output does not depend on the CPU's instruction set (AVX-512 vs AVX2 vs
# SSSE3): macroblock-tree rate control off. Measured on the sample corpus: with it on, astronaut_000's bytes
# differed between AVX-512 and AVX2 machines (and in the code before, grace_hopper_004's); with it off, all
# ten clips are byte-identical under x264's AVX-512, AVX2 and SSSE3 kernels.
MACHINE_INDEPENDENT_X264 = {"x264-params": "mbtree=0"}


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
    final name. The same frames give the same bytes on any x86-64 CPU: libx264's macroblock-tree
    rate control is off (MACHINE_INDEPENDENT_X264), whose float kernels differ between its AVX-512 and AVX2
    code, which made one sample clip in ten differ between machines (docs/BENCHMARKS.md).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    writer = VideoWriter(
        path,
        frames.shape[2],
        frames.shape[1],
        fps,
        audio_rate=sample_rate if audio is not None else None,
        metadata=metadata,
        codec_options={"crf": str(crf), "preset": preset, **MACHINE_INDEPENDENT_X264},  # crf, preset: here only
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
