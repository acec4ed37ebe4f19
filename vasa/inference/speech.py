"""The speech side of generation: load any audio file as speech, and the shards' log-mel features computed
from audio arriving in chunks (vasa/inference/generate.py runs these); the user's own audio, as the video
carries it.

Two copies of the user's audio: the model's (mono at the bundle's rate, 16 kHz, `load_speech`: the features
and so the motion) and the one muxed into the video (`AudioTrack`: the file's own rate and channels, read
again from the file while the video is written, so it never sits in memory whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from preprocessing.audio import log_mel, mel_frames_per_video_frame
from preprocessing.media import AAC_RATES
from vasa.core.config import AudioFeatureConfig, GenerateConfig
from vasa.core.errors import InputError

FALLBACK_RATE = 48000  # a source rate that AAC cannot carry (e.g. 192 kHz) is resampled to this

FLOAT_FORMATS = frozenset({"flt", "fltp", "dbl", "dblp"})  # sample formats that can hold NaN or infinity


def load_speech(path: Path, sample_rate: int, fps: float, cfg: GenerateConfig) -> np.ndarray:
    """(N,) float32 mono speech at `sample_rate`; InputError if unreadable, shorter than one frame at `fps`,
    silent, not finite or too long. Decoded as a stream that stops as soon as more than
    generate.max_audio_seconds have arrived, so memory holds at most that much whatever the file's length."""
    if not Path(path).is_file():
        raise InputError(f"{path}: audio not found")
    audio = read_speech(path, sample_rate, cfg.max_audio_seconds)
    seconds = len(audio) / sample_rate
    if seconds < 1 / fps:
        raise InputError(f"{path}: no audio samples (shorter than one frame)")
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < cfg.min_audio_rms:
        raise InputError(f"{path}: the audio is silent (RMS {rms:.2e} < generate.min_audio_rms {cfg.min_audio_rms:g})")
    return audio


def read_speech(path: Path, sample_rate: int, max_seconds: float) -> np.ndarray:
    """The samples preprocessing.decode.read_audio gives (first audio stream, downmixed to mono and resampled
    by the same resampler, in the same calls: the same bytes), read with two checks while decoding: more
    than `max_seconds` is refused once that much has arrived (a declared duration can lie, so it is not
    trusted), and a NaN or infinite sample, in a float source or after resampling, is refused."""
    pieces: list[np.ndarray] = []
    total = 0

    def keep(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for frame in frames:
            samples = frame.to_ndarray().reshape(-1)
            if not np.isfinite(samples).all():
                raise InputError(f"{path}: the audio holds NaN or infinite samples")
            pieces.append(samples)
            total += len(samples)
        if total > max_seconds * sample_rate:
            raise InputError(f"{path}: more than {max_seconds:g} s of audio (generate.max_audio_seconds); split it")

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path}: unreadable audio (no audio stream)")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                if frame.format.name in FLOAT_FORMATS and not np.isfinite(frame.to_ndarray()).all():
                    raise InputError(f"{path}: the audio holds NaN or infinite samples")
                keep(resampler.resample(frame))
            keep(resampler.resample(None))
    except av.error.FFmpegError as err:
        raise InputError(f"{path}: unreadable audio ({err})") from None
    return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)


@dataclass(frozen=True)
class AudioTrack:
    """The user's audio as the video carries it: the first audio stream of `path` at its own rate and
    channels (mono stays mono, stereo stays stereo; more channels are downmixed to stereo, a rate AAC cannot
    carry becomes FALLBACK_RATE), decoded again, one frame at a time, as `chunks` is read."""

    path: Path
    rate: int  # Hz, as muxed
    layout: str  # "mono" | "stereo"

    @property
    def channels(self) -> int:
        return 1 if self.layout == "mono" else 2

    def chunks(self) -> Iterator[np.ndarray]:
        """(n, channels) float32 samples in file order; InputError on a decode error or a non-finite sample
        (`load_speech` has read the file once already, so neither happens unless the file changed)."""
        try:
            with av.open(str(self.path)) as container:
                resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
                for frame in container.decode(container.streams.audio[0]):
                    yield from self._planar(resampler.resample(frame))
                yield from self._planar(resampler.resample(None))
        except av.error.FFmpegError as err:
            raise InputError(f"{self.path}: unreadable audio ({err})") from None

    def _planar(self, frames: list[av.AudioFrame]) -> Iterator[np.ndarray]:
        for frame in frames:
            samples = frame.to_ndarray().T  # (n, channels)
            if not np.isfinite(samples).all():
                raise InputError(f"{self.path}: the audio holds NaN or infinite samples")
            yield samples


