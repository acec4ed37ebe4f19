"""Decoder (VASA-1 §3.1, MegaPortraits G_2d): a warped 3D volume -> the rendered face image."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vasa.models.expression import ExpressionField
from vasa.models.layers import ResBlock2d, UpBlock2d, group_norm
from vasa.models.motion_encoder import EXPRESSION_DIMS
from vasa.models.presets import LatentPreset

# Initial mixing logits of (rendered, warped source, unchanged source): training starts close to showing
# the source image (the copy baseline: 84 % of each pixel from the source, the warp starting near identity)
# instead of an untrained rendering, and learns where to depart from it. The warped source starts with as
# much weight as the unchanged one: at (0, 0, 2) it had 11 %, its gradient was scaled down by that weight,
# and one seed in three collapsed onto the unchanged source and the rendering (docs/BENCHMARKS.md).
MIX_INIT_BIAS = (0.0, 1.0, 1.0)


class Decoder(nn.Module):
    """(B, C, D, H, W) volume -> (B, 3, S, S) image in [-1, 1], S = H * 2**len(appearance_widths).

    Orthographic projection to 2D by folding depth into channels (C*D) and a 1x1 conv, then plain
    residual up-blocks (LivePortrait's SPADE decoder is the larger alternative).

    With `preset.source_skip` the decoder also reads the source image itself (FOMM/face-vid2vid's
    occlusion-aware output, LivePortrait's paste-back in spirit): the 3D warp composed from target voxel
    to source point is collapsed over depth by learned per-pixel depth weights into a 2D flow, the
    source image is sampled along it, and a per-pixel softmax mixes (rendered, warped source, unchanged
    source). Pixels the motion does not move (background, static hair) need not be re-synthesised from
    the low-resolution volume; the rendering fills what the warp cannot explain (mouth interior, eyes).

    The target's facial dynamics z_dyn also modulate the decoder's features directly (FiLM: per-channel
    scale and shift, identity at initialisation): an open mouth or a closed eye is something the warp of
    a closed-mouth, open-eyed source volume cannot show, and this path lets a small model learn to draw
    it within a short run (measured: without it the tiny model's reconstructions kept the source's mouth).

    With `preset.expression_side` (and the skip path) a change of the expression measures between source
    and target also moves and covers the source's pixels through learned fields on the canonical face
    (vasa/models/expression.py): the lips part and the mouth interior shows at the output's own side.
    """

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        widths = preset.decoder_widths
        folded = preset.volume_channels * preset.volume_depth
        self.project = nn.Conv2d(folded, widths[0], 1)
        self.body = ResBlock2d(widths[0], widths[0])
        self.film = nn.Linear(preset.dynamics_dim, 2 * widths[0])  # z_dyn -> (scale, shift) per channel
        with torch.no_grad():
            self.film.weight.zero_()
            self.film.bias.zero_()
        self.ups = nn.Sequential(*(UpBlock2d(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.norm = group_norm(widths[-1])
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)
        self.source_skip = preset.source_skip
        if self.source_skip:
            self.depth_weights = nn.Conv2d(folded, preset.volume_depth, 1)
            self.mix = nn.Conv2d(widths[-1], 3, 3, padding=1)
            assert self.mix.bias is not None  # nn.Conv2d's default bias=True
            with torch.no_grad():
                self.mix.weight.mul_(0.1)
                self.mix.bias.copy_(torch.tensor(MIX_INIT_BIAS))
        self.expression = (
            ExpressionField(EXPRESSION_DIMS, preset.expression_side)
            if self.source_skip and preset.expression_side
            else None
        )

    def forward(
        self,
        volume: torch.Tensor,
        source_points: torch.Tensor | None = None,
        source_image: torch.Tensor | None = None,
        source_hires: torch.Tensor | None = None,
        dynamics: torch.Tensor | None = None,
        canonical_points: torch.Tensor | None = None,
        expression_change: torch.Tensor | None = None,
        parts: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """volume (B, C, D, H, W); with the skip path also source_points (B, D, H, W, 3): the source-volume
        coordinate (x, y, z in [-1, 1]) each voxel shows, and source_image (B, 3, S, S) in [-1, 1].

        `source_hires` (B, 3, R, R) in [-1, 1], the same source crop at any side R >= S (the portrait at its
        own resolution): the flow and the mixing weights, computed at S, are upsampled to R and applied to
        it, so the output (B, 3, R, R) moves the source's own pixels (FOMM, face-vid2vid, LivePortrait)
        and re-synthesises (the upsampled rendering) only where the warp cannot show. Training calls this
        same path with R = S. `dynamics` (B, Z): the target's z_dyn (FiLM; None leaves the features as
        they are). `canonical_points` (B, D, H, W, 3): the canonical-face point each voxel shows, and
        `expression_change` (B, EXPRESSION_DIMS): target minus source expression, drive the expression
        field (both or neither; ignored by a decoder without one). `parts`, a dict to fill: receives "warped",
        the source moved by the flow alone (the mix's warped term), for a loss that trains the flow whatever
        weight the mix gives it."""
        b, c, d, h, w = volume.shape
        folded = volume.reshape(b, c * d, h, w)
        features = self.body(self.project(folded))
        if dynamics is not None:
            scale, shift = self.film(dynamics)[:, :, None, None].chunk(2, dim=1)
            features = features * (1 + scale) + shift
        features = F.silu(self.norm(self.ups(features)))
        rendered = torch.tanh(self.to_rgb(features))
        if not self.source_skip:
            return rendered
        if source_points is None or source_image is None:
            raise ValueError("this decoder has the source skip path: pass source_points and source_image")
        depth = torch.softmax(self.depth_weights(folded), dim=1)  # (B, D, H, W)
        flow = _collapse(source_points, depth)
        mix = torch.softmax(self.mix(features), dim=1)  # (B, 3, S, S): rendered, warped, unchanged source
        expression = not (self.expression is None or canonical_points is None or expression_change is None)
        if expression:
            # The expression fields are read at the model's side S and upsampled to the output's side R with
            # the mix: upsampling their outputs (6 channels) instead of the points (then sampling 21 channels at
            # R) cut a 512² render of `tiny` from 88 to ~70 CPU-ms; on make repro's bundle the frames are within
            # 49-51 dB PSNR of the old path, no visible change. Training (R = S) is bit for bit the same.
            assert self.expression is not None and canonical_points is not None and expression_change is not None
            points = F.interpolate(_collapse(canonical_points, depth), size=rendered.shape[-2:], mode="bilinear",
                                   align_corners=False)  # fmt: skip
            displacement, cover, colour = self.expression(expression_change, points)
        source = source_image if source_hires is None else source_hires
        side = source.shape[-2:]
        flow = F.interpolate(flow, size=side, mode="bilinear", align_corners=False)
        if side != rendered.shape[-2:]:
            rendered = F.interpolate(rendered, size=side, mode="bicubic", align_corners=False).clamp(-1, 1)
            parts_at_s = [mix, *((displacement, cover, colour) if expression else ())]
            sizes = [f.shape[1] for f in parts_at_s]  # one bilinear upsampling for all of them
            upsampled = F.interpolate(torch.cat(parts_at_s, dim=1), size=side, mode="bilinear", align_corners=False)
            mix, *rest = upsampled.split(sizes, dim=1)
            if expression:
                displacement, cover, colour = rest
        # The portrait's own pixels (generation) are resampled bicubic: bilinear averages neighbours at every
        # sub-pixel shift and halves a fine-grained photo's high frequencies (measured: docs/BENCHMARKS.md).
        mode = "bilinear" if source_hires is None else "bicubic"
        if not expression:
            warped = _sample(source, flow, mode)
            if parts is not None:
                parts["warped"] = warped
            return mix[:, :1] * rendered + mix[:, 1:2] * warped + mix[:, 2:] * source
        warped = _sample(source, flow + displacement, mode)
        if parts is not None:
            parts["warped"] = warped
        identity = torch.eye(2, 3, dtype=flow.dtype, device=flow.device)[None]  # one grid, shared by the batch
        still = F.affine_grid(identity, [1, 3, *side], align_corners=False).permute(0, 3, 1, 2)
        image = mix[:, :1] * rendered + mix[:, 1:2] * warped + mix[:, 2:] * _sample(source, still + displacement, mode)
        return (1 - cover) * image + cover * colour


def _collapse(points: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, 3) per-voxel points, (B, D, H, W) depth weights -> (B, 2, H, W): their weighted x, y."""
    return (points[..., :2] * depth[..., None]).sum(dim=1).permute(0, 3, 1, 2)


def _sample(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """image (B, 3, R, R) read at flow (B, 2, R, R) (x, y in [-1, 1]), borders extended; bicubic is clamped to
    [-1, 1] (it overshoots at edges)."""
    out = F.grid_sample(image, flow.permute(0, 2, 3, 1), mode=mode, padding_mode="border", align_corners=False)
    return out if mode == "bilinear" else out.clamp(-1, 1)
