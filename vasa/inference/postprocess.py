"""After the renderer: paste-back, watermark, colour conversion and encoding, pipelined (issue 22, part 2).

    renderer (the caller's thread) --crops--> [paste back, watermark, RGB -> I420] --planes--> [encode]
                                               one thread                                     one thread:
                                                                                   H.264 + the user's audio (AAC)

Beside a CUDA renderer (the CPU's cores free) the two post-processing stages run in a thread each, as drawn: the
least wall time per frame. Beside a renderer on the CPU they run fused in one thread, still beside the renderer:
the two threads cost 0.3-1.2 CPU-ms more per 512² frame than one (the cores are the renderer's too; `split` in
`write_video`, docs/BENCHMARKS.md). Each thread is joined to the next by a queue of QUEUE_CHUNKS chunks: the
renderer draws the next chunk while the last ones are pasted, marked and encoded, and memory stays bounded (a
stage that falls behind holds the one before it back; no queue grows). The stages' work is OpenCV, NumPy and FFmpeg
calls, which release the GIL. FIFO queues and at most one thread per stage keep the chunks in order, so the file
has the same bytes as the sequential path (`threaded=False`, tests/test_generate_post.py). A failure in any
stage, or in the renderer, stops the others and is raised in the caller's thread; the partial file is
removed.

The H.264 encoder (`choose_codec`): libx264 at params generate.crf / preset / encoder_threads, or NVENC
(h264_nvenc, in PyAV's FFmpeg) when the renderer runs on CUDA and the driver's encoder opens
(generate.encoder: auto). Settings measured in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Protocol

import av
import numpy as np

from preprocessing.media import VideoWriter, aac_bit_rate, rgb_to_i420
from vasa.core.config import GenerateConfig
from vasa.core.errors import InputError

QUEUE_CHUNKS = 2  # chunks waiting between two stages (a chunk: generate.render_batch frames)
# FFmpeg's AAC coder: "fast" takes half the CPU of the default "twoloop" (0.5 vs 0.9-1.2 ms per 40 ms of 44.1-48 kHz
# stereo at 160 kb/s) and its waveform SNR on the speech fixture is higher (47 vs 38 dB; docs/BENCHMARKS.md).
AAC_OPTIONS = {"aac_coder": "fast"}
POLL_S = 0.1  # how often a stage blocked on a queue looks whether another stage has failed

_END = object()  # the last item through a queue
_STOPPED = object()  # a queue wait given up because another stage failed


class Track(Protocol):
    """Audio to mux: vasa.inference.speech.AudioTrack (a file) or ArrayTrack (samples in memory)."""

    @property
    def rate(self) -> int: ...

    @property
    def layout(self) -> str: ...

    @property
    def channels(self) -> int: ...

    def chunks(self) -> Iterator[np.ndarray]: ...


# --- the pipeline ------------------------------------------------------------------------------------------


def run_stages(
    chunks: Iterable[np.ndarray],
    stages: Sequence[Callable[[np.ndarray], np.ndarray]],
    sink: Callable[[np.ndarray], None],
    *,
    threaded: bool = True,
    split: bool = True,
) -> None:
    """Pull `chunks` in the calling thread and pass each through `stages` in order into `sink`; with
    `threaded`, each stage and the sink run in a thread of their own (`split`) or all of them in one thread
    (module docstring). Returns when the sink has taken the last chunk; raises the first error of any stage, or
    of `chunks` itself."""
    through = functools.partial(_through, stages, sink)
    if not threaded:
        for chunk in chunks:
            through(chunk)
        return
    steps = [*stages, sink] if split else [through]
    queues: list[queue.Queue] = [queue.Queue(maxsize=QUEUE_CHUNKS) for _ in steps]
    stop = threading.Event()
    errors: list[BaseException] = []
    workers = [
        threading.Thread(target=_work, args=(step, queues[i], queues[i + 1] if i + 1 < len(steps) else None, stop,
                         errors), name=f"vasa-post-{i}", daemon=True)
        for i, step in enumerate(steps)
    ]  # fmt: skip
    for worker in workers:
        worker.start()
    source = iter(chunks)
    try:
        for chunk in source:
            if not _put(queues[0], chunk, stop):
                break  # a stage failed: stop drawing
        else:
            _put(queues[0], _END, stop)
    except BaseException:
        stop.set()
        raise
    finally:
        close = getattr(source, "close", None)
        if stop.is_set() and close is not None:
            close()  # a generator (the renderer) stopped early: release what it holds now
        for worker in workers:
            worker.join()
    if errors:
        raise errors[0]


def _through(stages: Sequence[Callable[[np.ndarray], np.ndarray]], sink: Callable[[np.ndarray], None],
             chunk: np.ndarray) -> None:  # fmt: skip
    """One chunk through every stage into the sink, in the calling thread."""
    for stage in stages:
        chunk = stage(chunk)
    sink(chunk)


def _work(step: Callable, inbox: queue.Queue, outbox: queue.Queue | None, stop: threading.Event,
          errors: list[BaseException]) -> None:  # fmt: skip
    try:
        while True:
            item = _get(inbox, stop)
            if item is _STOPPED:
                return
            if item is _END:
                break
            result = step(item)
            if outbox is not None and not _put(outbox, result, stop):
                return
        if outbox is not None:
            _put(outbox, _END, stop)
    except BaseException as err:  # noqa: BLE001  handed to the caller's thread by run_stages
        errors.append(err)
        stop.set()


def _put(box: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` when there is room; False (not put) once another stage has failed."""
    while not stop.is_set():
        try:
            box.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(box: queue.Queue, stop: threading.Event) -> object:
    while not stop.is_set():
        try:
            return box.get(timeout=POLL_S)
        except queue.Empty:
            continue
    return _STOPPED


