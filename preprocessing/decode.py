"""Reading clips from media files: upright frames at a constant rate, in chunks, with aligned audio.

`open_clip` returns a `ClipReader` that streams a clip in chunks of frames, so a worker's memory is
bounded by the chunk size and the decoded resolution (`max_side`), never by the clip's length
(issue 8 sec. 3); `load_clip` reads every chunk into one array for callers that want the whole clip.
decord decodes where it can, PyAV where decord cannot; both give the same upright frames for video
with a display matrix (phone video, issue 7 sec. 1).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import soxr


class DecodeError(RuntimeError):
    """The file could not be decoded (corrupt, truncated, or missing the requested stream)."""


def read_frames(path: str | Path) -> tuple[np.ndarray, float]:
    """All video frames of `path`, upright (display matrix applied): ((T, H, W, 3) uint8 RGB, average
    frame rate in Hz). Holds the whole clip in memory: for short files; clips go through `open_clip`."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            frames, orient = [], IDENTITY
            for frame in container.decode(stream):
                if not frames:
                    orient = upright_orientation(display_matrix(frame))
                frames.append(orient.apply(frame.to_ndarray(format="rgb24")))
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


def bound_frame_allocations(threshold: int = 4 * 2**20) -> bool:
    """Make glibc serve every allocation of `threshold` bytes or more with its own mmap, returned to
    the system when freed. For worker entry points, once per process; returns False where it does
    not apply (not glibc).

    Decoders allocate a 6-25 MB picture per frame (1080p-4K). glibc's default threshold adapts
    upwards to the largest block freed (up to 32 MB), after which such pictures land on the heap
    and its arenas; decoder threads then fragment them, so a worker's peak RSS on a 10 s 4K clip
    varied from 579 to 770 MB between identical runs (576-604 MB with this set; docs/BENCHMARKS.md).
    Process-wide, so the library never calls it itself.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold))


# --- Orientation: the display matrix ---------------------------------------------------------------


@dataclass(frozen=True)
class Orientation:
    """One of the 8 right-angle orientations: rotate by `k` quarter turns counter-clockwise
    (np.rot90), then mirror left-right if `mirror`. Applies to (..., H, W, C) arrays."""

    k: int
    mirror: bool

    def apply(self, frames: np.ndarray) -> np.ndarray:
        out = np.rot90(frames, self.k, axes=(-3, -2)) if self.k % 4 else frames
        return out[..., :, ::-1, :] if self.mirror else out

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a width x height frame after this orientation."""
        return (height, width) if self.k % 2 else (width, height)


IDENTITY = Orientation(0, False)


def display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    """The frame's display matrix (FFmpeg's 3x3, row-major, 16.16 fixed point) as (9,) int32, or None.

    FFmpeg copies the container's matrix (mp4 `tkhd`, what phones write for portrait video) onto
    every decoded frame. A pixel (x, y) of the coded picture is shown at (a x + c y, b x + d y) up
    to a translation, with (a, b, c, d) = matrix[[0, 1, 3, 4]] and y pointing down.
    """
    for index in range(len(frame.side_data)):  # PyAV's side-data mapping fails to iterate: index it
        entry = frame.side_data[index]
        if entry.type.name == "DISPLAYMATRIX":
            raw = bytes(entry)
            return np.frombuffer(raw[:36], dtype="=i4").copy() if len(raw) >= 36 else None
    return None


def upright_orientation(matrix: np.ndarray | None) -> Orientation:
    """The orientation that shows the coded picture as the display matrix says (what players and
    the ffmpeg CLI show). Angles that are not right angles (which no camera writes) snap to the
    nearest one."""
    if matrix is None:
        return IDENTITY
    a, b, c, d = (float(v) / 65536 for v in matrix[[0, 1, 3, 4]])
    if math.hypot(a, b) == 0 or a * d - b * c == 0:
        return IDENTITY  # degenerate: no usable matrix
    quarter = round(-math.degrees(math.atan2(b, a)) / 90)  # counter-clockwise quarter turns
    cos, sin = round(math.cos(quarter * math.pi / 2)), round(math.sin(quarter * math.pi / 2))
    mirrored = a * d - b * c < 0  # the second column is the mirror image of a pure rotation's
    return _orientation_of(cos, -sin, -sin if mirrored else sin, -cos if mirrored else cos)


