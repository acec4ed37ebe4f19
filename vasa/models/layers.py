"""Shared building blocks of the stage-1 networks (2D/3D residual blocks, down/up sampling).

GroupNorm everywhere instead of BatchNorm: no running statistics, so a step does not depend on how
the batch is split over ranks or micro-batches (MegaPortraits trains at batch 2 per GPU,
where batch statistics are noise) and CPU runs stay bit-reproducible.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide `channels`."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class Recomputed(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of kept (activation
    checkpointing, torch.utils.checkpoint, non-reentrant): `recompute = True` trades one more forward of
    the block for the memory of its intermediate activations. The gradients are the same."""

    recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.compute, x, use_reentrant=False)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def recompute_blocks(module: nn.Module) -> int:
    """Turn on `recompute` for every `Recomputed` block inside `module`; how many there are."""
    blocks = [m for m in module.modules() if isinstance(m, Recomputed)]
    for block in blocks:
        block.recompute = True
    return len(blocks)


class ResBlock2d(Recomputed):
    """Pre-activation residual block: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (c_in != c_out or stride != 1) else nn.Identity()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ResBlock3d(Recomputed):
    """Pre-activation 3D residual block: (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UpBlock2d(nn.Module):
    """Nearest 2x upsampling then a residual block: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.block = ResBlock2d(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvEncoder2d(nn.Module):
    """Image -> feature map: a stem conv and `len(widths)` stride-2 residual blocks.

    x: (B, 3, S, S) in [-1, 1] -> (B, widths[-1], S / 2**len(widths), S / 2**len(widths)).
    """

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        chans = (widths[0], *widths)
        self.blocks = nn.Sequential(*(ResBlock2d(a, b, stride=2) for a, b in zip(chans[:-1], chans[1:], strict=True)))
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW-contiguous on purpose: frames decoded HWC and permuted arrive channels_last, and the CPU
        # (oneDNN) backward of the 1x1 stride-2 skip conv crashes the process on channels_last input
        # (torch 2.13, double free / segfault; reproduced with a lone Conv2d(8, 16, 1, stride=2)).
        return self.blocks(self.stem(x.contiguous()))


class GlobalEncoder(nn.Module):
    """Image -> vector: ConvEncoder2d, GroupNorm + SiLU, global average pool, linear.

    x: (B, 3, S, S) in [-1, 1] -> (B, dim), unbounded.
    """

    def __init__(self, widths: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.features = ConvEncoder2d(widths)
        self.norm = group_norm(widths[-1])
        self.proj = nn.Linear(widths[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.features(x)))
        return self.proj(h.mean(dim=(2, 3)))
