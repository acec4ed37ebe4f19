"""Motion encoder (VASA-1 §3.1 z_pose and z_dyn): a face image -> head pose and facial dynamics."""

from __future__ import annotations

import torch
from torch import nn

from preprocessing.schema import EXPRESSION_COLUMNS, POSE_COLUMNS
from vasa.models.layers import GlobalEncoder
from vasa.models.presets import LatentPreset

# z_pose columns, the model's units (see `vasa.models.warping` for how they move the volume).
POSE_DIM = 7  # yaw, pitch, roll (degrees), tx, ty, tz (volume units, [-1, 1] spans the crop), log scale
ANGLE_UNIT_DEG = 30.0  # network outputs angles / 30° so their scale matches the other columns at init
# The first len(EXPRESSION_COLUMNS) dims of z_dyn are the FaceMesh expression (mouth open and width, smile,
# eyes open, brow raise; template units, preprocessing/pose.py), each in units of its typical within-clip
# spread (measured on the sample corpus; FaceMesh's template units make them similar on real video). With
# an expression field (preset.expression_side > 0) they are *measured*, not predicted, wherever the frame
# is rendered or its motion extracted (`with_measured_expression`): the renderer learns to show a lip
# opening it is told exactly, and the DiT learns to generate that measure from the speech. The encoder is
# still supervised on them (loss `expression`): an auxiliary task, and its estimate where no landmarks exist.
EXPRESSION_DIMS = len(EXPRESSION_COLUMNS)
EXPRESSION_UNITS = (0.1, 0.06, 0.04, 0.013, 0.013, 0.023)  # EXPRESSION_COLUMNS order
# Stage 2 generates the measured expression relative to the face at rest, not in absolute terms: a mouth as
# wide, a smile as broad, eyes as open as this face's own (identity, not motion). A training clip's rest is
# a per-column percentile of its frames (mouth opening: the 5th, the mouth closed; the others: the median,
# eyes open between blinks); at generation it is the portrait's own measure (a still at rest). Without it
# the DiT, told nothing of identity, generates the corpus's average face shape, and the renderer stretches
# every portrait toward it (measured: grace_hopper's jaw pulled down by a constant width/smile change).
REST_PERCENTILES = (5.0, 50.0, 50.0, 50.0, 50.0, 50.0)  # EXPRESSION_COLUMNS order
# Likewise the measured head pose (a `measured_pose` model): stage 2 generates it relative to the clip's median
# pose (head turns, nods and sways about the speaker's own rest), and generation adds the portrait's own, so a
# portrait turned away stays turned away and moves about its pose (LivePortrait's "relative" driving, too).
# Absolute, the DiT would turn every portrait toward the corpus's average pose in the first window.
POSE_REST_PERCENTILE = 50.0


class MotionEncoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (z_pose (B, 7), z_dyn (B, dynamics_dim)).

    z_pose = (yaw, pitch, roll in degrees with the project's sign convention (preprocessing/schema.py),
    tx, ty, tz as fractions of the half crop side from the crop centre, log of the head scale relative to
    the preset's canonical scale). z_dyn is unbounded (expression, lips, eyes, blinks); its first
    EXPRESSION_DIMS dims are the FaceMesh expression / EXPRESSION_UNIT when the expression loss is on.
    """

    def __init__(self, preset: LatentPreset) -> None:
        super().__init__()
        self.dynamics_dim = preset.dynamics_dim
        self.encoder = GlobalEncoder(preset.motion_widths, POSE_DIM + preset.dynamics_dim)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(image)
        raw_pose, z_dyn = h[:, :POSE_DIM], h[:, POSE_DIM:]
        angles = raw_pose[:, :3] * ANGLE_UNIT_DEG
        return torch.cat([angles, raw_pose[:, 3:]], dim=1), z_dyn


def with_measured_expression(dyn: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    """z_dyn (B, Z) with its first EXPRESSION_DIMS dims replaced by measured FaceMesh expression (B, E) in
    template units (EXPRESSION_COLUMNS), converted to EXPRESSION_UNITS; rows with a non-finite measure keep
    the encoder's estimate."""
    measured = expression.to(dyn.dtype) / dyn.new_tensor(EXPRESSION_UNITS)
    head = torch.where(measured.isfinite().all(dim=1, keepdim=True), measured, dyn[:, :EXPRESSION_DIMS])
    return torch.cat([head, dyn[:, EXPRESSION_DIMS:]], dim=1)


def shard_pose_to_model(pose: torch.Tensor, crop_size: int, canonical_scale: float) -> torch.Tensor:
    """Shard head pose (B, 7) in POSE_COLUMNS units (degrees, crop pixels) -> z_pose units (B, 7).

    Angles stay in degrees; tx, ty become offsets of the template origin from the crop centre in half
    crop sides, tz likewise (no centre); scale becomes log(scale_px / crop_size / canonical_scale).
    """
    col = {name: i for i, name in enumerate(POSE_COLUMNS)}
    half = crop_size / 2
    angles = pose[:, [col["yaw_deg"], col["pitch_deg"], col["roll_deg"]]]
    txy = pose[:, [col["tx_px"], col["ty_px"]]] / half - 1
    tz = pose[:, [col["tz_px"]]] / half
    log_scale = torch.log(pose[:, [col["scale_px"]]].clamp_min(1e-6) / crop_size / canonical_scale)
    return torch.cat([angles, txy, tz, log_scale], dim=1)


def with_measured_pose(pose: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """z_pose (B, 7) replaced by the measured head pose (B, 7) in z_pose units (`shard_pose_to_model`); rows
    with a non-finite measure keep the encoder's estimate.

    A model with `preset.measured_pose` renders every frame at its FaceMesh pose (training, extract_motion,
    the portrait at generation), as it renders the measured expression: after a short run the encoder's own
    estimate spans a quarter of the real head motion (sample corpus, 250 steps: yaw std 1.3 vs 5.6 degrees,
    r 0.3-0.9 with the measure), so stage 2 learned, and the videos showed, a nearly still head. The encoder
    stays supervised on it (loss `pose`)."""
    measured = measured.to(device=pose.device, dtype=pose.dtype)
    return torch.where(measured.isfinite().all(dim=1, keepdim=True), measured, pose)
