"""Diffusion around the motion DiT (VASA-1 §3.2), apart from the network: noise schedule, training noising,
x0 loss, DDIM sampler, classifier-free guidance and sliding-window generation of arbitrary length.

Conventions: T = `train_steps` discrete noise levels t in [0, T); ᾱ_t the cumulative signal fraction
(x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε). The network predicts x_0 (the paper's ‖X0 − H(Xt, t, C)‖²); DDIM
(Song et al. 2021, eq. 12) turns that into the step x_t -> x_{t'} via ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t).
Motion is per-frame, normalised (zero mean / unit std per dimension) at 25 fps; one window = W frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
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
) -> Tensor:
    """Run DDIM from pure noise to x̂_0 of `shape` (B, W, M). The initial noise (and, for eta > 0, the per-step
    noise) is drawn on the CPU from `generator`, so a seed gives the same result on every device type."""
    timesteps = schedule.sampling_timesteps(steps)
    alphas = schedule.alphas_cumprod
    x = torch.randn(shape, generator=generator).to(device)
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
        chunk = audio[:, start : start + window].to(device)
        n = chunk.shape[1]
        if n < window:
            chunk = torch.cat([chunk, chunk[:, -1:].expand(b, window - n, -1)], dim=1)
        cond = {**clip, "audio": chunk, "motion_pre": motion_pre, "audio_pre": audio_pre, "has_pre": has_pre}
        with torch.no_grad():
            frames = ddim_sample(
                guided_denoiser(model, cond, scales), schedule, (b, window, model.motion_dim), steps, eta, generator,
                device,
            )  # fmt: skip
        motion_pre, audio_pre = frames[:, window - context :], chunk[:, window - context :]
        has_pre = torch.ones_like(has_pre)
        yield start, frames[:, :n]


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