def decord_orientation(matrix: np.ndarray | None) -> Orientation:
    """What decord 0.6.0 applies itself: the matrix's rotation, rounded to quarter turns, without its
    mirror (measured on all 8 orientations; tests/test_decode_memory.py checks it stays so)."""
    if matrix is None:
        return IDENTITY
    a, b = (float(v) / 65536 for v in matrix[[0, 1]])
    if math.hypot(a, b) == 0:
        return IDENTITY
    quarter = round(-math.degrees(math.atan2(b, a)) / 90)
    return Orientation(quarter % 4, False)


def _orientation_of(a: int, b: int, c: int, d: int) -> Orientation:
    """The Orientation that moves pixel (x, y) to (a x + c y, b x + d y) (shifted to start at 0),
    found by applying the matrix to a small labelled grid and matching the 8 candidates."""
    grid = np.arange(6).reshape(2, 3, 1)
    ys, xs = np.mgrid[0:2, 0:3]
    xo, yo = a * xs + c * ys, b * xs + d * ys
    shown = np.empty((yo.max() - yo.min() + 1, xo.max() - xo.min() + 1, 1), dtype=grid.dtype)
    shown[yo - yo.min(), xo - xo.min(), 0] = grid[..., 0]
    for candidate in (Orientation(k, m) for m in (False, True) for k in range(4)):
        result = candidate.apply(grid)
        if result.shape == shown.shape and (result == shown).all():
            return candidate
    raise AssertionError(f"not a right-angle matrix: {(a, b, c, d)}")


def _relative(target: Orientation, applied: Orientation) -> Orientation:
    """The orientation R with R(applied(x)) == target(x): what is left to do after a decoder
    applied `applied` when `target` is wanted."""
    grid = np.arange(6).reshape(2, 3, 1)
    done, wanted = applied.apply(grid), target.apply(grid)
    for candidate in (Orientation(k, m) for m in (False, True) for k in range(4)):
        result = candidate.apply(done)
        if result.shape == wanted.shape and (result == wanted).all():
            return candidate
    raise AssertionError("the 8 orientations form a group: unreachable")


def capped_size(width: int, height: int, max_side: int | None) -> tuple[int, int, float]:
    """(width, height, scale) of a width x height frame whose longer side is capped at `max_side`:
    aspect kept, both sides rounded to even; scale = output / source pixels along the longer side
    (1.0 and the source size, odd or not, when no cap applies)."""
    longer = max(width, height)
    if max_side is None or longer <= max_side:
        return width, height, 1.0
    factor = max_side / longer
    out_w, out_h = (max(2, 2 * round(side * factor / 2)) for side in (width, height))
    return out_w, out_h, max(out_w, out_h) / longer


# --- Clips at a constant frame rate, with aligned audio -------------------------------------------------

BACKENDS = ("auto", "decord", "pyav")
# Slack when comparing times, in seconds: decord reports float32 timestamps (good to ~6e-5 s below
# ~1000 s), far below any frame interval. An output time within it of a frame's start shows that frame.
TIME_TOL = 1e-4


