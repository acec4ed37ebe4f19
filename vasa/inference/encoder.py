"""The stage-1 motion encoder at inference: a trained stage-1 output folder -> per frame [z_pose, z_dyn].

Used by stage `extract_motion` (the DiT's training data) and by generation (the portrait's own motion).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vasa.core.errors import InputError
from vasa.core.weights import load_weights
from vasa.models.images import to_tensor
from vasa.models.motion_encoder import shard_pose_to_model, with_measured_expression, with_measured_pose

log = logging.getLogger(__name__)


GENERATOR = "generator"  # the stage-1 module holding the motion encoder (vasa/training/latent_task.py)


@dataclass
class Stage1Encoder:
    """The stage-1 motion encoder with its EMA weights: (B, 3, S, S) in [-1, 1] -> (B, 7 + Z)."""

    module: torch.nn.Module
    resolution: int  # S
    weights_sha256: str  # of the generator's safetensors file (from model.json, verified on load)
    device: torch.device
    measured_expression: bool = False  # z_dyn's first dims are the measured FaceMesh expression (an expression field)
    measured_pose: bool = False  # z_pose is the measured head pose (preset.measured_pose)
    canonical_scale: float = 0.25  # the preset's: converts a measured head pose to z_pose units

    @torch.no_grad()
    def encode(
        self,
        frames: np.ndarray,
        batch_size: int,
        expression: np.ndarray | None = None,
        pose: np.ndarray | None = None,
        crop_size: int | None = None,
    ) -> np.ndarray:
        """(T, S, S, 3) uint8 RGB -> (T, 7 + Z) float32 [z_pose, z_dyn], `batch_size` frames at a time.
        `expression` (T, E): the frames' measured FaceMesh expression (template units), which replaces the
        encoder's estimate in z_dyn's first dims when the model renders measured expression; `pose` (T, 7):
        their measured head pose (POSE_COLUMNS, pixels of a `crop_size` crop), which replaces z_pose when the
        model renders measured pose. Frames whose measure is not finite keep the encoder's estimate."""
        if pose is not None and self.measured_pose and crop_size is None:
            raise ValueError("a measured head pose needs the crop_size its pixels refer to")
        out = []
        for start in range(0, len(frames), batch_size):
            batch = torch.stack([to_tensor(f) for f in frames[start : start + batch_size]]).to(self.device)
            z_pose, dyn = self.module(batch)
            if expression is not None and self.measured_expression:
                measured = torch.from_numpy(np.asarray(expression[start : start + batch_size], np.float32))
                dyn = with_measured_expression(dyn, measured.to(dyn.device))
            if pose is not None and self.measured_pose:
                assert crop_size is not None  # checked above
                rows = torch.from_numpy(np.asarray(pose[start : start + batch_size], np.float32))
                z_pose = with_measured_pose(z_pose, shard_pose_to_model(rows, crop_size, self.canonical_scale))
            out.append(torch.cat([z_pose, dyn], dim=1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def load_stage1_encoder(model_dir: Path, device: str) -> Stage1Encoder:
    """The motion encoder out of a stage-1 output folder (model.json + generator.safetensors; sha256
    checked, no pickle). `device`: auto | cpu | cuda."""
    from vasa.models.motion_encoder import MotionEncoder
    from vasa.models.presets import preset_from_json

    try:
        weights, meta = load_weights(model_dir)
    except (FileNotFoundError, OSError, KeyError) as err:
        raise InputError(f"{model_dir}: no stage-1 model ({err}); run train-latent first") from None
    except ValueError as err:
        raise InputError(str(err)) from None
    if GENERATOR not in weights:
        raise InputError(f"{model_dir}: no `{GENERATOR}` weights (modules: {sorted(weights)})")
    described = meta.get("task", {}).get("preset")
    if not isinstance(described, dict):
        raise InputError(f"{model_dir}/model.json: no task.preset block")
    preset = preset_from_json(described)
    prefix = "motion."
    state = {k[len(prefix) :]: v for k, v in weights[GENERATOR].items() if k.startswith(prefix)}
    module = MotionEncoder(preset)
    module.load_state_dict(state, strict=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("extract_motion.device is cuda but no GPU is available")
    target = torch.device(device)
    sha256 = meta["weights"][GENERATOR]["sha256"]
    return Stage1Encoder(
        module.to(target).eval(), preset.resolution, sha256, target, preset.expression_side > 0,
        preset.measured_pose, preset.canonical_scale,
    )  # fmt: skip
