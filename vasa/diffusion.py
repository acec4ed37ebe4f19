"""Diffusion around the motion DiT (VASA-1 §3.2), apart from the network: noise schedule, training noising,
x0 loss, DDIM sampler, classifier-free guidance and sliding-window generation of arbitrary length.

Conventions: T = `train_steps` discrete noise levels t in [0, T); ᾱ_t the cumulative signal fraction
(x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε). The network predicts x_0 (the paper's ‖X0 − H(Xt, t, C)‖²); DDIM
(Song et al. 2021, eq. 12) turns that into the step x_t -> x_{t'} via ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t).
Motion is per-frame, normalised (zero mean / unit std per dimension) at 25 fps; one window = W frames.
Offline, `sliding_windows` samples windows of W frames one after the other; `WindowStream` samples a window
every `hop` frames as audio arrives, each from the frames already emitted, with a bounded look-ahead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vasa.core.config import DiffusionConfig

if TYPE_CHECKING:
    from vasa.models.motion_dit import MotionDiT

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, W, M), t (B,)) -> x̂_0 (B, W, M)
COSINE_OFFSET = 0.008  # s of the cosine schedule (Nichol & Dhariwal 2021, eq. 17)
MAX_BETA = 0.999  # ibid.: clipped so the last step is not a pure division by zero


class NoiseSchedule:
    """ᾱ_t for t in [0, T), computed in float64 from `cfg.schedule` (cosine or DDPM's linear betas)."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        steps = cfg.train_steps
        if cfg.schedule == "cosine":
            phase = [(i / steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2 for i in range(steps + 1)]
            f = [math.cos(angle) ** 2 for angle in phase]
            betas = torch.tensor([min(1 - f[i + 1] / f[i], MAX_BETA) for i in range(steps)], dtype=torch.float64)
        else:  # linear: DDPM's 1e-4 .. 0.02 over 1000 steps, rescaled so other T keep the same end points of ᾱ
            scale = 1000 / steps
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64).clamp(max=MAX_BETA)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64, decreasing from ~1 to ~0

    @property
    def train_steps(self) -> int:
        return self.cfg.train_steps

    def _gather(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return values.to(like.device)[t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε; x0, noise (B, ...), t (B,) integer in [0, T)."""
        return (
            self._gather(self.alphas_cumprod.sqrt(), t, x0) * x0
            + self._gather((1 - self.alphas_cumprod).sqrt(), t, x0) * noise
        )

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Stratified noise levels (B,) int64: sample i falls in the i-th of B equal slices of [0, T), in a random
        order, so every batch covers all noise levels (lower-variance loss, every loss bucket logged)."""
        u = torch.rand(batch, generator=generator)
        order = torch.randperm(batch, generator=generator)
        t = ((order.double() + u.double()) / batch * self.train_steps).long().clamp_(0, self.train_steps - 1)
        return t.to(device)

    def sampling_timesteps(self, steps: int) -> list[int]:
        """DDIM's descending sub-sequence of `steps` levels, "trailing" spacing: it starts at T − 1 (pure noise;
        Lin et al. 2024 show leading spacing never sees the noisiest level) and ends near T / steps."""
        if not 1 <= steps <= self.train_steps:
            raise ValueError(f"sampling steps must lie in [1, {self.train_steps}], got {steps}")
        return [round(self.train_steps - i * self.train_steps / steps) - 1 for i in range(steps)]


def x0_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample ‖X0 − H(Xt, t, C)‖² averaged over frames and dimensions: (B, W, M) x2 -> (B,)."""
    return (prediction - target).square().flatten(1).mean(1)


def ddim_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    steps: int,
    eta: float,
    generator: torch.Generator,
    device: torch.device,
    noise: Tensor | None = None,
) -> Tensor:
    """Run DDIM from pure noise to x̂_0 of `shape` (B, W, M). The initial noise (`noise` when given) and, for
    eta > 0, the per-step noise are drawn on the CPU from `generator`, so a seed gives the same result on every
    device type."""
    timesteps = schedule.sampling_timesteps(steps)
    alphas = schedule.alphas_cumprod
    x = (torch.randn(shape, generator=generator) if noise is None else noise).to(device)
    for i, t in enumerate(timesteps):
        x0 = denoise(x, torch.full((shape[0],), t, dtype=torch.long, device=device))
        if i == len(timesteps) - 1:
            return x0
        a, a_prev = float(alphas[t]), float(alphas[timesteps[i + 1]])
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator).to(device)
    return x  # unreachable: steps >= 1


def guided_denoiser(model: nn.Module, cond: Mapping[str, Tensor], scales: Mapping[str, float] | None) -> Denoiser:
    """Classifier-free guidance with per-condition scales (VASA-1 §3.2):
        X̂ = (1 + Σ_c λ_c) · H(C) − Σ_c λ_c · H(C | c = ∅).
    Conditions with λ = 0 cost nothing: all scales 0 (or None) is exactly the plain model. The conditional and
    each unconditional pass run as one batched forward call, (1 + #active) x B sequences of K + W frames."""
    active = [(name, float(scale)) for name, scale in sorted((scales or {}).items()) if scale != 0]
    if not active:
        return lambda x, t: model(x, t, dict(cond))
    copies = 1 + len(active)
    batched = {k: torch.cat([v] * copies) for k, v in cond.items() if isinstance(v, Tensor)}
    b = next(iter(cond.values())).shape[0]
    drop = {}
    for index, (name, _) in enumerate(active):
        mask = torch.zeros(copies * b, dtype=torch.bool)
        mask[(index + 1) * b : (index + 2) * b] = True  # copy 0 is the fully conditioned pass
        drop[name] = mask

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out = model(torch.cat([x] * copies), torch.cat([t] * copies), batched, drop).chunk(copies)
        total = sum(scale for _, scale in active)
        guided = (1 + total) * out[0]
        for index, (_, scale) in enumerate(active):
            guided = guided - scale * out[index + 1]
        return guided

    return denoise


def sliding_windows(
    model: MotionDiT,
    schedule: NoiseSchedule,
    audio: Tensor,
    gaze: Tensor,
    distance: Tensor,
    emotion: Tensor,
    *,
    steps: int,
    eta: float,
    scales: Mapping[str, float] | None,
    seed: int,
    motion_pre: Tensor | None = None,
    audio_pre: Tensor | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Generate motion for audio of any length, one window at a time (VASA-1 §3.2 "sliding window").

    audio (B, N, A): features of N video frames (N = 25 x duration in seconds); gaze (B, 2) degrees,
    distance (B, 1), emotion (B, E): per clip. Yields (start frame, motion (B, n, M)) for consecutive windows of
    W = model.window frames (n = W except for the last, cut to N). Window i is conditioned on the last K frames
    generated before it and their audio; the first on `motion_pre` / `audio_pre` (B, K, ·) when given, else the
    null context. The last window's audio is padded by repeating the last frame. Memory is bounded by one window:
    every forward call sees (1 + guided conditions) x B sequences of K + W frames, whatever N.
    """
    window, context = model.window, model.context
    b, n_frames, _ = audio.shape
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    has_pre = torch.full((b,), motion_pre is not None, dtype=torch.bool, device=device)
    if motion_pre is None:
        motion_pre = torch.zeros(b, context, model.motion_dim, device=device)
        audio_pre = torch.zeros(b, context, audio.shape[2], device=device)
    elif audio_pre is None:
        raise ValueError("motion_pre needs audio_pre (the audio of those frames)")
    clip = {"gaze": gaze.to(device), "distance": distance.to(device), "emotion": emotion.to(device)}
    for start in range(0, n_frames, window):
        chunk = _pad(audio[:, start : start + window].to(device), window)
        n = min(window, n_frames - start)
        cond = {**clip, "audio": chunk, "motion_pre": motion_pre, "audio_pre": audio_pre, "has_pre": has_pre}
        frames = _sample(model, schedule, cond, steps, eta, scales, generator)
        motion_pre, audio_pre = frames[:, window - context :], chunk[:, window - context :]
        has_pre = torch.ones_like(has_pre)
        yield start, frames[:, :n]


def _pad(audio: Tensor, frames: int) -> Tensor:
    """(B, n, A) -> (B, frames, A): the audio after the end of the clip repeats its last frame."""
    n = audio.shape[1]
    return audio if n >= frames else torch.cat([audio, audio[:, -1:].expand(-1, frames - n, -1)], dim=1)


@torch.no_grad()
def _sample(
    model: MotionDiT,
    schedule: NoiseSchedule,
    cond: dict[str, Tensor],
    steps: int,
    eta: float,
    scales: Mapping[str, float] | None,
    generator: torch.Generator,
    known: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """One window (B, W, M) by guided DDIM; `known` (B, j, M): its first j frames are given (see `inpainting`);
    `noise` (B, W, M): the initial noise (else drawn from `generator`)."""
    denoise = guided_denoiser(model, cond, scales)
    if known is not None and known.shape[1]:
        denoise = inpainting(denoise, known)
    b, device = cond["audio"].shape[0], cond["audio"].device
    return ddim_sample(denoise, schedule, (b, model.window, model.motion_dim), steps, eta, generator, device, noise)


def inpainting(denoise: Denoiser, known: Tensor) -> Denoiser:
    """The window's first j frames fixed to `known` (B, j, M): every x̂_0 the denoiser predicts has them
    overwritten, so each DDIM step re-noises the known frames and the model completes the rest around them
    (the motion in-betweening of MDM, Tevet et al. 2023). The sample's first j frames are then exactly
    `known`."""
    j = known.shape[1]

    def denoise_known(x: Tensor, t: Tensor) -> Tensor:
        x0 = denoise(x, t)
        return torch.cat([known.to(x0.dtype), x0[:, j:]], dim=1)

    return denoise_known


@dataclass(frozen=True)
class Emitted:
    """What `WindowStream` yields per sampled window: frames [start, start + count) are final; `motion`
    (B, n >= count, M) holds them followed by the window's own continuation (frames whose audio had not all
    arrived, never past the clip's end): a right-hand side for zero-phase filters, not to be shown."""

    start: int
    count: int
    motion: Tensor


class WindowStream:
    """Sliding-window generation as audio features arrive (low-latency streaming).

    A window of W frames is sampled as soon as the audio of its first `hop` new frames and `lookahead` frames
    after them has arrived; its first `hop` frames are emitted, and the next window starts from the frames
    emitted so far: conditioned on the last K of them and their audio (VASA-1 §3.2's X_pre / A_pre), or, while
    fewer than K exist, by sampling the clip's first window again with them held fixed (`inpainting`, null
    context as at the start of a clip). With `overlap` m > 0 a window starts m frames before its first new one,
    those m shown frames held fixed the same way and the K before them its context: the new frames come from
    mid-window, continuing the held motion, rather than from just after a context seam, where a briefly
    trained DiT's head pose is least consistent (yaw-change autocorrelation of the rendered video, held-out
    sentences: docs/BENCHMARKS.md "Low-latency streaming"). The window's frames whose audio has not arrived
    repeat the last frame heard, as `sliding_windows` pads a clip's end (the DiT's null audio embedding there
    instead, tried first, damped the mouth: opening std -17 % on the demo's clips, docs/BENCHMARKS.md). Every
    window starts from the same per-frame noise where it overlaps the others (`_noise`).

    So every emitted frame saw `lookahead` frames of audio after it (more at the clip's end), and the first
    frame comes out when hop + lookahead frames of features exist. hop = W is the offline stream window for
    window (window at frame s seeded `seed + s`, as `vasa.inference.generate.stream` always seeded them); the
    DiT then runs once per W frames, and W / hop times as often with a shorter hop. The result does not depend
    on how the features are split between `push` calls.
    """

    def __init__(
        self,
        model: MotionDiT,
        schedule: NoiseSchedule,
        gaze: Tensor,
        distance: Tensor,
        emotion: Tensor,
        *,
        steps: int,
        eta: float,
        scales: Mapping[str, float] | None,
        seed: int,
        hop: int,
        lookahead: int,
        overlap: int = 0,
    ) -> None:
        if hop < 1 or lookahead < 0 or overlap < 0:
            raise ValueError(f"hop must be >= 1, lookahead and overlap >= 0, got {hop}, {lookahead}, {overlap}")
        self.model, self.schedule, self.steps, self.eta, self.scales = model, schedule, steps, eta, scales
        self.seed = seed
        self.hop, self.lookahead = min(hop, model.window), lookahead
        # Past frames inside each window: the K conditioning frames before the window and the new frames after
        # the held ones must both fit in the last W frames kept (so at most W - K and W - hop - lookahead).
        self.overlap = max(0, min(overlap, model.window - model.context, model.window - self.hop - lookahead))
        self.device = next(model.parameters()).device
        self.clip = {"gaze": gaze.to(self.device), "distance": distance.to(self.device),
                     "emotion": emotion.to(self.device)}  # fmt: skip
        b = gaze.shape[0]
        self.audio = torch.zeros(b, 0, model.audio_dim, device=self.device)  # (B, frames, A) from `offset` on
        self.motion = torch.zeros(b, 0, model.motion_dim, device=self.device)  # emitted, from `offset` on
        self.offset = 0  # absolute frame of audio[:, 0] and motion[:, 0]
        self.emitted = 0
        # Low latency: one initial noise per clip frame, shared by every window that covers the frame
        # (the noise reuse of FreeNoise, Qiu et al. 2024), so overlapping windows start alike and their samples
        # agree where they overlap instead of committing `hop` frames of a new random draw every time.
        self.noise_generator = torch.Generator().manual_seed(seed)
        self.noise = torch.zeros(b, 0, model.motion_dim)  # (B, frames, M) on the CPU, from `noise_offset` on
        self.noise_offset = 0

    def needed(self, start: int) -> int:
        """Frames of audio (from the clip's start) the window that emits frame `start` on waits for."""
        first = self._window_start(start)
        return min(start + self.hop + self.lookahead, first + self.model.window)

    def push(self, audio: Tensor) -> Iterator[Emitted]:
        """Features (B, n, A) of the next n frames; the windows they complete."""
        self.audio = torch.cat([self.audio, audio.to(self.device, self.audio.dtype)], dim=1)
        while self.offset + self.audio.shape[1] >= self.needed(self.emitted):
            yield self._window(final=False)

    def finish(self) -> Iterator[Emitted]:
        """The audio has ended: the windows of its remaining frames."""
        while self.emitted < self.offset + self.audio.shape[1]:
            yield self._window(final=True)

    def _window_start(self, start: int) -> int:
        """First frame of the window that emits frames from `start` on: `overlap` frames before `start` (the
        shown frames there held fixed, as below), or 0 (the clip's first window, sampled again around the frames
        already emitted) while fewer than K frames would precede it."""
        first = start - self.overlap
        return first if first >= self.model.context else 0

    def _noise(self, first: int) -> Tensor:
        """The initial noise (B, W, M) of the window from frame `first` on: frame f's is the same in every window,
        drawn W frames at a time from the seed."""
        window, b = self.model.window, self.noise.shape[0]
        while self.noise_offset + self.noise.shape[1] < first + window:
            fresh = torch.randn(b, window, self.model.motion_dim, generator=self.noise_generator)
            self.noise = torch.cat([self.noise, fresh], dim=1)
        self.noise = self.noise[:, first - self.noise_offset :]
        self.noise_offset = first
        return self.noise[:, :window]

    def _window(self, final: bool) -> Emitted:
        window, context = self.model.window, self.model.context
        start = self.emitted
        first = self._window_start(start)
        frames = self.offset + self.audio.shape[1]  # audio received
        heard = frames if final else self.needed(start)  # frames the window hears: no more than it waits for
        audio = self.audio[:, first - self.offset : heard - self.offset]
        cond = {**self.clip, "audio": _pad(audio, window)}  # not yet heard: the last heard frame repeated
        b = audio.shape[0]
        if first >= context:
            lo = first - context - self.offset
            pre = {"motion_pre": self.motion[:, lo : lo + context], "audio_pre": self.audio[:, lo : lo + context],
                   "has_pre": torch.ones(b, dtype=torch.bool, device=self.device)}  # fmt: skip
        else:
            pre = {"motion_pre": torch.zeros(b, context, self.model.motion_dim, device=self.device),
                   "audio_pre": torch.zeros(b, context, self.model.audio_dim, device=self.device),
                   "has_pre": torch.zeros(b, dtype=torch.bool, device=self.device)}  # fmt: skip
        generator = torch.Generator().manual_seed(self.seed + start)
        held = self.motion[:, first - self.offset : start - self.offset]  # emitted frames inside the window
        noise = None if self.hop == window else self._noise(first)  # hop = W: offline's noise, window by window
        sampled = _sample(self.model, self.schedule, cond | pre, self.steps, self.eta, self.scales, generator, held,
                          noise)  # fmt: skip
        end = min(first + window, frames) if final else first + window  # never past the clip's end
        count = min(self.hop, end - start)
        self.motion = torch.cat([self.motion, sampled[:, start - first : start - first + count]], dim=1)
        self.emitted = start + count
        keep = max(self.emitted - window, 0)  # context and held frames come from the last W emitted frames
        self.audio, self.motion = self.audio[:, keep - self.offset :], self.motion[:, keep - self.offset :]
        self.offset = keep
        return Emitted(start, count, sampled[:, start - first : end - first])


def generate(
    model: MotionDiT,
    schedule: NoiseSchedule,
    audio: Tensor,
    gaze: Tensor,
    distance: Tensor,
    emotion: Tensor,
    *,
    steps: int,
    eta: float,
    scales: Mapping[str, float] | None,
    seed: int,
) -> Tensor:
    """Normalised motion (B, N, M) for audio features (B, N, A): exactly one frame per audio frame
    (25 x duration). See `sliding_windows` for the conditions and the memory bound."""
    out = torch.empty(audio.shape[0], audio.shape[1], model.motion_dim)
    for start, frames in sliding_windows(
        model, schedule, audio, gaze, distance, emotion, steps=steps, eta=eta, scales=scales, seed=seed
    ):
        out[:, start : start + frames.shape[1]] = frames.cpu()
    return out
