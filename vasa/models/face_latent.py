"""The stage-1 face latent model (VASA-1 §3.1): encoders, warping generator and decoder assembled.

A face image factors into a canonical appearance volume V_app, an identity code z_id, a head pose z_pose
and facial dynamics z_dyn; any (V_app, z_id) can be re-rendered with any (z_pose, z_dyn). `forward`
computes every rendering the stage-1 losses need in one call, so a DDP/DeepSpeed-wrapped model is only
ever called, never reached into.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from vasa.core.weights import load_weights
from vasa.models.appearance_encoder import AppearanceEncoder
from vasa.models.decoder import Decoder
from vasa.models.identity_encoder import CosFaceHead, IdentityEncoder
from vasa.models.layers import recompute_blocks
from vasa.models.motion_encoder import EXPRESSION_DIMS, MotionEncoder, with_measured_expression, with_measured_pose
from vasa.models.presets import LatentPreset, preset_from_json
from vasa.models.warping import WarpingGenerator, compose_grids, sample_volume


@dataclass(frozen=True)
class FaceCode:
    """One frame's latents: volume (B, C, D, H, W) in the frame's own pose (None when not encoded),
    z_id (B, I) unit norm, pose (B, 7) (see MotionEncoder), dyn (B, Z)."""

    volume: torch.Tensor | None
    z_id: torch.Tensor
    pose: torch.Tensor
    dyn: torch.Tensor


@dataclass(frozen=True)
class Canonical:
    """A frame moved to the canonical frame: volume (B, C, D, H, W), source_grid (B, D, H, W, 3) where each
    canonical voxel was read in the frame's own volume, image (B, 3, S, S) the frame (decoder skip path),
    hires (B, 3, R, R) the same frame at the output side R when it is larger than S (generation), dyn (B, Z)
    the frame's own z_dyn (the expression field renders the change from it; None: no change rendered)."""

    volume: torch.Tensor
    source_grid: torch.Tensor
    image: torch.Tensor
    hires: torch.Tensor | None = None
    dyn: torch.Tensor | None = None


