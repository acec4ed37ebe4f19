"""Appearance encoder (VASA-1 §3.1, MegaPortraits E_app): a face image -> 3D appearance volume V_app."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vasa.models.layers import ConvEncoder2d, ResBlock3d, group_norm
from vasa.models.presets import LatentPreset


class AppearanceEncoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> V_app (B, C, D, S/2**k, S/2**k), unbounded features.

    2D features are lifted to 3D by reshaping C*D channels into C x D (MegaPortraits' "reshape" lift),
    then refined by 3D residual blocks so depth slices can exchange information.
    """

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        self.channels, self.depth = preset.volume_channels, preset.volume_depth
        self.features = ConvEncoder2d(preset.appearance_widths)
        self.norm = group_norm(self.features.out_channels)
        self.lift = nn.Conv2d(self.features.out_channels, self.channels * self.depth, 1)
        self.blocks = nn.Sequential(*(ResBlock3d(self.channels, self.channels) for _ in range(preset.volume_blocks)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.lift(F.silu(self.norm(self.features(image))))  # (B, C*D, H, W)
        b, _, hh, ww = h.shape
        return self.blocks(h.view(b, self.channels, self.depth, hh, ww))