# --- the encoder ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoCodec:
    """An H.264 encoder as VideoWriter opens it: FFmpeg's name, its options and its thread count."""

    name: str  # libx264 | h264_nvenc
    options: dict[str, str] = field(default_factory=dict)
    threads: int = 1


@functools.cache
def nvenc_available() -> bool:
    """Whether FFmpeg's h264_nvenc opens on this machine: the wrapper is in PyAV's wheel, but it needs an
    NVIDIA GPU and the driver's libnvidia-encode. Probed once per process (a small encoder opened and closed)."""
    try:
        context = av.CodecContext.create("h264_nvenc", "w")
        context.width, context.height, context.pix_fmt = 256, 256, "yuv420p"
        context.time_base = Fraction(1, 25)
        context.open()  # loads libnvidia-encode and opens an encoder session; freed with the context
    except (av.error.FFmpegError, ValueError, OSError):
        return False
    return True


def choose_codec(cfg: GenerateConfig, device_type: str, nvenc: Callable[[], bool] = nvenc_available) -> VideoCodec:
    """The H.264 encoder for a run on `device_type` (params generate.encoder): `auto` takes NVENC when the
    renderer is on CUDA and `nvenc()` says it opens, libx264 otherwise; naming h264_nvenc where it does not
    open is refused. NVENC runs constant quality at generate.crf as its `cq` (vbr, no bit-rate cap)."""
    name = cfg.encoder
    if name == "auto":
        name = "h264_nvenc" if device_type == "cuda" and nvenc() else "libx264"
    elif name == "h264_nvenc" and not nvenc():
        raise InputError("generate.encoder is h264_nvenc but NVENC does not open here (no NVIDIA GPU or driver)")
    if name == "h264_nvenc":
        return VideoCodec(name, {"preset": cfg.nvenc_preset, "rc": "vbr", "cq": str(cfg.crf), "b": "0"})
    return VideoCodec(name, {"crf": str(cfg.crf), "preset": cfg.preset}, cfg.encoder_threads)


