"""One session of `vasa serve`, run off the event loop: PCM16 audio chunks in (at any accepted rate, resampled to
the bundle's with soxr), watermarked JPEG frames and the audio they belong to out, chunk by chunk.

    portrait bytes --prepare_portrait--> open_session (the encoders, once)                         `open_live`
    PCM16 --soxr--> stream(): motion DiT every few frames, render, paste back --> watermark --> JPEG  `LiveSession.run`

Low latency: `stream` samples a DiT window every generate.stream_hop frames, once generate.stream_lookahead frames
of audio after them have arrived, and yields frame by frame (vasa/inference/generate.py), so each chunk sent is one
frame and its audio.

A session runs on a worker thread and holds one of the server's model slots (a semaphore, serve.workers) only
while it computes: waiting for audio, or for a slow client to take its frames, it gives the slot back so other
sessions compute meanwhile. vasa/inference/serve.py owns the WebSocket side and the protocol's text messages.
"""

from __future__ import annotations

import queue
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import soxr  # type: ignore[import-untyped]

from vasa.core.config import FaceConfig, GenerateConfig, ServeConfig
from vasa.core.errors import InputError
from vasa.inference.bundle import Bundle
from vasa.inference.generate import Conditions, Session, check_conditions, conditions_for, open_session, stream
from vasa.inference.portrait import prepare_portrait
from vasa.labelling.labels import GENERATOR_NAME, TRAINED_ALGORITHMIC_MEDIA
from vasa.labelling.watermark import Watermarker

# Binary messages from the server: a 5-byte header, kind (uint8) and frame index (uint32 little-endian), then
# the payload. AUDIO: PCM16 mono at the bundle's rate, the audio of the frames from that index on (sent before
# them); FRAME: one JPEG.
HEADER = struct.Struct("<BI")
FRAME, AUDIO = 1, 2
POLL_S = 0.1  # how often a waiting worker looks whether its session has ended

_NOTHING = object()  # what a wait returns when nothing came within POLL_S


class Refusal(Exception):
    """A session ends with a message to the client: `code` (machine-readable), `message` (for people) and the
    WebSocket close code (RFC 6455 §7.4.1: 1003 unsupported data, 1008 policy, 1009 too big, 1011 internal,
    1013 try again later)."""

    def __init__(self, code: str, message: str, close: int = 1008) -> None:
        super().__init__(message)
        self.code, self.message, self.close = code, message, close


class Cancelled(Exception):
    """The session ended (the client left, a bound was hit): its worker stops where it is."""


def pcm16(data: bytes) -> np.ndarray:
    """PCM16 little-endian mono bytes -> (n,) float32 in [-1, 1)."""
    if len(data) % 2:
        raise Refusal("bad_audio", f"an audio message of {len(data)} bytes: PCM16 takes 2 bytes a sample", 1003)
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def to_pcm16(samples: np.ndarray) -> bytes:
    """(n,) float32 in [-1, 1] -> PCM16 little-endian bytes (clipped)."""
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()


def jpeg_comment(bundle_sha256: str, version: str) -> bytes:
    """A JPEG COM segment saying the image is AI-generated: every frame describes itself when saved on its own."""
    text = (f"AI-generated image ({TRAINED_ALGORITHMIC_MEDIA}) by {GENERATOR_NAME} {version}; "
            f"model_sha256={bundle_sha256}").encode("ascii")  # fmt: skip
    return b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """`comment` inserted after SOI and the JFIF APP0 segment (which must come first), before the image data."""
    at = 2
    if jpeg[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:at] + comment + jpeg[at:]


