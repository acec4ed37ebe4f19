"""LatentTask: stage 1 (VASA-1 §3.1) as a `TrainTask` of the shared engine (vasa/training/engine.py).

Two modules, stepped generator first: the face latent model (`FaceLatent`) and the multi-scale PatchGAN.
The generator's loss is the weighted sum of (weights in params `train_latent.loss`):
  l1, perceptual          reconstruction of the driver frame from the source's appearance + driver's motion
  adversarial, feature_matching   hinge GAN on that reconstruction (MegaPortraits)
  pose                    the motion encoder's z_pose against the shards' measured head pose
  expression              z_dyn's first dims against the shards' FaceMesh expression (mouth, eyes, brows)
  mouth                   L1 of the reconstruction inside the driver's mouth box (the lips must move)
  warp                    multi-scale L1 of the source moved by the flow alone, outside the driver's mouth
                          box: the flow learns whatever weight the decoder's mix gives the warped source
                          (without it, a mix that starts away from the warp can starve it of gradient and
                          collapse; docs/BENCHMARKS.md)
  transfer                VASA-1's pairwise pose/dynamics transfer consistency (frames i, j of one clip)
  cross_identity          the stop-gradient identity judge keeps the source identity under another motion
  identity                CosFace over the train speakers, which trains that judge (the identity encoder)
A zero weight skips a term; terms with their own forward pass (transfer, perceptual, GAN, pose) are then
not computed at all.
"""

from __future__ import annotations

import json
import logging
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from vasa.core.config import LatentLossConfig
from vasa.losses import (
    VGG19Features,
    box_mask,
    cosface_loss,
    cross_identity_loss,
    expression_supervision_loss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_vgg19,
    multiscale_l1,
    perceptual_loss,
    pose_supervision_loss,
    region_l1,
    transfer_consistency_loss,
)
from vasa.models.discriminator import MultiScaleDiscriminator
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_encoder import ANGLE_UNIT_DEG, EXPRESSION_UNITS, shard_pose_to_model
from vasa.models.presets import LatentPreset

log = logging.getLogger(__name__)

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
GRID_ROWS = 4  # samples shown in the logging grid