class Encoder:
    """The last stage: (T, 3 H / 2, W) I420 chunks -> the mp4 at `out` (VideoWriter: a `.partial` name until
    `close`), with `track`'s audio encoded as the video advances (interleaved) and cut at the end of the
    last frame: ceil(frames x rate / fps) samples at the track's own rate."""

    def __init__(self, out: Path | BinaryIO, fps: int, codec: VideoCodec, track: Track | None, bit_rate: int,
                 tags: dict[str, str]) -> None:  # fmt: skip
        self.out, self.fps, self.codec, self.track, self.tags = out, fps, codec, track, tags
        self.bit_rate = bit_rate
        self.writer: VideoWriter | None = None
        self.count = 0
        self._audio = track.chunks() if track is not None else iter(())
        self._held = np.zeros((0, track.channels if track is not None else 1), np.float32)
        self._samples = 0  # audio samples written

    def __call__(self, planes: np.ndarray) -> None:
        if self.writer is None:
            height, width = planes.shape[1] * 2 // 3, planes.shape[2]
            track = self.track
            self.writer = VideoWriter(
                self.out, width, height, self.fps, metadata=self.tags, threads=self.codec.threads,
                codec=self.codec.name, codec_options=self.codec.options,
                audio_rate=None if track is None else track.rate,
                audio_layout="mono" if track is None else track.layout,
                audio_bit_rate=None if track is None else aac_bit_rate(self.bit_rate, track.rate, track.channels),
                audio_options=AAC_OPTIONS,
            )  # fmt: skip
        for frame in planes:
            self.writer.write_yuv(frame)
        self.count += len(planes)
        if self.track is not None:
            self._feed(self.count * self.track.rate // self.fps)

    def close(self) -> int:
        """Finish the file (the audio up to the last frame's end); the frames written. InputError if none."""
        if self.writer is None:
            raise InputError("no frames were generated (audio shorter than one video frame)")
        try:
            if self.track is not None:
                self._feed(-(-self.count * self.track.rate // self.fps))
            self.writer.close()
        except BaseException:
            self.abort()
            raise
        return self.count

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def _feed(self, until: int) -> None:
        """Write the track's samples up to sample `until` (fewer if it ends first)."""
        assert self.writer is not None
        while self._samples < until:
            if not len(self._held):
                chunk = next(self._audio, None)
                if chunk is None:
                    return  # the track ends first
                self._held = chunk
            take = until - self._samples
            part, self._held = self._held[:take], self._held[take:]
            self.writer.write_audio(part)
            self._samples += len(part)


def _frames_to_planes(paster: Callable[[np.ndarray], np.ndarray] | None, watermark, chunk: np.ndarray) -> np.ndarray:
    """One stage: paste back (when `paster`), watermark, RGB -> I420. In one thread, so the full RGB frames
    (75 MB per 25-frame chunk at 1024²) never cross to another core; only the planes go on to the encoder,
    the slowest stage anyway. With a thread for each, the pipeline took 6-13 % more CPU than the sequential
    path; this way it takes the same, within the machine's noise (docs/BENCHMARKS.md)."""
    return mark_frames(watermark, chunk if paster is None else paster(chunk))


class BoxComposer:
    """Paste-back, watermark and RGB -> I420 of crop chunks, fused and done on the face's box only: the same
    planes as `mark_frames(watermark, paster(crops))`, byte for byte, for less CPU.

    Outside the paste-back's box every frame is the portrait, marked at one of the few gains the watermark's
    modulation takes (`Watermarker.next_gains`): its I420 planes are converted once per gain and copied. Inside,
    on the box widened to even rows and columns (I420's chroma averages 2 x 2 pixels, so planes of an
    even-aligned region are exactly the full frame's there), each frame is blended, marked and converted. At
    1024² this skips the full-frame RGB copy, watermark and conversion of the pixels that never change
    (docs/BENCHMARKS.md "Real time after the renderer")."""

    def __init__(self, paster, watermark) -> None:
        frame = paster.portrait.frame
        self.paster, self.watermark, self.size = paster, watermark, frame.shape[:2]
        height, width = self.size
        if height % 2 or width % 2:
            raise ValueError(f"I420 needs an even frame size, got {width}x{height}")
        top, bottom, left, right = (int(v) for v in paster.box)
        self.region = (top - top % 2, bottom + bottom % 2, left - left % 2, right + right % 2)  # within: H, W even
        row, end_row, col, end_col = self.region
        self.inner = (top - row, bottom - row, left - col, right - col)  # the paste-back box within the region
        self.portrait_region = np.ascontiguousarray(frame[row:end_row, col:end_col])
        self._backgrounds: dict[float, np.ndarray] = {}

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(T, S, S, 3) uint8 crops -> (T, 3 H / 2, W) uint8 I420 planes of the marked frames."""
        height, width = self.size
        it, ib, il, ir = self.inner
        gains = self.watermark.next_gains(len(crops)) if self.watermark is not None else np.zeros(len(crops))
        out = np.empty((len(crops), height * 3 // 2, width), np.uint8)
        region = np.empty_like(self.portrait_region)
        for index, crop in enumerate(crops):
            np.copyto(region, self.portrait_region)
            self.paster.blend_into(crop, region[it:ib, il:ir])
            if self.watermark is not None:
                self.watermark.mark_region(region, self.size, self.region, gains[index])
            np.copyto(out[index], self._background(gains[index]))
            _put_planes(out[index], rgb_to_i420(region), (height, width), self.region)
        return out

    def _background(self, gain) -> np.ndarray:
        """The I420 planes (3 H / 2, W) of the whole portrait marked at `gain` (kept per gain, at most 16)."""
        key = float(gain)
        if key not in self._backgrounds:
            if len(self._backgrounds) >= 16:
                self._backgrounds.clear()
            frame = self.paster.portrait.frame
            if self.watermark is not None:
                frame = np.ascontiguousarray(frame).copy()
                self.watermark.mark_region(frame, self.size, (0, self.size[0], 0, self.size[1]), gain)
            self._backgrounds[key] = rgb_to_i420(frame)
        return self._backgrounds[key]


def _put_planes(frame: np.ndarray, part: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Write `part`, the I420 planes of the even-aligned region `box` (top, bottom, left, right), into `frame`,
    the I420 planes (3 H / 2, W) of a frame of `size` (H, W)."""
    height, width = size
    top, bottom, left, right = box
    h, w = bottom - top, right - left
    whole, piece = frame.reshape(-1), part.reshape(-1)
    whole[: height * width].reshape(height, width)[top:bottom, left:right] = piece[: h * w].reshape(h, w)
    quarter, small = height * width // 4, h * w // 4
    for plane in range(2):  # U, then V: (H / 2, W / 2) each, after Y
        start, begin = height * width + plane * quarter, h * w + plane * small
        target = whole[start : start + quarter].reshape(height // 2, width // 2)
        target[top // 2 : bottom // 2, left // 2 : right // 2] = piece[begin : begin + small].reshape(h // 2, w // 2)


def mark_frames(watermark, frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, 3 H / 2, W) I420 planes, watermarked first when `watermark` is given."""
    marked = frames if watermark is None else watermark.apply(frames)
    return np.stack([rgb_to_i420(frame) for frame in marked])


def write_video(
    out: Path,
    frames: Iterable[np.ndarray],
    track: Track | None,
    fps: int,
    cfg: GenerateConfig,
    tags: dict[str, str],
    *,
    watermark=None,
    paster: Callable[[np.ndarray], np.ndarray] | None = None,
    device_type: str = "cpu",
    threaded: bool = True,
    split: bool | None = None,
) -> int:
    """Frame chunks ((T, S, S, 3) crops when `paster` is given, else (T, H, W, 3) frames, uint8 RGB) ->
    `out`, H.264 + `track` as AAC at generate.audio_bit_rate: pasted back, watermarked and encoded in the
    pipeline of the module docstring (`threaded`), composing and encoding in a thread each (`split`; None: when
    the renderer is on CUDA) or in one. The same bytes every way. Returns the frames written."""
    encoder = Encoder(out, fps, choose_codec(cfg, device_type), track, cfg.audio_bit_rate, tags)
    if hasattr(paster, "blend_into"):  # a portrait Paster: the box-only path, the same bytes
        stages: list[Callable[[np.ndarray], np.ndarray]] = [BoxComposer(paster, watermark)]
    else:
        stages = [functools.partial(_frames_to_planes, paster, watermark)]
    if split is None:
        split = device_type == "cuda"
    try:
        run_stages(frames, stages, encoder, threaded=threaded, split=split)
    except BaseException:
        encoder.abort()
        raise
    return encoder.close()