class LiveSession:
    """A portrait ready to animate from audio pushed in chunks. The event loop calls `push`, `finish`, `sent`
    and `cancel` (all thread-safe); the worker thread calls `run`, which hands `emit` lists of binary messages
    (one chunk: its audio, then its frames), then the final summary (a dict)."""

    def __init__(self, session: Session, conditions: Conditions, rate_in: int, generate: GenerateConfig,
                 serve: ServeConfig, compute: threading.Semaphore, version: str) -> None:  # fmt: skip
        meta = session.bundle.meta
        self.session, self.conditions, self.generate = session, conditions, generate
        self.rate, self.fps = int(meta["audio"]["sample_rate"]), int(meta["fps"])
        self.per_frame = self.rate // self.fps  # samples per video frame, as AudioFeatures counts them
        self.rate_in, self.quality, self.compute = rate_in, serve.jpeg_quality, compute
        self.resampler = None if rate_in == self.rate else soxr.ResampleStream(rate_in, self.rate, 1, "float32")
        self.marker = Watermarker(bytes.fromhex(session.bundle.sha256)[:8])  # as write_labelled marks a file
        self.comment = jpeg_comment(session.bundle.sha256, version)
        self.inbox: queue.Queue[np.ndarray | None] = queue.Queue()  # None: the end of the audio
        self.credits = threading.Semaphore(serve.pending_chunks)  # chunks the client may still be sent
        self.stopped = threading.Event()
        self.emit: Callable[[object], None] = lambda item: None
        self.pending = np.zeros(0, np.float32)  # resampled audio from frame `self.frames` on, not yet sent back
        self.frames = 0
        self.holding = False
        self.started: float | None = None  # when the first audio reached the worker
        self.first_frame_s: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        height, width = self.session.portrait.frame.shape[:2]
        return width, height

    # --- the event loop's side -----------------------------------------------------------------------------

    def push(self, samples: np.ndarray) -> None:
        self.inbox.put(samples)

    def finish(self) -> None:
        self.inbox.put(None)

    def sent(self) -> None:
        """The client has been sent one more chunk: the worker may make another."""
        self.credits.release()

    def cancel(self) -> None:
        self.stopped.set()

    # --- the worker's side ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Generate until the audio ends; InputError (a face crop outside the portrait, non-finite motion from a
        broken bundle) becomes a Refusal sent to the client."""
        try:
            self._take_slot()
            frames = stream(self.session, self._audio(), self.conditions, render_batch=self.generate.render_batch,
                            feather=self.generate.feather, hop=self.generate.stream_hop,
                            lookahead=self.generate.stream_lookahead,
                            overlap=self.generate.stream_overlap)  # fmt: skip
            for chunk in frames:
                self._emit_chunk(chunk)
        except Cancelled:
            return
        except InputError as err:
            self.emit(Refusal("generation_failed", str(err), 1011))
            return
        finally:
            self._give_slot()
        self.emit({"frames": self.frames, "audio_seconds": round(self.frames / self.fps, 3),
                   "first_frame_s": None if self.first_frame_s is None else round(self.first_frame_s, 3)})  # fmt: skip

    def _audio(self) -> Iterator[np.ndarray]:
        """The session's audio at the bundle's rate, as it arrives; kept until its frames are sent back."""
        while True:
            pcm = self._idle(self._next_audio)
            last = not isinstance(pcm, np.ndarray)  # None: the end of the audio
            samples = pcm if isinstance(pcm, np.ndarray) else np.zeros(0, np.float32)
            if self.resampler is not None:
                samples = self.resampler.resample_chunk(samples, last=last)
            if self.started is None and len(samples):
                self.started = time.perf_counter()
            self.pending = np.concatenate([self.pending, samples])
            yield samples
            if last:
                return

    def _emit_chunk(self, chunk: np.ndarray) -> None:
        """(F, H, W, 3) uint8 frames -> watermarked, JPEG-encoded, sent after the audio they show."""
        marked = self.marker.apply(chunk)
        start, count = self.frames, len(marked)
        audio, self.pending = self.pending[: count * self.per_frame], self.pending[count * self.per_frame :]
        messages = [HEADER.pack(AUDIO, start) + to_pcm16(audio)]
        for index, frame in enumerate(marked):
            ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY,
                                    self.quality])  # fmt: skip
            if not ok:
                raise InputError(f"frame {start + index}: JPEG encoding failed")
            messages.append(HEADER.pack(FRAME, start + index) + with_comment(jpeg.tobytes(), self.comment))
        self._idle(self._credit)  # at most serve.pending_chunks chunks ahead of the client
        if self.first_frame_s is None and self.started is not None:
            self.first_frame_s = time.perf_counter() - self.started
        self.frames += count
        self.emit(messages)

    def _next_audio(self, timeout: float) -> object:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return _NOTHING

    def _credit(self, timeout: float) -> object:
        return True if self.credits.acquire(timeout=timeout) else _NOTHING

    def _idle(self, take: Callable[[float], object]) -> object:
        """Wait for `take` (audio, or room to send) with the model slot given back."""
        self._give_slot()
        while True:
            if self.stopped.is_set():
                raise Cancelled
            got = take(POLL_S)
            if got is not _NOTHING:
                self._take_slot()
                return got

    def _take_slot(self) -> None:
        while not self.compute.acquire(timeout=POLL_S):
            if self.stopped.is_set():
                raise Cancelled
        self.holding = True

    def _give_slot(self) -> None:
        if self.holding:
            self.holding = False
            self.compute.release()


def open_live(bundle: Bundle, image: bytes, rate_in: int, generate: GenerateConfig, face: FaceConfig,
              serve: ServeConfig, compute: threading.Semaphore, version: str) -> LiveSession:  # fmt: skip
    """Portrait bytes (any image Pillow reads) -> a LiveSession: the face found and measured, the encoders run,
    under a model slot. InputError (not an image, no face, over the pixel limit) names the portrait "portrait"."""
    meta = bundle.meta
    with compute, tempfile.TemporaryDirectory(prefix="vasa-serve-") as folder:
        path = Path(folder) / "portrait"
        path.write_bytes(image)
        try:
            portrait = prepare_portrait(path, bundle.resolution, meta["crop"]["crop_size"], face, serve.max_side)
        except InputError as err:
            raise InputError(str(err).replace(str(path), "portrait")) from None
        conditions = conditions_for(portrait, bundle, generate, steps=generate.stream_steps)  # the stream's DDIM steps
        defaults = {key: f"{key} (the portrait's, the bundle's or params' default)" for key in vars(conditions)}
        check_conditions(vars(conditions), generate, train_steps=meta["sampling"]["train_steps"],
                         emotion_dim=bundle.dit.emotion_dim, names=defaults)  # fmt: skip
        session = open_session(bundle, portrait)
    return LiveSession(session, conditions, rate_in, generate, serve, compute, version)
