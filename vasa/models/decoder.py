"""Decoder (VASA-1 §3.1, MegaPortraits G_2d): a warped 3D volume -> the rendered face image."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vasa.models.layers import ResBlock2d, UpBlock2d, group_norm
from vasa.models.presets import LatentPreset


class Decoder(nn.Module):
    """(B, C, D, H, W) volume -> (B, 3, S, S) image in [-1, 1], S = H * 2**len(appearance_widths).

    Orthographic projection to 2D by folding depth into channels (C*D) and a 1x1 conv, then plain
    residual up-blocks (LivePortrait's SPADE decoder is the larger alternative, REFERENCE §7).
    """

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        widths = preset.decoder_widths
        self.project = nn.Conv2d(preset.volume_channels * preset.volume_depth, widths[0], 1)
        self.body = ResBlock2d(widths[0], widths[0])
        self.ups = nn.Sequential(*(UpBlock2d(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.norm = group_norm(widths[-1])
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = volume.shape
        x = self.body(self.project(volume.reshape(b, c * d, h, w)))
        return torch.tanh(self.to_rgb(F.silu(self.norm(self.ups(x)))))
