"""Identity encoder (VASA-1 §3.1 z_id) with its CosFace head trained on the corpus' speaker labels.

No face-recognition weights ship offline, so identity is learned from the shards'
speakers with a large-margin cosine softmax (CosFace, Wang et al. 2018): z_id of frames of one speaker
cluster on the unit sphere. The same network, with its parameters detached, judges the cross-identity
loss (identity must survive re-rendering with another subject's motion).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vasa.models.layers import GlobalEncoder
from vasa.models.presets import LatentPreset


class IdentityEncoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> z_id (B, identity_dim), unit L2 norm."""

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        self.encoder = GlobalEncoder(preset.identity_widths, preset.identity_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(image), dim=-1)


class CosFaceHead(nn.Module):
    """Cosine of z_id to one learned unit vector per speaker: (B, dim) -> (B, n_speakers) in [-1, 1].

    The margin and scale are applied in the loss (`vasa.losses.cosface_loss`), so logits stay plain cosines.
    """

    def __init__(self, dim: int, n_speakers: int) -> None:
        super().__init__()
        if n_speakers < 1:
            raise ValueError(f"CosFace head needs at least one speaker, got {n_speakers}")
        # In place: the same numbers as `/`, but on the meta device (load_bundle's skeleton) an out-of-place
        # op with a Python scalar imports torch._dynamo, a second of every `vasa generate`'s start-up.
        self.weight = nn.Parameter(torch.randn(n_speakers, dim).div_(dim**0.5))

    def forward(self, z_id: torch.Tensor) -> torch.Tensor:
        return F.normalize(z_id, dim=-1) @ F.normalize(self.weight, dim=-1).t()
