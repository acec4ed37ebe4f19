"""Reading video frames and audio from media files (PyAV); `load_clip` decodes with decord where it can."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soxr


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


# --- Clips at a constant frame rate, with aligned audio -------------------------------------------------

BACKENDS = ("auto", "decord", "pyav")
# Slack when comparing times, in seconds: decord reports float32 timestamps (good to ~6e-5 s below
# ~1000 s), far below any frame interval. An output time within it of a frame's start shows that frame.
TIME_TOL = 1e-4


@dataclass(frozen=True)
class Clip:
    """A video resampled to a constant frame rate, with its audio cut to exactly the same span."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, frame k shown at time k / fps from the first source frame
    fps: int
    audio: np.ndarray  # (T * sample_rate // fps,) float32 mono in [-1, 1]; sample n at n / sample_rate
    sample_rate: int
    source_fps: float  # the container's average frame rate (VFR input: frames / duration)
    backend: str  # "decord" or "pyav": which decoder produced the frames


@dataclass(frozen=True)
class _Probe:
    start: float  # presentation time of the video stream's first frame, seconds
    source_fps: float
    frames: int  # frame count the container lists (0 = unknown)


def load_clip(path: str | Path, *, fps: int, sample_rate: int, backend: str = "auto", threads: int = 1) -> Clip:
    """Decode `path` into frames at a constant `fps` and mono audio at `sample_rate`, aligned in time.

    Video frames are picked by timestamp (see `frame_indices`), so variable-frame-rate input keeps its
    timing. decord decodes unless it cannot read the file (or `backend="pyav"`); then PyAV does.
    `threads` is the decoder's thread count: 1 suits one worker process per core (the pipeline's
    case); 0 lets FFmpeg use every core, for one process decoding alone. Output does not depend on it.
    Every failure is a DecodeError whose message names the file and the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
    probe = _probe(path)
    if backend == "pyav":
        frames, starts, used = *_video_pyav(path, fps, threads), "pyav"
    else:
        try:
            frames, starts = _video_decord(path, probe.start, fps, threads)
            used = "decord"
        except _DecordFailed as err:
            if backend == "decord":
                raise DecodeError(f"{path}: decord cannot read the video: {err}") from err
            try:
                frames, starts = _video_pyav(path, fps, threads)
            except DecodeError as fallback_err:
                raise DecodeError(f"{fallback_err} (decord also failed: {err})") from fallback_err
            used = "pyav"
    # A file cut short can still demux cleanly up to the cut (and frame-threaded decoders swallow
    # the error), so compare with the container's own frame count; edit lists may hide a few frames.
    if probe.frames and len(starts) < probe.frames - max(2, probe.frames // 100):
        raise DecodeError(
            f"{path}: truncated: only {len(starts)} of the {probe.frames} video frames the container lists are readable"
        )
    audio = _aligned_audio(path, starts[0], len(frames), fps, sample_rate)
    return Clip(frames, fps, audio, sample_rate, probe.source_fps, used)


def frame_indices(starts: np.ndarray, fps: int) -> np.ndarray:
    """For each output time t_k = starts[0] + k / fps, the source frame whose presentation interval
    [starts[i], starts[i + 1]) contains it: (T,) int64, non-decreasing.

    `starts` are the source frames' presentation times in seconds, sorted. Output times run up to the
    last frame's start, so T = floor((starts[-1] - starts[0]) * fps) + 1: the last frame's duration is
    never needed (containers often omit it, decord reports it unreliably). Slower sources repeat
    frames, faster ones drop them, and variable-rate sources get both where their timing demands.
    """
    starts = np.asarray(starts, dtype=np.float64)
    count = int(np.floor((starts[-1] - starts[0] + TIME_TOL) * fps)) + 1
    times = starts[0] + np.arange(count) / fps
    return np.searchsorted(starts, times + TIME_TOL, side="right") - 1


def _probe(path: str | Path) -> _Probe:
    """Open the container once to check both streams exist before anything is decoded."""
    try:
        if Path(path).stat().st_size == 0:
            raise DecodeError(f"{path}: empty file (0 bytes)")
        with av.open(str(path)) as container:
            if not container.streams.video:
                kind = "audio-only file" if container.streams.audio else "no media streams"
                raise DecodeError(f"{path}: no video stream ({kind})")
            if not container.streams.audio:
                raise DecodeError(f"{path}: no audio stream")
            stream = container.streams.video[0]
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            rate = stream.average_rate or stream.guessed_rate or 0
            listed = stream.frames
    except (av.error.FFmpegError, OSError) as err:
        raise DecodeError(f"{path}: not a readable media file (not media, or cut off before its index): {err}") from err
    return _Probe(start, float(rate), listed)


class _DecordFailed(Exception):
    """decord could not read this file; PyAV may still be able to."""


def _video_decord(path: str | Path, start: float, fps: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) at `fps` and the source frames' start times (N,) in seconds."""
    try:
        import decord
    except ImportError as err:  # no wheel on this platform: PyAV does the work
        raise _DecordFailed(f"decord is not installed ({err})") from err
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
        if len(reader) == 0:
            raise _DecordFailed("no frames indexed")
        # decord's times are packet pts minus the stream's start time, as float32.
        relative = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0].astype(np.float64)
        if not (np.isfinite(relative).all() and abs(relative[0]) < 1.0 and (np.diff(relative) >= 0).all()):
            raise _DecordFailed("frame timestamps are missing or out of order")
        starts = relative + start
        index = frame_indices(starts, fps)
        # Each source frame is decoded once (sorted, so get_batch reads forward without seeking back).
        needed, expand = np.unique(index, return_inverse=True)
        batch = reader.get_batch(needed.tolist()).asnumpy()  # (U, H, W, 3) uint8 RGB
    except (decord.DECORDError, RuntimeError) as err:  # decord raises RuntimeError when it cannot open a file
        raise _DecordFailed(_first_line(err)) from err
    frames = batch if len(needed) == len(index) else batch[expand]
    return frames, starts


