"""Named sizes of the stage-1 face latent model (`tiny` for CPU tests, `base` for the paper size).

params.yaml chooses a preset by name (`train_latent.model`); `LATENT_PRESETS[name]` is the only lookup.
`base` follows MegaPortraits/EMOPortraits: a 96 x 16 x 64 x 64 appearance volume from a
512² crop. Image side and volume side are tied by `2 ** len(appearance_widths)`; `at_resolution`
rebuilds a preset for another side (the throughput benchmark runs both presets at 256² and 512²).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LatentPreset:
    """Hyper-parameters of one stage-1 model size. Widths are channel counts."""

    name: str
    resolution: int  # image side S, pixels
    appearance_widths: tuple[int, ...]  # 2D encoder of the appearance volume, one stride-2 block each
    volume_channels: int  # C of V_app (C x D x H x W)
    volume_depth: int  # D of V_app
    volume_blocks: int  # 3D residual blocks on V_app
    identity_widths: tuple[int, ...]
    identity_dim: int  # z_id
    motion_widths: tuple[int, ...]
    dynamics_dim: int  # z_dyn
    flow_widths: tuple[int, ...]  # 3D flow generator, one 2x trilinear upsampling per width after the first
    decoder_widths: tuple[int, ...]  # first = after the 1x1 projection; one 2x upsampling per later width
    discriminator_widths: tuple[int, ...]  # PatchGAN, one stride-2 conv per width
    discriminator_scales: int  # multi-scale PatchGAN: full, 1/2, 1/4 ... resolution
    canonical_scale: float  # head scale of the canonical volume: crop fraction per template unit (eye corners)
    source_skip: bool = True  # decoder also samples the source image along the warp (vasa/models/decoder.py)
    expression_side: int = 0  # side of the canonical expression field (vasa/models/expression.py); 0 = none
    measured_pose: bool = False  # render with the frames' measured FaceMesh head pose (vasa/models/motion_encoder.py)

    def __post_init__(self) -> None:
        downs = len(self.appearance_widths)
        if self.resolution % 2**downs:
            raise ValueError(f"preset {self.name}: resolution {self.resolution} not divisible by 2**{downs}")
        if len(self.decoder_widths) != downs + 1:
            raise ValueError(f"preset {self.name}: decoder_widths needs {downs + 1} entries (one per upsampling + 1)")
        ups = len(self.flow_widths) - 1
        if self.volume_depth % 2**ups or self.volume_side % 2**ups:
            raise ValueError(f"preset {self.name}: volume {self.volume_shape} not divisible by 2**{ups} (flow)")

    @property
    def volume_side(self) -> int:
        """H = W of V_app: resolution / 2**len(appearance_widths)."""
        return self.resolution // 2 ** len(self.appearance_widths)

    @property
    def volume_shape(self) -> tuple[int, int, int, int]:
        """(C, D, H, W) of V_app."""
        return (self.volume_channels, self.volume_depth, self.volume_side, self.volume_side)

    def at_resolution(self, resolution: int) -> LatentPreset:
        """The same widths at another image side (the volume side follows)."""
        return dataclasses.replace(self, resolution=resolution)

    def describe(self) -> dict:
        """JSON-able hyper-parameters (saved with checkpoints)."""
        return dataclasses.asdict(self)


LATENT_PRESETS: dict[str, LatentPreset] = {
    # CPU tests and the sample corpus: a training step at 64², batch 8 takes well under a second on 2 cores.
    "tiny": LatentPreset(
        name="tiny",
        resolution=64,
        appearance_widths=(16, 32),
        volume_channels=16,
        volume_depth=8,
        volume_blocks=1,
        identity_widths=(8, 16, 32, 64),
        identity_dim=64,
        motion_widths=(8, 16, 32, 64),
        dynamics_dim=32,
        flow_widths=(16, 16, 8),
        decoder_widths=(48, 24, 12),
        discriminator_widths=(16, 32, 64),
        discriminator_scales=2,
        canonical_scale=0.25,
        expression_side=32,
        measured_pose=True,
    ),
    # Paper-like 512² model (MegaPortraits/EMOPortraits volume 96 x 16 x 64 x 64).
    "base": LatentPreset(
        name="base",
        resolution=512,
        appearance_widths=(64, 128, 256),
        volume_channels=96,
        volume_depth=16,
        volume_blocks=2,
        identity_widths=(32, 64, 128, 256, 512, 512),
        identity_dim=512,
        motion_widths=(32, 64, 128, 256, 512, 512),
        dynamics_dim=256,
        flow_widths=(64, 64, 32, 16),
        decoder_widths=(512, 256, 128, 64),
        discriminator_widths=(64, 128, 256, 512),
        discriminator_scales=3,
        canonical_scale=0.25,
        expression_side=128,
        measured_pose=True,
    ),
}


def get_preset(name: str, resolution: int | None = None) -> LatentPreset:
    """The named preset, optionally at another image side; KeyError names the known presets."""
    try:
        preset = LATENT_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown latent preset {name!r}; known: {sorted(LATENT_PRESETS)}") from None
    return preset if resolution is None else preset.at_resolution(resolution)


def preset_from_json(described: dict) -> LatentPreset:
    """A preset back from its `describe()` JSON (model.json `task.preset`; lists become tuples)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in described.items()}
    return LatentPreset(**fields)


# --- stage 2: the motion diffusion transformer (vasa/models/motion_dit.py) ----------------------------


@dataclass(frozen=True)
class MotionPreset:
    """Hyper-parameters of one motion DiT size (VASA-1 §3.2). Motion, audio and emotion widths come from
    the data and window/context lengths from params: they are constructor arguments, not preset fields."""

    name: str
    layers: int  # transformer blocks
    width: int  # token width
    heads: int  # attention heads; width % heads == 0
    mlp_ratio: int  # hidden width of each block's MLP / width

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"preset {self.name}: width {self.width} not divisible by heads {self.heads}")

    def describe(self) -> dict:
        """JSON-able hyper-parameters (saved with checkpoints)."""
        return dataclasses.asdict(self)


MOTION_PRESETS: dict[str, MotionPreset] = {
    # CPU tests: a training step on 16 windows of 20 tokens takes a few milliseconds on 2 cores.
    "tiny": MotionPreset(name="tiny", layers=2, width=64, heads=4, mlp_ratio=4),
    # The paper's size: 8 layers, width 512, 8 heads (~29M parameters, VASA-1 paper; Ditto uses the same).
    "base": MotionPreset(name="base", layers=8, width=512, heads=8, mlp_ratio=4),
}


def get_motion_preset(name: str) -> MotionPreset:
    """The named motion DiT preset; KeyError names the known presets."""
    try:
        return MOTION_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown motion preset {name!r}; known: {sorted(MOTION_PRESETS)}") from None
