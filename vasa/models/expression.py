"""Expression field: how a change of facial expression moves and covers the face, learned on the canonical face.

z_dyn's first EXPRESSION_DIMS dims are the measured FaceMesh expression (mouth opening and width, smile,
eyes, brows; motion_encoder.py). A change of those measures between the source and the target frame is
rendered as a blend of learned fields defined over the canonical face, linear in the change (blendshapes
of motion, as LivePortrait's lip and eye retargeting add a learned keypoint offset for a change of
lip-open or eye-open ratio):

  displacement(p) = sum_k change_k * D_k(c(p))      where the output pixel p reads the source image
  cover(p)        = clamp(sum_k change_k * A_k(c(p)), 0, 1)   how much of p the source cannot show
  colour(p)       = C(c(p))                         what shows there (the mouth interior, teeth)

c(p) is the canonical-face point that the output pixel p shows (x, y in [-1, 1]), so the fields move with
the head, and they are sampled at whatever side the output has (the portrait's own resolution at
generation). No change of expression (the pose swap, the source re-rendered as itself) leaves the image
as it was.

Why an explicit field: the warping generator's flow lives on the appearance volume (16² for `tiny`, 64²
for `base`), where a mouth is 2-4 voxels wide, and its input is a latent the encoder must first learn to
read off 64² pixels; measured on the sample corpus, a 250-step tiny model kept the lips closed with it
alone, and its encoder's mouth estimate stayed flat (docs/BENCHMARKS.md, "A face that talks"). These
fields are linear in a measured change, so what they must learn is direct.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Each field is stored divided by its gain (under Adam the effective step is gain x the learning rate) and
# on its own grid over the canonical face (a fraction of `side`). The displacement moves pixels through
# bilinear sampling, whose gradients are local and noisy: Adam turns noise into steps of its full size in
# random directions, so a fine, fast displacement grid scrambles the face within 100 steps (measured: 32²
# at gain 10). It lives on a coarse grid (side / 4: one cell per ~8 pixels at 64²), where the gradients of
# many pixels average; cover and colour learn directly from the image error, on the full grid. Measured at
# 250 steps (held-out reconstruction's mouth opening std against the driver's 0.110 / 0.117): displacement
# gain 1 -> 0.023 / 0.031, 3 -> 0.030 / 0.049, 10 -> 0.044 / 0.080, and the cover at 32² instead of 16²
# -> 0.080 / 0.125 (docs/BENCHMARKS.md "A face that talks").
GAINS = {"displacement": 10.0, "cover": 10.0, "colour": 3.0}
GRID_FRACTIONS = {"displacement": 4, "cover": 1, "colour": 1}  # grid side = side // fraction
INTERIOR_START = -0.6  # the colour field's initial value in [-1, 1]


class ExpressionField(nn.Module):
    """Fields over the canonical face for `dims` expression measures (grids: GRID_FRACTIONS): displacement and
    cover start at zero (no change rendered), the colour dark (INTERIOR_START)."""

    def __init__(self, dims: int, side: int) -> None:
        super().__init__()
        self.dims = dims
        grid = {name: max(2, side // fraction) for name, fraction in GRID_FRACTIONS.items()}
        self.displacement = nn.Parameter(torch.zeros(1, 2 * dims, grid["displacement"], grid["displacement"]))
        self.cover = nn.Parameter(torch.zeros(1, dims, grid["cover"], grid["cover"]))
        # The colour starts dark (the shadowed inside of an open mouth, ~50/255 grey): the cover learns from its
        # first step that it can show a parted mouth, instead of waiting for a grey colour to darken where no
        # cover shows it yet (the colour's gradient is zero where the cover is).
        start = math.atanh(INTERIOR_START) / GAINS["colour"]
        self.colour = nn.Parameter(torch.full((1, 3, grid["colour"], grid["colour"]), start))

    def _at(self, name: str, grid: torch.Tensor) -> torch.Tensor:
        """Field `name` (times its gain) sampled at grid (B, R, R, 2) -> (B, C, R, R)."""
        field = getattr(self, name) * GAINS[name]
        return F.grid_sample(
            field.expand(grid.shape[0], -1, -1, -1).to(grid.dtype),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )

    def forward(self, change: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """change (B, dims): target minus source expression (EXPRESSION_UNITS); points (B, 2, R, R): the
        canonical (x, y) each output pixel shows. -> displacement (B, 2, R, R) in normalised source-image
        units, cover (B, 1, R, R) in [0, 1], colour (B, 3, R, R) in [-1, 1]."""
        b, _, r, _ = points.shape
        grid = points.permute(0, 2, 3, 1)
        basis = self._at("displacement", grid).view(b, self.dims, 2, r, r)
        displacement = torch.einsum("bk,bkcyx->bcyx", change, basis)
        cover = torch.einsum("bk,bkyx->byx", change, self._at("cover", grid)).clamp(0, 1)[:, None]
        return displacement, cover, torch.tanh(self._at("colour", grid))