class LatentTask:
    """Stage-1 training task. `crop_size` (index.json `dataset.crop_size`) converts the shards' pose from
    crop pixels; it is required when the pose weight is > 0."""

    def __init__(
        self, cfg: LatentLossConfig, preset: LatentPreset, n_speakers: int, crop_size: int | None = None
    ) -> None:
        if n_speakers < 2:
            raise ValueError(f"stage 1 needs at least 2 train speakers (cross-identity pairs), got {n_speakers}")
        if (cfg.pose > 0 or preset.measured_pose) and crop_size is None:
            raise ValueError("loss.pose > 0 and a measured_pose preset need the shards' crop_size (their head pose)")
        self.cfg, self.preset, self.n_speakers, self.crop_size = cfg, preset, n_speakers, crop_size
        self.vgg: VGG19Features | None = None
        if cfg.perceptual > 0 and cfg.perceptual_weights is not None:
            self.vgg = load_vgg19(cfg.perceptual_weights)
        elif cfg.perceptual > 0:
            log.warning("perceptual loss is off: train_latent.loss.perceptual_weights is null (no VGG19 weights)")

    # --- the TrainTask protocol -------------------------------------------------------------------

    def build(self) -> dict[str, nn.Module]:
        """{"generator": FaceLatent, "discriminator": MultiScaleDiscriminator}, freshly initialised."""
        return {
            GENERATOR: FaceLatent(self.preset, self.n_speakers),
            DISCRIMINATOR: MultiScaleDiscriminator(self.preset),
        }

    def update_order(self) -> list[str]:
        return [GENERATOR, DISCRIMINATOR]

    def ema_modules(self) -> list[str]:
        return [GENERATOR]

    def lr_scale(self, name: str) -> float:
        """Same learning rate for both (MegaPortraits)."""
        return 1.0

    def checkpoint_activations(self, models: dict[str, nn.Module]) -> None:
        """Params `train.activation_checkpointing`: the generator's warping and decoder blocks recompute their
        activations in the backward pass (the discriminator is small)."""
        cast(FaceLatent, models[GENERATOR]).checkpoint_activations()

    def describe(self) -> dict:
        """Preset, loss settings and speaker count, as plain JSON values (tuples become lists)."""
        info = {
            "task": "train_latent",
            "preset": self.preset.describe(),
            "loss": self.cfg.model_dump(mode="json"),
            "n_speakers": self.n_speakers,
            "crop_size": self.crop_size,
        }
        return json.loads(json.dumps(info))

    def loss(
        self, name: str, models: dict[str, nn.Module], batch: dict[str, Tensor], scratch: dict
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of module `name` and its logged terms (detached scalars); the generator leaves its fake in
        `scratch` for the discriminator."""
        if name == GENERATOR:
            return self._generator_loss(models, batch, scratch)
        if name == DISCRIMINATOR:
            return self._discriminator_loss(models, batch, scratch)
        raise KeyError(f"LatentTask has no module {name!r}; modules: {self.update_order()}")

    def reconstruct(self, models: dict[str, nn.Module], batch: dict[str, Tensor]) -> Tensor:
        """The driver frame rendered from the source's appearance and the driver's motion: (B, 3, S, S)."""
        out = models[GENERATOR](
            batch["source"],
            batch["driver"],
            batch["other"],
            transfer=False,
            expressions=_expressions(batch),
            poses=self._poses(batch),
        )
        return out["recon"]

    def images(self, models: dict[str, nn.Module], batch: dict[str, Tensor]) -> np.ndarray:
        """Grid (rows = samples) of source | driver | reconstruction | cross-identity | pose swap: uint8 HxWx3.

        Cross-identity = the source face driven by `other`'s pose and dynamics; pose swap = the source's own
        dynamics with `other`'s head pose.
        """
        n = min(GRID_ROWS, batch["source"].shape[0])
        part = {k: v[:n] for k, v in batch.items()}
        with torch.no_grad():
            out = models[GENERATOR](
                part["source"],
                part["driver"],
                part["other"],
                transfer=False,
                pose_swap=True,
                expressions=_expressions(part),
                poses=self._poses(part),
            )
        columns = [part["source"], part["driver"], out["recon"], out["cross"], out["pose_swap"]]
        grid = torch.cat([torch.cat(list(col.float()), dim=1) for col in columns], dim=2)  # (3, n*S, 5*S)
        return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def _model_pose(self, pose: Tensor) -> Tensor:
        """The shards' head pose (B, 7) (POSE_COLUMNS: degrees, crop pixels) in z_pose units."""
        if self.crop_size is None:
            raise ValueError("the shards' head pose needs their crop_size (index.json dataset.crop_size)")
        return shard_pose_to_model(pose, self.crop_size, self.preset.canonical_scale)

    def _poses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
        """The measured head pose of source, driver and other in z_pose units, which a `measured_pose` model
        renders from; None for other models or a batch without poses."""
        roles = ("source_pose", "driver_pose", "other_pose")
        if not self.preset.measured_pose or not all(r in batch for r in roles):
            return None
        source, driver, other = (self._model_pose(batch[r]) for r in roles)
        return source, driver, other

    # --- the two losses ---------------------------------------------------------------------------

    def _generator_loss(
        self, models: dict[str, nn.Module], batch: dict[str, Tensor], scratch: dict
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        out = models[GENERATOR](
            batch["source"],
            batch["driver"],
            batch["other"],
            transfer=cfg.transfer > 0,
            warped=cfg.warp > 0,
            expressions=_expressions(batch),
            poses=self._poses(batch),
        )
        recon, driver = out["recon"], batch["driver"]
        terms: dict[str, Tensor] = {"l1": multiscale_l1(recon, driver, cfg.l1_scales)}
        if self.vgg is not None:
            self.vgg.to(recon.device)
            terms["perceptual"] = perceptual_loss(self.vgg, recon, driver)
        if cfg.adversarial > 0 or cfg.feature_matching > 0:
            fake_out = models[DISCRIMINATOR](recon)
            terms["adversarial"] = hinge_generator_loss([logits for _, logits in fake_out])
            if cfg.feature_matching > 0:
                with torch.no_grad():
                    real_out = models[DISCRIMINATOR](driver)
                terms["feature_matching"] = feature_matching_loss([f for f, _ in real_out], [f for f, _ in fake_out])
        if cfg.pose > 0:
            pose_sum = sum(
                pose_supervision_loss(out[f"{role}_pose"], self._model_pose(batch[f"{role}_pose"]), ANGLE_UNIT_DEG)
                for role in ("source", "driver", "other")
            )
            terms["pose"] = cast(Tensor, pose_sum) / 3  # a sum of three Tensors: a Tensor, not sum()'s start 0
        if cfg.expression > 0:
            source = (out["source_dyn"], batch["source_expression"])
            terms["expression"] = expression_supervision_loss(
                out["driver_dyn"], batch["driver_expression"], EXPRESSION_UNITS, source
            ) + expression_supervision_loss(out["source_dyn"], batch["source_expression"], EXPRESSION_UNITS, source)
        if cfg.mouth > 0:
            terms["mouth"] = region_l1(recon, driver, batch["driver_mouth"])
        if "recon_warped" in out:
            # Outside the driver's mouth box: what the warp cannot show (an opening mouth) is the rendering's and
            # the expression cover's; asking the warp for it too halved the demo's mouth opening (BENCHMARKS.md).
            keep = 1 - box_mask(batch["driver_mouth"], driver)
            terms["warp"] = multiscale_l1(out["recon_warped"] * keep, driver * keep, cfg.l1_scales)
        if cfg.transfer > 0:
            terms["transfer"] = transfer_consistency_loss(out["transfer_a"], out["transfer_b"])
        labels = torch.cat([batch["speaker"], batch["speaker"], batch["other_speaker"]])
        terms["identity"] = cosface_loss(out["id_logits"], labels, cfg.cosface_margin, cfg.cosface_scale)
        terms["cross_identity"] = cross_identity_loss(out["cross_id"], out["source_id"])
        # identity and cross_identity are always computed (cheap, and a zero weight keeps every parameter in
        # the graph, as DDP expects); the other terms exist only when weighted.
        total = sum(getattr(cfg, key) * value for key, value in terms.items())
        scratch["fake"] = recon.detach()
        # Logged terms stay detached 0-dim tensors (the engine converts them when it logs): no device sync per term.
        # The engine logs them as loss/generator/<term>.
        logged = {key: value.detach() for key, value in terms.items()}
        logged["total"] = total.detach()
        return total, logged

    def _discriminator_loss(
        self, models: dict[str, nn.Module], batch: dict[str, Tensor], scratch: dict
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if "fake" not in scratch:
            raise RuntimeError("the discriminator is stepped after the generator: its fake is missing from scratch")
        real = [logits for _, logits in models[DISCRIMINATOR](batch["driver"])]
        fake = [logits for _, logits in models[DISCRIMINATOR](scratch["fake"])]
        loss = hinge_discriminator_loss(real, fake)
        # Without adversarial and feature-matching terms nothing reads D: its loss is zeroed (not skipped, so
        # the engine's step and a DDP reducer still see every parameter in the graph).
        weight = 1.0 if (self.cfg.adversarial > 0 or self.cfg.feature_matching > 0) else 0.0
        return loss * weight, {"hinge": loss.detach()}


def _expressions(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """The measured FaceMesh expression of source, driver and other, when the batch carries them."""
    names = ("source_expression", "driver_expression", "other_expression")
    return (batch[names[0]], batch[names[1]], batch[names[2]]) if all(n in batch for n in names) else None