@dataclass(frozen=True)
class Clip:
    """A video resampled to a constant frame rate, with its audio cut to exactly the same span."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, upright, frame k shown at time k / fps from the first source frame
    fps: int
    audio: np.ndarray  # (T * sample_rate // fps,) float32 mono in [-1, 1]; sample n at n / sample_rate
    sample_rate: int
    source_fps: float  # the container's average frame rate (VFR input: frames / duration)
    backend: str  # "decord" or "pyav": which decoder produced the frames
    scale: float = 1.0  # output pixels per source pixel (< 1 when max_side capped the size)


@dataclass(frozen=True)
class _Probe:
    start: float  # presentation time of the video stream's first frame, seconds
    source_fps: float
    frames: int  # frame count the container lists (0 = unknown)
    width: int  # coded size, before the display matrix
    height: int
    matrix: np.ndarray | None  # display matrix (9,) int32, or None


def open_clip(
    path: str | Path,
    *,
    fps: int,
    sample_rate: int,
    max_side: int | None = None,
    backend: str = "auto",
    threads: int = 1,
) -> ClipReader:
    """Open `path` for streaming at a constant `fps`, with mono audio at `sample_rate` aligned to it.

    Video frames are picked by timestamp (see `frame_indices`), so variable-frame-rate input keeps
    its timing; frames come out upright (display matrix applied) and, when `max_side` is set, with
    the longer side capped at it. decord decodes unless it cannot read the file (or
    `backend="pyav"`); then PyAV does. `threads` is the decoder's thread count: 1 suits one worker
    process per core (the pipeline's case); 0 lets FFmpeg use every core. Output does not depend on
    it. Opening reads the container's index and the whole audio track (small: 64 kB per second at
    16 kHz), never the video frames. Every failure is a DecodeError naming the file and the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
    if max_side is not None and (max_side < 2 or max_side % 2):
        raise ValueError(f"max_side must be even and positive, got {max_side}")
    probe = _probe(path)
    return ClipReader(path, probe, fps, sample_rate, max_side, backend, threads)