class FaceLatent(nn.Module):
    """Generator of stage 1: images (B, 3, S, S) in [-1, 1] -> renderings (B, 3, S, S) in [-1, 1]."""

    def __init__(self, preset: LatentPreset, n_speakers: int) -> None:
        super().__init__()
        self.preset = preset
        self.appearance = AppearanceEncoder(preset)
        self.identity = IdentityEncoder(preset)
        self.identity_head = CosFaceHead(preset.identity_dim, n_speakers)
        self.motion = MotionEncoder(preset)
        self.warping = WarpingGenerator(preset)
        self.decoder = Decoder(preset)

    def encode(self, image: torch.Tensor, appearance: bool = True) -> FaceCode:
        """All latents of (B, 3, S, S) frames; `appearance=False` skips the (costly) volume (None)."""
        pose, dyn = self.motion(image)
        volume = self.appearance(image) if appearance else None
        return FaceCode(volume=volume, z_id=self.identity(image), pose=pose, dyn=dyn)

    def measured(self, code: FaceCode, expression: torch.Tensor | None, pose: torch.Tensor | None = None) -> FaceCode:
        """`code` with what this model renders from measurements put in place of the encoder's estimates:
        z_dyn's expression dims by the measured FaceMesh expression (B, E) in template units when it has an
        expression field, z_pose by the measured head pose (B, 7) in z_pose units (`shard_pose_to_model`)
        when its preset has `measured_pose`. None (or a model without the feature) keeps the estimate."""
        if expression is not None and self.preset.expression_side:
            code = replace(code, dyn=with_measured_expression(code.dyn, expression.to(code.dyn.device)))
        if pose is not None and self.preset.measured_pose:
            code = replace(code, pose=with_measured_pose(code.pose, pose))
        return code

    def canonical(self, code: FaceCode, image: torch.Tensor) -> Canonical:
        """V_app of `code` (encoded from `image`) moved to the canonical (pose- and dynamics-free) frame."""
        assert code.volume is not None, "canonical() needs the volume: encode(image, appearance=True)"
        grid = self.warping.to_canonical_grid(code.pose, code.dyn, code.z_id, code.volume.shape)
        return Canonical(volume=sample_volume(code.volume, grid), source_grid=grid, image=image, dyn=code.dyn)

    def render(
        self,
        canonical: Canonical,
        z_id: torch.Tensor,
        pose: torch.Tensor,
        dyn: torch.Tensor,
        parts: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decode a canonical face posed by (pose (B, 7), dyn (B, Z)): -> (B, 3, S, S) in [-1, 1], or
        (B, 3, R, R) when the canonical face carries a `hires` source (the decoder warps its pixels).
        `parts`: filled by the decoder's skip path (Decoder.forward)."""
        grid = self.warping.from_canonical_grid(pose, dyn, z_id, canonical.volume.shape)
        posed = sample_volume(canonical.volume, grid)
        if not self.preset.source_skip:
            return self.decoder(posed, dynamics=dyn)
        points = compose_grids(canonical.source_grid, grid)
        change = None if canonical.dyn is None else (dyn - canonical.dyn)[:, :EXPRESSION_DIMS]
        return self.decoder(
            posed,
            points,
            canonical.image,
            canonical.hires,
            dynamics=dyn,
            canonical_points=grid,
            expression_change=change,
            parts=parts,
        )

    def judge_identity(self, image: torch.Tensor) -> torch.Tensor:
        """z_id of `image` through the identity encoder with its weights detached (stop-gradient judge):
        gradients reach the image (the generator) but cannot bend the judge to agree."""
        # requires_grad off for the call rather than detached copies through functional_call: the same
        # gradients, and the module's own parameters stay in place, which ZeRO-3's gather hooks need.
        params = [p for p in self.identity.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.identity(image)
        finally:
            for p in params:
                p.requires_grad_(True)

    def checkpoint_activations(self) -> int:
        """Activation checkpointing on the residual blocks of the warping generator and the decoder, the
        ones whose activations fill the memory at 512² (3D flow fields, up-blocks at full resolution); how
        many blocks."""
        return recompute_blocks(self.warping) + recompute_blocks(self.decoder)

    def forward(
        self,
        source: torch.Tensor,
        driver: torch.Tensor,
        other: torch.Tensor,
        transfer: bool = True,
        pose_swap: bool = False,
        warped: bool = False,
        expressions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        poses: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Renderings and latents for one batch of frame triples, each (B, 3, S, S) in [-1, 1].

        source, driver: two frames of one clip; other: a frame of another speaker. Returns
          recon       source appearance with the driver's pose and dynamics (target: driver)
          cross       source appearance with `other`'s pose and dynamics (cross-identity reenactment)
          cross_id    z_id of `cross` by the stop-gradient judge (B, I)
          transfer_a, transfer_b   (if transfer) VASA-1's pairwise transfer pair for frames i = source,
                      j = driver: render(app_j, id_j, pose_i, dyn_j) and render(app_i, id_i, pose_i, dyn_j)
          pose_swap   (if pose_swap) source appearance and dynamics with `other`'s head pose
          recon_warped (if warped, skip-path decoders) the source moved by recon's flow alone, unmixed
          id_logits   CosFace cosines (3B, n_speakers) of [source; driver; other]
          source_pose, driver_pose, other_pose (B, 7); source_dyn, driver_dyn, other_dyn (B, Z) as encoded;
          source_id (B, I)
        `expressions`: the measured FaceMesh expression (B, E) of source, driver and other (template units);
        with an expression field they replace the encoded z_dyn's first dims in every rendering. `poses`: the
        measured head pose (B, 7) of the three in z_pose units, which replaces z_pose in every rendering of a
        `measured_pose` model. The returned *_pose and *_dyn are the encoder's own (their supervision).
        """
        src = self.encode(source)
        drv = self.encode(driver, appearance=transfer)
        oth = self.encode(other, appearance=False)
        encoded = {"source_dyn": src.dyn, "driver_dyn": drv.dyn, "other_dyn": oth.dyn}
        encoded |= {"source_pose": src.pose, "driver_pose": drv.pose, "other_pose": oth.pose}
        if expressions is not None or poses is not None:
            none = (None, None, None)
            src, drv, oth = (
                self.measured(c, e, p)
                for c, e, p in zip((src, drv, oth), expressions or none, poses or none, strict=True)
            )
        canon_src = self.canonical(src, source)
        cross = self.render(canon_src, src.z_id, oth.pose, oth.dyn)
        parts: dict[str, torch.Tensor] = {}
        out = {
            "recon": self.render(canon_src, src.z_id, drv.pose, drv.dyn, parts if warped else None),
            "cross": cross,
            "cross_id": self.judge_identity(cross),
            "id_logits": self.identity_head(torch.cat([src.z_id, drv.z_id, oth.z_id])),
            **encoded,
            "source_id": src.z_id,
        }
        if "warped" in parts:
            out["recon_warped"] = parts["warped"]
        if transfer:
            out["transfer_a"] = self.render(self.canonical(drv, driver), drv.z_id, src.pose, drv.dyn)
            out["transfer_b"] = self.render(canon_src, src.z_id, src.pose, drv.dyn)
        if pose_swap:
            out["pose_swap"] = self.render(canon_src, src.z_id, oth.pose, src.dyn)
        return out


def load_face_latent(model_dir: Path, device: str | torch.device = "cpu") -> tuple[FaceLatent, dict]:
    """The stage-1 generator (EMA weights) out of a train-latent output folder, in eval mode, and its
    model.json. No pickle: safetensors checked against the sha256 in model.json. Raises ValueError
    (what is missing or wrong) or FileNotFoundError."""
    weights, meta = load_weights(model_dir)
    if "generator" not in weights:
        raise ValueError(f"{model_dir}: no `generator` weights (modules: {sorted(weights)})")
    task = meta.get("task", {})
    described = task.get("preset")
    if not isinstance(described, dict) or "n_speakers" not in task:
        raise ValueError(f"{model_dir}/model.json: no task.preset / task.n_speakers block")
    preset = preset_from_json(described)
    model = FaceLatent(preset, n_speakers=task["n_speakers"])
    model.load_state_dict(weights["generator"], strict=True)
    return model.to(device).eval(), meta