def audio_track(path: Path) -> AudioTrack:
    """The `AudioTrack` of an audio file that `load_speech` has accepted: its first audio stream's rate and
    channel count, as the decoder reports them."""
    try:
        with av.open(str(path)) as container:
            context = container.streams.audio[0].codec_context
            rate, channels = int(context.sample_rate), int(context.layout.nb_channels)
    except (av.error.FFmpegError, IndexError) as err:
        raise InputError(f"{path}: unreadable audio ({err})") from None
    return AudioTrack(Path(path), rate if rate in AAC_RATES else FALLBACK_RATE, "mono" if channels == 1 else "stereo")


@dataclass(frozen=True)
class ArrayTrack:
    """Audio already in memory, as an `AudioTrack`: (N,) mono or (N, 2) stereo float32 at `rate`."""

    samples: np.ndarray
    rate: int

    def __post_init__(self) -> None:
        if not (self.samples.ndim == 1 or (self.samples.ndim == 2 and self.samples.shape[1] in (1, 2))):
            raise ValueError(f"audio must be (N,) mono or (N, 2) stereo, got shape {self.samples.shape}")

    @property
    def channels(self) -> int:
        return 1 if self.samples.ndim == 1 else self.samples.shape[1]

    @property
    def layout(self) -> str:
        return "mono" if self.channels == 1 else "stereo"

    def chunks(self) -> Iterator[np.ndarray]:
        yield np.asarray(self.samples, np.float32).reshape(len(self.samples), self.channels)


class AudioFeatures:
    """Log-mel features per video frame, normalised as the motion shards are, from audio in chunks.

    Video frame t owns mel frames [t k, (t + 1) k), centred inside its samples at t P + j hop (P samples
    per frame, j < k); each needs n_fft / 2 samples on both sides, so frame t is complete once sample
    t P + (k - 1) hop + n_fft / 2 has arrived: `lookahead` samples past the frame's own end (40 = 2.5 ms at
    16 kHz, 25 fps, hop 160, n_fft 400). `push` returns the frames whose windows have fully arrived,
    computed on a segment that starts whole frames earlier (the STFT's edge padding only touches those
    history frames, which are dropped) and ends exactly where the last returned frame's last window ends
    (no window touches the right padding); `finish` computes the rest up to the true end as `log_mel` does
    for a whole file. So the features equal `log_mel` over the whole clip whatever the chunking, and memory
    holds only a few frames of history.
    """

    def __init__(self, sample_rate: int, fps: int, cfg: AudioFeatureConfig, stats: dict) -> None:
        self.sample_rate, self.fps, self.cfg = sample_rate, fps, cfg
        self.k = mel_frames_per_video_frame(sample_rate, fps, cfg.hop_length)
        self.per_frame = sample_rate // fps
        self.margin = cfg.n_fft // 2
        self.history = -(-self.margin // self.per_frame)  # whole frames of samples in front of the first new one
        # Samples past frame t's end its last mel window reaches (never negative: a frame is whole first).
        self.lookahead = max(self.margin + (self.k - 1) * cfg.hop_length - self.per_frame, 0)
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.asarray(stats["std"], np.float32)
        self.buffer = np.zeros(0, np.float32)  # samples from `offset` on
        self.offset = 0  # absolute index of buffer[0], a whole number of frames
        self.done = 0  # video frames emitted
        self.total = 0  # samples pushed

    @property
    def dim(self) -> int:
        return self.k * self.cfg.n_mels

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Append (n,) float32 samples; (F, A) features of the frames they complete (F may be 0)."""
        chunk = np.asarray(chunk, np.float32).reshape(-1)
        self.buffer = np.concatenate([self.buffer, chunk])
        self.total += len(chunk)
        complete = (self.total - self.lookahead) // self.per_frame  # frames with every window in
        return self._emit(max(complete, 0), final=False)

    def finish(self) -> np.ndarray:
        """Features of the remaining whole frames, the end treated as the end of the file."""
        return self._emit(self.total // self.per_frame, final=True)

    def _emit(self, end: int, final: bool) -> np.ndarray:
        if end <= self.done:
            return np.zeros((0, self.dim), np.float32)
        first = max(self.done - self.history, 0)
        start = first * self.per_frame - self.offset
        stop = None if final else end * self.per_frame + self.lookahead - self.offset
        mel = log_mel(self.buffer[start:stop], self.sample_rate, self.fps, self.cfg)
        feats = mel[(self.done - first) * self.k : (end - first) * self.k].reshape(-1, self.dim)
        self.done = end
        keep = max(end - self.history, 0) * self.per_frame
        self.buffer = self.buffer[keep - self.offset :]
        self.offset = keep
        return ((feats - self.mean) / self.std).astype(np.float32)