class ClipReader:
    """A clip opened by `open_clip`: its size, frame count and audio up front, frames in chunks.

    Attributes: `n_frames` output frames at `fps`; `height`, `width` of output frames (upright,
    capped); `scale` output pixels per source pixel; `audio` (n_frames * sample_rate // fps,)
    float32 mono in [-1, 1], sample n at n / sample_rate from the first frame; `source_size`
    (width, height) upright before the cap; `backend` the decoder in use ("decord" or "pyav");
    `source_fps`. A context manager: `close()` releases the decoder handles.
    """

    def __init__(
        self,
        path: str | Path,
        probe: _Probe,
        fps: int,
        sample_rate: int,
        max_side: int | None,
        backend: str,
        threads: int,
    ) -> None:
        self.path, self.fps, self.sample_rate, self.source_fps = path, fps, sample_rate, probe.source_fps
        self._probe, self._threads, self._requested = probe, threads, backend
        self.orientation = upright_orientation(probe.matrix)
        self.source_size = self.orientation.size(probe.width, probe.height)
        self.width, self.height, self.scale = capped_size(*self.source_size, max_side)
        self.fell_back = False  # decord failed part way and PyAV took over (see `chunks`)
        if backend == "pyav":
            self._source: _Frames = _PyAVFrames(self)
        else:
            try:
                self._source = _DecordFrames(self)
            except _DecordFailed as err:
                if backend == "decord":
                    raise DecodeError(f"{path}: decord cannot read the video: {err}") from err
                try:
                    self._source = _PyAVFrames(self)
                except DecodeError as fallback_err:
                    raise DecodeError(f"{fallback_err} (decord also failed: {err})") from fallback_err
        self.backend = self._source.name
        self._index = self._source.index  # (n_frames,) source frame of each output frame
        self.n_frames = len(self._index)
        self.audio = _aligned_audio(path, self._source.starts.min(), self.n_frames, fps, sample_rate)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start_frame, frames (n, height, width, 3) uint8 RGB) with n <= size, covering frames
        0..n_frames-1 in order. Each call decodes again from the start (a caller may make two
        passes); at most one chunk, plus a few full-size frames in flight, is held at a time.
        A frame that cannot be decoded raises DecodeError."""
        if size < 1:
            raise ValueError(f"chunk size must be positive, got {size}")
        self._source.rewind()
        for start in range(0, self.n_frames, size):
            wanted = self._index[start : start + size]
            try:
                frames = self._source.read(wanted)
            except _DecordFailed as err:
                frames = self._fall_back(err).read(wanted)
            yield start, frames

    def _fall_back(self, err: _DecordFailed) -> _Frames:
        """decord failed part way through: PyAV takes over if it sees the same frames, which it must
        for the chunks already handed out to stay valid."""
        if self._requested == "decord":
            raise DecodeError(f"{self.path}: decord cannot read the video: {err}") from err
        try:
            source = _PyAVFrames(self)
        except DecodeError as fallback_err:
            raise DecodeError(f"{fallback_err} (decord also failed: {err})") from fallback_err
        theirs, ours = source.starts[source.index], self._source.starts[self._index]
        if len(theirs) != len(ours) or np.abs(theirs - ours).max() > TIME_TOL:
            source.close()
            raise DecodeError(f"{self.path}: decord failed part way ({err}) and PyAV sees other frame times")
        self._source.close()
        self._source, self._index, self.backend, self.fell_back = source, source.index, source.name, True
        return source

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_clip(
    path: str | Path,
    *,
    fps: int,
    sample_rate: int,
    max_side: int | None = None,
    backend: str = "auto",
    threads: int = 1,
) -> Clip:
    """The whole clip in memory: `open_clip` (same arguments) with every chunk read into one array.

    For short clips and tests; the pipeline streams with `open_clip` instead.
    """
    with open_clip(path, fps=fps, sample_rate=sample_rate, max_side=max_side, backend=backend, threads=threads) as r:
        frames = np.empty((r.n_frames, r.height, r.width, 3), dtype=np.uint8)
        for start, chunk in r.chunks(64):
            frames[start : start + len(chunk)] = chunk
        if r.fell_back:  # never mix decoders in one array: read it all again with PyAV alone
            return load_clip(path, fps=fps, sample_rate=sample_rate, max_side=max_side, backend="pyav", threads=threads)
        return Clip(frames, fps, r.audio, sample_rate, r.source_fps, r.backend, r.scale)


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
    """Open the container to check both streams exist, and decode one frame for the display matrix."""
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
            listed, width, height = stream.frames, stream.codec_context.width, stream.codec_context.height
    except (av.error.FFmpegError, OSError) as err:
        raise DecodeError(f"{path}: not a readable media file (not media, or cut off before its index): {err}") from err
    try:
        with av.open(str(path)) as container:
            first = next(container.decode(container.streams.video[0]), None)
    except (av.error.FFmpegError, OSError) as err:
        raise DecodeError(f"{path}: video decode failed (truncated or corrupt file?): {err}") from err
    if first is None:
        raise DecodeError(f"{path}: no decodable video frames")
    width, height = width or first.width, height or first.height
    return _Probe(start, float(rate), listed, width, height, display_matrix(first))


class _DecordFailed(Exception):
    """decord could not read this file; PyAV may still be able to."""


class _Frames:
    """A decoder behind a ClipReader: source frame times, the output->source index, and frames."""

    name: str
    starts: np.ndarray  # (N,) presentation times of the source frames, seconds, in decoder order
    index: np.ndarray  # (n_frames,) decoder-order position of the source frame of each output frame

    def __init__(self, reader: ClipReader) -> None:
        self.reader = reader
        # The last frame made (position, picture), for a frame repeated across chunks. One buffer for
        # the whole pass: a fresh copy per chunk fragments the heap (RSS crept up 100 MB a minute of 1080p).
        self._last_position: int | None = None
        self._last_frame: np.ndarray | None = None

    def rewind(self) -> None:
        self._last_position = None

    def read(self, positions: np.ndarray) -> np.ndarray:
        """Output frames (n, height, width, 3) for decoder-order source positions (n,).

        Each source frame is decoded once, one at a time, into a buffer reused for the whole pass,
        then oriented and resized straight into the output slots that show it: memory is the output
        chunk plus one full-size frame. No per-frame allocation: with 6-25 MB frames those land on
        the heap and fragment it (measured RSS creeping up over a long 1080p or 4K clip).
        """
        r = self.reader
        out = np.empty((len(positions), r.height, r.width, 3), dtype=np.uint8)
        needed = np.unique(positions)
        if self._last_position == needed[0]:  # a frame repeated across chunks
            _place(out, positions, needed[0], self._last_frame)
            needed = needed[1:]
        for position in needed.tolist():
            slots = np.flatnonzero(positions == position).tolist()
            self._finish(self._decode(position), out[slots[0]])
            for slot in slots[1:]:
                out[slot] = out[slots[0]]
        last = int(positions.max())
        if self._last_frame is None:
            self._last_frame = np.empty((r.height, r.width, 3), dtype=np.uint8)
        self._last_frame[...] = out[int(np.flatnonzero(positions == last)[-1])]
        self._last_position = last
        return out

    def _decode(self, position: int) -> np.ndarray:
        """The full-size RGB frame (H, W, 3) at decoder-order `position` (calls go forward); it may
        be a buffer the next call overwrites."""
        raise NotImplementedError

    def _finish(self, frame: np.ndarray, slot: np.ndarray) -> None:
        """Write a decoded frame, upright and at the output size, into `slot` (height, width, 3)."""
        r = self.reader
        frame = self.residual.apply(frame)
        if frame.shape[:2] != r.source_size[::-1]:
            raise self.size_error(f"decoded frame is {frame.shape[1]}x{frame.shape[0]}, expected {r.source_size}")
        if (r.width, r.height) == r.source_size:
            slot[...] = frame
            return
        # INTER_AREA: the average over each output pixel's footprint, no aliasing when shrinking.
        resized = cv2.resize(np.ascontiguousarray(frame), (r.width, r.height), dst=slot, interpolation=cv2.INTER_AREA)
        if resized is not slot:  # OpenCV wrote elsewhere (it does not for a contiguous uint8 slot)
            slot[...] = resized

    residual: Orientation  # what is left of the display matrix after the decoder's own handling

    def size_error(self, message: str) -> Exception:
        return DecodeError(f"{self.reader.path}: {message}")

    def close(self) -> None:
        self._last_position, self._last_frame = None, None


def _place(out: np.ndarray, positions: np.ndarray, position: int, frame: np.ndarray) -> None:
    """Copy `frame` into every slot of `out` that shows source `position`, one slot at a time:
    `out[mask] = frame` would build a temporary (k, H, W, 3) copy first, and such per-frame heap
    temporaries let a long 1080p clip's RSS creep up."""
    for slot in np.flatnonzero(positions == position).tolist():
        out[slot] = frame