def _first_line(err: Exception) -> str:
    """decord's messages carry a C++ stack trace after the first line."""
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def _video_pyav(path: str | Path, fps: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """As `_video_decord`, with PyAV: slower, but reads what decord cannot."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO" if threads != 1 else "SLICE"
            stream.thread_count = threads
            decoded = list(container.decode(stream))  # YUV frames; only the ones kept become RGB
            rate = float(stream.average_rate or stream.guessed_rate or fps)
    except (av.error.FFmpegError, OSError) as err:
        raise DecodeError(f"{path}: video decode failed (truncated or corrupt file?): {err}") from err
    if not decoded:
        raise DecodeError(f"{path}: no decodable video frames")
    if any(frame.pts is None for frame in decoded):  # e.g. raw elementary streams: assume a constant rate
        starts = np.arange(len(decoded)) / rate
    else:
        starts = np.array([float(frame.pts * frame.time_base) for frame in decoded])
    order = np.argsort(starts, kind="stable")  # decoders emit presentation order; make sure
    starts = starts[order]
    index = order[frame_indices(starts, fps)]
    rgb = {i: decoded[i].to_ndarray(format="rgb24") for i in np.unique(index).tolist()}
    return np.stack([rgb[i] for i in index.tolist()]), starts


def _aligned_audio(path: str | Path, origin: float, n_frames: int, fps: int, sample_rate: int) -> np.ndarray:
    """The audio from time `origin` (the first video frame) for exactly n_frames * sample_rate // fps
    samples: zero-padded at either end by at most one video frame, otherwise a DecodeError."""
    sound, start = _decode_audio(path, sample_rate)
    wanted = n_frames * sample_rate // fps
    lead = round((start - origin) * sample_rate)  # > 0: the audio starts after the first frame
    if lead >= 0:
        body = sound[: max(wanted - lead, 0)]
    else:
        body = sound[-lead : -lead + wanted]
        lead = 0
    missing = wanted - len(body)
    if missing * fps > sample_rate:
        raise DecodeError(
            f"{path}: audio covers {(wanted - missing) / sample_rate:.3f} s of the video's "
            f"{wanted / sample_rate:.3f} s ({n_frames} frames at {fps} fps): short by more than one frame"
        )
    out = np.zeros(wanted, dtype=np.float32)
    out[lead : lead + len(body)] = body
    return out


def _decode_audio(path: str | Path, sample_rate: int) -> tuple[np.ndarray, float]:
    """The first audio stream as mono float32 at `sample_rate` (N,) and its start time in seconds.

    Channels are averaged at the source rate, then soxr resamples (its "HQ" quality, as librosa.load
    uses): deterministic, and independent of the FFmpeg build's resampler defaults.
    """
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            planar = av.AudioResampler(format="fltp")  # same layout and rate, (C, n) float32
            chunks, start, source_rate = [], None, None
            for frame in container.decode(stream):
                if start is None:
                    start, source_rate = (float(frame.time) if frame.time is not None else 0.0), frame.sample_rate
                chunks.extend(out.to_ndarray().mean(axis=0) for out in planar.resample(frame))
            chunks.extend(out.to_ndarray().mean(axis=0) for out in planar.resample(None))
    except (av.error.FFmpegError, OSError) as err:
        raise DecodeError(f"{path}: audio decode failed (truncated or corrupt file?): {err}") from err
    if not chunks:
        raise DecodeError(f"{path}: no decodable audio")
    sound = np.concatenate(chunks).astype(np.float32)
    if source_rate != sample_rate:
        sound = soxr.resample(sound, source_rate, sample_rate, quality="HQ")
    return np.clip(sound, -1.0, 1.0).astype(np.float32, copy=False), start
