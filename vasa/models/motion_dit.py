"""Motion DiT (VASA-1 §3.2): the diffusion transformer H(X_t, t, C) over holistic facial dynamics and head motion.

One sequence per window: the K context tokens (the previous window's last K motion frames X_pre with their audio
A_pre) followed by the W window tokens (the noisy motion X_t with this window's audio A added per frame), with a
learned position embedding over the K + W positions and full (bidirectional) self-attention. The per-clip
conditions (main gaze g, head distance d, emotion e) and the timestep embedding condition every token through
adaLN-single modulation (PixArt-α §2.3: one shared projection of the condition vector to the six shift/scale/gate
vectors, plus a learned per-block offset): the paper's 8 x 512 x 8-head size then has ~29M parameters, as VASA-1
reports, where per-block adaLN-Zero (DiT) would add 12M. The network predicts the clean window X_0 (x0-prediction).

Classifier-free guidance (VASA-1 §3.2): each condition can be replaced by a learned null embedding, chosen per
sample by `drop` masks (training dropout, and the unconditional passes of guided sampling). A window without a
previous window (`has_pre` False: the start of a clip) always takes the null context.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vasa.models.presets import MotionPreset

CONDITIONS = ("context", "audio", "gaze", "distance", "emotion")  # what `drop` may name
GAZE_UNIT_DEG = 30.0  # gaze (theta, phi) in degrees is divided by this so the inputs are ~unit
FREQUENCY_DIM = 256  # sinusoidal timestep features (DiT)

# The emotion condition: the shards' expression columns that neither the speech (mouth) nor blinks (eyes)
# drive (preprocessing.schema EXPRESSION_COLUMNS).
EMOTION_COLUMNS = ("smile", "brow_raise")


def timestep_embedding(t: Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of the noise level: t (B,) in [0, T) -> (B, dim) in [-1, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D) with per-sample shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over all tokens: (B, N, D) -> (B, N, D)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-norm transformer block modulated by the condition vector (adaLN-single, gates start at 0)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * width, width)
        )
        # Per-block offset of the shared modulation (PixArt-α's scale_shift_table); zero: the block starts as
        # the identity (gates 0), as DiT's adaLN-Zero.
        self.table = nn.Parameter(torch.zeros(6, width))

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        """x (B, N, D); modulation (B, 6, D) from the shared condition projection."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (modulation + self.table).unbind(1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class ConditionEmbedding(nn.Module):
    """A per-clip condition (B, C) -> (B, D), or its learned null embedding where dropped."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width))
        self.null = nn.Parameter(torch.randn(width).mul_(0.02))

    def forward(self, value: Tensor, dropped: Tensor) -> Tensor:
        return torch.where(dropped[:, None], self.null.to(value.dtype), self.mlp(value))


class MotionDiT(nn.Module):
    """H(X_t, t, C) -> X̂_0 for one window.

    motion_dim M = 7 pose columns + dynamics_dim (z_dyn), all normalised to zero mean / unit std;
    audio_dim A = features per video frame (4 log-mel frames x 80 = 320, or 768/1024 for wav2vec2/HuBERT);
    emotion_dim E; window W and context K frames (25 fps). Shapes in `forward`.
    """

    def __init__(
        self, preset: MotionPreset, motion_dim: int, audio_dim: int, emotion_dim: int, window: int, context: int
    ) -> None:
        super().__init__()
        if min(motion_dim, audio_dim, emotion_dim, window, context) < 1:
            raise ValueError(
                f"motion/audio/emotion dims, window and context must be >= 1, got "
                f"{motion_dim}, {audio_dim}, {emotion_dim}, {window}, {context}"
            )
        if context > window:
            # Each window's context is the last K frames of the previous window alone (sliding-window sampler).
            raise ValueError(f"context ({context}) must not exceed window ({window})")
        self.preset, self.motion_dim, self.audio_dim, self.emotion_dim = preset, motion_dim, audio_dim, emotion_dim
        self.window, self.context = window, context
        width = preset.width
        self.noisy_in = nn.Linear(motion_dim, width)  # X_t tokens
        self.context_in = nn.Linear(motion_dim, width)  # X_pre tokens (clean motion: its own projection)
        self.audio_in = nn.Linear(audio_dim, width)  # A and A_pre, added to their frame's token
        self.null_audio = nn.Parameter(torch.randn(width).mul_(0.02))
        self.null_context = nn.Parameter(torch.randn(width).mul_(0.02))  # every context token when X_pre/A_pre dropped
        self.position = nn.Parameter(torch.randn(1, context + window, width).mul_(0.02))
        self.time = nn.Sequential(nn.Linear(FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.gaze = ConditionEmbedding(2, width)
        self.distance = ConditionEmbedding(1, width)
        self.emotion = ConditionEmbedding(emotion_dim, width)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # adaLN-single, shared
        self.blocks = nn.ModuleList(DiTBlock(width, preset.heads, preset.mlp_ratio) for _ in range(preset.layers))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, motion_dim)
        for layer in (self.modulation[-1], self.final_modulation[-1], self.out):  # DiT: zero-initialised heads
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor], drop: dict[str, Tensor] | None = None) -> Tensor:
        """Predict the clean window.

        x_t (B, W, M) noisy motion; t (B,) noise level in [0, T) (integer-valued);
        cond: "motion_pre" (B, K, M), "audio_pre" (B, K, A), "audio" (B, W, A), "has_pre" (B,) bool,
              "gaze" (B, 2) degrees, "distance" (B, 1), "emotion" (B, E);
        drop: optional {condition in CONDITIONS: (B,) bool}, True = use the null embedding for that sample.
        Returns X̂_0 (B, W, M).
        """
        b, w, m = x_t.shape
        k = cond["motion_pre"].shape[1]
        if (w, k, m) != (self.window, self.context, self.motion_dim):
            raise ValueError(
                f"window/context/motion shape ({w}, {k}, {m}) != the model's ({self.window}, {self.context}, "
                f"{self.motion_dim})"
            )
        unknown = set(drop or {}) - set(CONDITIONS)
        if unknown:
            raise KeyError(f"unknown conditions to drop {sorted(unknown)}; known: {list(CONDITIONS)}")
        no = torch.zeros(b, dtype=torch.bool, device=x_t.device)
        dropped = {name: (drop or {}).get(name, no).to(x_t.device) for name in CONDITIONS}
        dropped["context"] = dropped["context"] | ~cond["has_pre"].to(x_t.device)

        audio = self.audio_in(cond["audio"])  # (B, W, D)
        audio = torch.where(dropped["audio"][:, None, None], self.null_audio.to(audio.dtype), audio)
        window_tokens = self.noisy_in(x_t) + audio
        context_tokens = self.context_in(cond["motion_pre"]) + self.audio_in(cond["audio_pre"])  # (B, K, D)
        context_tokens = torch.where(
            dropped["context"][:, None, None], self.null_context.to(context_tokens.dtype), context_tokens
        )
        tokens = torch.cat([context_tokens, window_tokens], dim=1) + self.position  # (B, K+W, D)

        c = (
            self.time(timestep_embedding(t))
            + self.gaze(cond["gaze"] / GAZE_UNIT_DEG, dropped["gaze"])
            + self.distance(cond["distance"], dropped["distance"])
            + self.emotion(cond["emotion"], dropped["emotion"])
        )  # (B, D)
        modulation = self.modulation(c).view(b, 6, -1)
        for block in self.blocks:
            tokens = block(tokens, modulation)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        return self.out(_modulate(self.final_norm(tokens[:, k:]), shift, scale))  # (B, W, M)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