class _DecordFrames(_Frames):
    """decord: fast on small frames; reads the container's index at open; applies rotations itself."""

    name = "decord"

    def __init__(self, reader: ClipReader) -> None:
        super().__init__(reader)
        try:
            import decord
        except ImportError as err:  # no wheel on this platform: PyAV does the work
            raise _DecordFailed(f"decord is not installed ({err})") from err
        self._errors = (decord.DECORDError, RuntimeError)  # RuntimeError: decord cannot open a file
        matrix = reader._probe.matrix
        self.residual = _relative(upright_orientation(matrix), decord_orientation(matrix))
        try:
            self._reader = decord.VideoReader(str(reader.path), ctx=decord.cpu(0), num_threads=reader._threads)
            if len(self._reader) == 0:
                raise _DecordFailed("no frames indexed")
            # decord's times are packet pts minus the stream's start time, as float32.
            relative = self._reader.get_frame_timestamp(np.arange(len(self._reader)))[:, 0].astype(np.float64)
        except self._errors as err:
            raise _DecordFailed(_first_line(err)) from err
        if not (np.isfinite(relative).all() and abs(relative[0]) < 1.0 and (np.diff(relative) >= 0).all()):
            raise _DecordFailed("frame timestamps are missing or out of order")
        self.starts = relative + reader._probe.start
        self.index = frame_indices(self.starts, reader.fps)
        _check_complete(reader.path, len(self.starts), reader._probe.frames)
        self._position: int | None = None  # of the frame next() returns; None: seek first
        self._buffer: np.ndarray | None = None  # the decoded frame, reused
        from decord._ffi.base import _LIB, check_call

        self._lib, self._check_call = _LIB, check_call

    def rewind(self) -> None:
        super().rewind()
        self._position = None  # unknown: seek before the next read

    def _decode(self, position: int) -> np.ndarray:
        try:
            # Frame by frame, forward: decord's get_batch grows the heap by ~20 MB a call on 1080p
            # (measured; docs/BENCHMARKS.md), next() and skip_frames() keep it flat.
            if self._position is None or position < self._position:
                self._reader.seek_accurate(position)
            elif position > self._position:
                self._reader.skip_frames(position - self._position)  # decoded, not converted to RGB
            frame = self._reader.next()  # decord NDArray (H, W, 3) uint8 RGB, decord-rotated
            if self._buffer is None or self._buffer.shape != tuple(frame.shape):
                self._buffer = np.empty(tuple(frame.shape), dtype=np.uint8)
            # asnumpy() without its fresh array each call (decord's own copy, into our buffer).
            buffer = self._buffer.ctypes.data_as(ctypes.c_void_p)
            self._check_call(
                self._lib.DECORDArrayCopyToBytes(frame.handle, buffer, ctypes.c_size_t(self._buffer.nbytes))
            )
        except self._errors as err:
            raise _DecordFailed(_first_line(err)) from err
        self._position = position + 1
        return self._buffer

    def size_error(self, message: str) -> Exception:
        return _DecordFailed(message)  # decord misread the orientation or size: PyAV takes over

    def close(self) -> None:
        super().close()
        self._reader = None


