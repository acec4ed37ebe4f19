"""Multi-scale PatchGAN discriminator (pix2pixHD; MegaPortraits' adversarial and feature-matching losses)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vasa.models.presets import LatentPreset


class PatchDiscriminator(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (features: list of (B, C_k, S/2**k, S/2**k), logits (B, 1, h, w)).

    Stride-2 4x4 convs with LeakyReLU; spectral normalisation keeps the hinge game stable without
    batch statistics (GroupNorm-free: a patch's score must not depend on its batch neighbours).
    """

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        chans = (3, *widths)
        self.layers = nn.ModuleList(
            nn.utils.parametrizations.spectral_norm(nn.Conv2d(a, b, 4, stride=2, padding=1))
            for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = nn.utils.parametrizations.spectral_norm(nn.Conv2d(widths[-1], 1, 3, padding=1))

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features, h = [], image
        for layer in self.layers:
            h = F.leaky_relu(layer(h), 0.2)
            features.append(h)
        return features, self.head(h)


class MultiScaleDiscriminator(nn.Module):
    """One PatchDiscriminator per scale (full, 1/2, 1/4, ...): a list with one (features, logits) per scale."""

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        self.scales = nn.ModuleList(
            PatchDiscriminator(preset.discriminator_widths) for _ in range(preset.discriminator_scales)
        )

    def forward(self, image: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        outputs = []
        image = image.contiguous()  # NCHW: see ConvEncoder2d (oneDNN crash on channels_last input)
        for k, disc in enumerate(self.scales):
            x = image if k == 0 else F.avg_pool2d(image, 2**k)
            outputs.append(disc(x))
        return outputs
