"""Warping generator (VASA-1 §3.1; MegaPortraits W_s->c and W_c->d): moves V_app between poses.

Source -> canonical removes the source head pose and facial dynamics; canonical -> target applies the
target's. Each warp is a rigid similarity transform from z_pose plus a learned non-rigid 3D flow field
predicted from (z_dyn, z_id), applied by backward sampling with `F.grid_sample` in 3D.

Coordinates: normalised volume units, x right, y down, z away from the camera (the pixel frame of
preprocessing/schema.py), each axis spanning [-1, 1] over the volume (align_corners=False: voxel
centres at (2i + 1) / n - 1). Rotation R = Rz(roll) @ Rx(pitch) @ Ry(yaw), angles in degrees, the
project's one sign convention (schema.py), so a posed point is x_posed = s R x_canonical + t.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from vasa.models.layers import ResBlock3d, group_norm
from vasa.models.presets import LatentPreset

FLOW_INIT_GAIN = 0.01  # small (not zero) last layer: the warp starts rigid, yet every layer gets gradients


def rotation_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """(B, 3) yaw, pitch, roll in degrees -> (B, 3, 3) R = Rz(roll) @ Rx(pitch) @ Ry(yaw)."""
    yaw, pitch, roll = torch.deg2rad(angles_deg).unbind(dim=-1)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    cy, sy, cp, sp, cr, sr = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin(), roll.cos(), roll.sin()
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ rx @ ry


def identity_grid(depth: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(D, H, W, 3) voxel-centre coordinates (x, y, z) in [-1, 1], matching grid_sample(align_corners=False)."""

    def axis(n: int) -> torch.Tensor:
        return (torch.arange(n, device=device, dtype=dtype) * 2 + 1) / n - 1

    z, y, x = torch.meshgrid(axis(depth), axis(height), axis(width), indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def split_pose(pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z_pose (B, 7) -> rotation (B, 3, 3), translation (B, 3) volume units, scale (B,) (exp of log scale)."""
    return rotation_matrix(pose[:, :3]), pose[:, 3:6], pose[:, 6].exp()


def canonical_to_posed_grid(pose: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Where a canonical point lands when posed: s R p + t. grid (B, D, H, W, 3) -> same shape."""
    rot, trans, scale = split_pose(pose)
    b = grid.shape[0]
    posed = torch.einsum("bij,bnj->bni", rot, grid.reshape(b, -1, 3)) * scale[:, None, None] + trans[:, None]
    return posed.view_as(grid)


def posed_to_canonical_grid(pose: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Inverse of canonical_to_posed_grid: R^T (q - t) / s. grid (B, D, H, W, 3) -> same shape."""
    rot, trans, scale = split_pose(pose)
    b = grid.shape[0]
    local = (grid.reshape(b, -1, 3) - trans[:, None]) / scale[:, None, None]
    return torch.einsum("bji,bnj->bni", rot, local).view_as(grid)  # R^T: rows and columns swapped


def sample_volume(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Backward warp: out[b, :, d, h, w] = volume[b] at grid[b, d, h, w] (x, y, z in [-1, 1]); zeros outside.

    volume (B, C, D, H, W), grid (B, D', H', W', 3) -> (B, C, D', H', W'), trilinear.
    """
    return F.grid_sample(volume, grid.to(volume.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


class FlowGenerator(nn.Module):
    """(z_dyn, z_id) -> non-rigid 3D flow (B, D, H, W, 3) in volume units, bounded to (-1, 1).

    A linear map to a coarse (C0, D/2**k, H/2**k, W/2**k) grid, then k trilinear 2x upsamplings with 3D
    residual blocks (MegaPortraits' warping generator, without its adaptive normalisation).
    """

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        widths = preset.flow_widths
        ups = len(widths) - 1
        _, depth, height, width = preset.volume_shape
        self.start = (widths[0], depth // 2**ups, height // 2**ups, width // 2**ups)
        self.fc = nn.Linear(preset.dynamics_dim + preset.identity_dim, math.prod(self.start))
        self.blocks = nn.ModuleList(ResBlock3d(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norm = group_norm(widths[-1])
        self.out = nn.Conv3d(widths[-1], 3, 3, padding=1)
        assert self.out.bias is not None  # nn.Conv3d's default bias=True
        with torch.no_grad():
            self.out.weight.mul_(FLOW_INIT_GAIN)
            self.out.bias.zero_()

    def forward(self, z_dyn: torch.Tensor, z_id: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z_dyn, z_id], dim=1)).view(-1, *self.start)
        for block in self.blocks:
            h = block(F.interpolate(h, scale_factor=2.0, mode="trilinear", align_corners=False))
        flow = torch.tanh(self.out(F.silu(self.norm(h))))  # (B, 3, D, H, W)
        return flow.permute(0, 2, 3, 4, 1)


class WarpingGenerator(nn.Module):
    """Both warps of V_app (B, C, D, H, W): `to_canonical` and `from_canonical`, shapes preserved."""

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        self.flow_to_canonical = FlowGenerator(preset)
        self.flow_from_canonical = FlowGenerator(preset)

    def to_canonical_grid(self, pose: torch.Tensor, z_dyn: torch.Tensor, z_id: torch.Tensor, shape) -> torch.Tensor:
        """Where each canonical voxel is read in the source volume: s R (p + flow(p)) + t, (B, D, H, W, 3).
        `shape` = (B, C, D, H, W) of the volume."""
        b, _, d, h, w = shape
        grid = identity_grid(d, h, w, pose.device, pose.dtype).expand(b, d, h, w, 3)
        return canonical_to_posed_grid(pose, grid + self.flow_to_canonical(z_dyn, z_id))

    def from_canonical_grid(self, pose: torch.Tensor, z_dyn: torch.Tensor, z_id: torch.Tensor, shape) -> torch.Tensor:
        """Where each target voxel is read in the canonical volume: R^T (q - t) / s + flow(q), (B, D, H, W, 3)."""
        b, _, d, h, w = shape
        grid = identity_grid(d, h, w, pose.device, pose.dtype).expand(b, d, h, w, 3)
        return posed_to_canonical_grid(pose, grid) + self.flow_from_canonical(z_dyn, z_id)

    def to_canonical(
        self, volume: torch.Tensor, pose: torch.Tensor, z_dyn: torch.Tensor, z_id: torch.Tensor
    ) -> torch.Tensor:
        """V_c(p) = V_s(s R (p + flow(p)) + t): undo the source's dynamics (flow) then its pose (rigid)."""
        return sample_volume(volume, self.to_canonical_grid(pose, z_dyn, z_id, volume.shape))

    def from_canonical(
        self, volume: torch.Tensor, pose: torch.Tensor, z_dyn: torch.Tensor, z_id: torch.Tensor
    ) -> torch.Tensor:
        """V_d(q) = V_c(R^T (q - t) / s + flow(q)): apply the target's pose (rigid) and dynamics (flow)."""
        return sample_volume(volume, self.from_canonical_grid(pose, z_dyn, z_id, volume.shape))


def compose_grids(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """outer evaluated at inner: (B, D, H, W, 3) fields -> (B, D, H, W, 3), trilinear, borders extended.

    With outer = canonical -> source and inner = target -> canonical, the result maps every target voxel
    straight to the source point it shows (the source-image skip path of the decoder reads it).
    """
    field = outer.permute(0, 4, 1, 2, 3)  # (B, 3, D, H, W)
    composed = F.grid_sample(field, inner.to(field.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return composed.permute(0, 2, 3, 4, 1)