class _PyAVFrames(_Frames):
    """PyAV: slower on small frames, but reads what decord cannot. Opening decodes the video once for
    its frame times (keeping none of the pictures); each pass decodes it again, streaming."""

    name = "pyav"

    def __init__(self, reader: ClipReader) -> None:
        super().__init__(reader)
        self.residual = reader.orientation  # PyAV hands out coded pictures: apply the whole matrix
        self._container = None
        self._frames: Iterator | None = None
        self._position = -1  # decoder-order position of the frame last taken from self._frames
        times, missing, rate = [], False, float(reader.fps)
        for frame in self._stream():
            missing = missing or frame.pts is None
            times.append(float(frame.pts * frame.time_base) if frame.pts is not None else 0.0)
        rate = self._rate or rate
        self.close()
        if not times:
            raise DecodeError(f"{reader.path}: no decodable video frames")
        # No timestamps (e.g. raw elementary streams): assume a constant rate.
        starts = np.arange(len(times)) / rate if missing else np.array(times)
        order = np.argsort(starts, kind="stable")  # decoders emit presentation order; make sure
        self.starts = starts
        self.index = order[frame_indices(starts[order], reader.fps)]
        _check_complete(reader.path, len(starts), reader._probe.frames)

    def _stream(self) -> Iterator[av.VideoFrame]:
        """Decoded frames in decoder order from a fresh container; errors become DecodeError."""
        path = self.reader.path
        try:
            self._container = av.open(str(path))
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO" if self.reader._threads != 1 else "SLICE"
            stream.thread_count = self.reader._threads
            self._rate = float(stream.average_rate or stream.guessed_rate or 0)
            yield from self._container.decode(stream)
        except (av.error.FFmpegError, OSError) as err:
            raise DecodeError(f"{path}: video decode failed (truncated or corrupt file?): {err}") from err

    def rewind(self) -> None:
        super().rewind()
        self.close()

    def _decode(self, position: int) -> np.ndarray:
        if self._frames is None or position <= self._position:  # backwards (only for odd orders): restart
            self.close()
            self._frames, self._position = self._stream(), -1
        frame = None
        while self._position < position:
            frame = next(self._frames, None)
            if frame is None:
                raise DecodeError(f"{self.reader.path}: the video ended before frame {position} of the first pass")
            self._position += 1
        return frame.to_ndarray(format="rgb24")  # YUV -> RGB only for frames that are used

    def close(self) -> None:
        super().close()
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        if self._container is not None:
            self._container.close()
            self._container = None


def _check_complete(path: str | Path, readable: int, listed: int) -> None:
    """A file cut short can still demux cleanly up to the cut (and frame-threaded decoders swallow
    the error), so compare with the container's own frame count; edit lists may hide a few frames."""
    if listed and readable < listed - max(2, listed // 100):
        raise DecodeError(
            f"{path}: truncated: only {readable} of the {listed} video frames the container lists are readable"
        )


def _first_line(err: Exception) -> str:
    """decord's messages carry a C++ stack trace after the first line."""
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


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
