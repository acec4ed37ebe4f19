"""Audio features aligned to video frames: log-mel spectrograms and pretrained speech-encoder states.

VASA-1 conditions its motion DiT on Wav2Vec2 features (arXiv 2404.10667, sec. 3.2); peers use HuBERT
or log-mel. Both features here come out at a whole number of vectors per video frame, so frame t of a
clip owns mel rows [t * k, (t + 1) * k) and encoder row t.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from vasa.core.config import AudioFeatureConfig

# Floor added to the mel power before the log: ~83 dB below a full-scale sine (mel power ~209 with
# the default params), ~35 dB above 16-bit quantisation noise. Below it lie only codec artefacts (AAC
# zeroes whole bands: power 0 or 1e-9 on the fixtures), which power_to_db(amin=1e-10) would turn into
# -100 dB spikes that differ between codecs; here they all map to ~log(1e-6) = -13.8. The reference is
# fixed (no top_db, no per-clip max), so a frame's feature never depends on the rest of the clip.
LOG_FLOOR = 1e-6


def mel_frames_per_video_frame(sample_rate: int, fps: int, hop_length: int) -> int:
    """k: mel frames per video frame. sample_rate / fps must be a whole multiple of hop_length."""
    if sample_rate % fps or (sample_rate // fps) % hop_length:
        raise ValueError(
            f"sample_rate / fps = {sample_rate / fps:g} samples per video frame is not a whole multiple of "
            f"hop_length {hop_length}"
        )
    return sample_rate // fps // hop_length


def log_mel(audio: np.ndarray, sample_rate: int, fps: int, cfg: AudioFeatureConfig) -> np.ndarray:
    """Natural log of the mel power spectrogram, log(mel + LOG_FLOOR): (T * k, n_mels) float32.

    `audio` is (N,) mono in [-1, 1]; T = N // (sample_rate // fps) video frames and k as in
    `mel_frames_per_video_frame`. With center=True mel frame j is centred on sample j * hop_length,
    so the k frames of video frame t are centred inside it; the one extra frame librosa returns
    (centred on the last sample) is dropped.
    """
    import librosa  # here: a second of import that the shard writer (mel_frames_per_video_frame) never needs

    k = mel_frames_per_video_frame(sample_rate, fps, cfg.hop_length)
    n_video = len(audio) // (sample_rate // fps)
    if n_video == 0:
        return np.zeros((0, cfg.n_mels), dtype=np.float32)
    spectrum = (
        np.abs(
            librosa.stft(np.asarray(audio, dtype=np.float32), n_fft=cfg.n_fft, hop_length=cfg.hop_length, center=True)
        )
        ** 2
    )  # (1 + n_fft // 2, 1 + N // hop_length) power
    basis = librosa.filters.mel(sr=sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    # The mel projection as a plain einsum, not a BLAS matmul (librosa's path): BLAS sums in an order
    # that depends on its thread count, which differs between a main process and a Dask worker, and
    # shards must be byte-identical wherever they are made.
    power = np.einsum("mf,ft->mt", basis, spectrum, optimize=False)  # (n_mels, frames)
    mel = np.log(power[:, : n_video * k] + LOG_FLOOR).T  # (T * k, n_mels); 1 + N // hop >= T * k always
    return np.ascontiguousarray(mel, dtype=np.float32)


class SpeechEncoder:
    """A pretrained wav2vec2/HuBERT encoder loaded from a LOCAL directory (transformers
    AutoFeatureExtractor/AutoModel, local_files_only=True; no network)."""

    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        # transformers is imported here, not at module level: it takes seconds and only this class needs it.
        from transformers import AutoFeatureExtractor, AutoModel

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"speech encoder directory not found: {self.directory}")
        self.device = device
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(self.directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.directory, local_files_only=True).to(device).eval()
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        config = self.model.config
        if not (hasattr(config, "conv_stride") and hasattr(config, "conv_kernel")):
            raise ValueError(f"{self.directory}: {config.model_type} is not a convolutional speech encoder")
        # The conv feature extractor (no padding) maps samples to states: state n sees samples
        # [n * stride, n * stride + field), so its centre is at n * stride + (field - 1) / 2.
        self.stride = int(np.prod(config.conv_stride))
        field = 1
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride), strict=True):
            field = (field - 1) * stride + kernel
        self.receptive_field = field
        self.dim = int(config.hidden_size)

    def encode(self, audio: np.ndarray, sample_rate: int, fps: int) -> np.ndarray:
        """Last hidden states at one vector per video frame: (T, D) float32, T = len(audio) // (sample_rate // fps).

        States (~50 Hz for wav2vec2/HuBERT) are linearly interpolated in time to the centres of the
        video frames, (t + 0.5) / fps s, from the centres of their receptive fields.
        """
        import soxr
        import torch

        n_video = len(audio) // (sample_rate // fps)
        if n_video == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        audio = np.asarray(audio, dtype=np.float32)
        if sample_rate != self.sample_rate:
            audio = soxr.resample(audio, sample_rate, self.sample_rate, quality="HQ")
        if len(audio) < self.receptive_field:  # too short for even one state
            audio = np.pad(audio, (0, self.receptive_field - len(audio)))
        # Per-utterance normalisation (zero mean, unit variance) when the extractor asks for it.
        inputs = self.feature_extractor(audio, sampling_rate=self.sample_rate, return_tensors="pt")
        with torch.inference_mode():
            states = self.model(inputs.input_values.to(self.device)).last_hidden_state[0]  # (S, D)
        states = states.float().cpu().numpy()
        state_times = (np.arange(len(states)) * self.stride + (self.receptive_field - 1) / 2) / self.sample_rate
        frame_times = (np.arange(n_video) + 0.5) / fps
        return _interpolate(states, state_times, frame_times)


def _interpolate(values: np.ndarray, times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Rows of `values` (S, D) sampled at times `times` (S,), linearly interpolated at `at` (T,),
    held constant beyond either end: (T, D) float32."""
    position = np.clip(np.interp(at, times, np.arange(len(times), dtype=np.float64)), 0, len(times) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(times) - 1)
    weight = (position - low)[:, None]
    return ((1 - weight) * values[low] + weight * values[high]).astype(np.float32)


@functools.cache
def _cached_encoder(directory: str) -> SpeechEncoder:
    return SpeechEncoder(directory)


def get_encoder(directory: str | Path) -> SpeechEncoder:
    """The SpeechEncoder for `directory`, loaded once per process (on CPU)."""
    return _cached_encoder(str(Path(directory).resolve()))
