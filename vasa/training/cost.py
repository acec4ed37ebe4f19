"""What one training step of a network costs, counted on the meta device (nothing is allocated or computed).

    task + synthetic batch on the meta device -> each module's loss -> backward, in the engine's update order
        FLOPs       torch.utils.flop_counter.FlopCounterMode: convolutions and matmuls (grid_sample, norms and
                    elementwise ops are not counted: a lower bound, as in docs/BENCHMARKS.md)
        activations the bytes autograd saves for backward (torch.autograd.graph.saved_tensors_hooks), counted
                    per module and the largest kept: the generator's graph is freed before the discriminator's.
                    In fp32, so an upper bound for bf16 autocast (its conv and matmul outputs take 2 bytes)
        parameters  per module, trained (AdamW) or frozen (the VGG19 perceptual trunk)

Everything is counted for COUNT_BATCH samples and divided (contrastive losses need two), so the figures are per
sample. benchmarks/train_latent_throughput.py and benchmarks/gpu_check.py count with these functions, and
`vasa plan` (vasa/plan/) budgets with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vasa.core.config import LatentLossConfig
from vasa.losses import VGG19Features
from vasa.models.motion_dit import CONDITIONS
from vasa.models.motion_encoder import MotionEncoder
from vasa.models.presets import LatentPreset
from vasa.training.latent_task import LatentTask
from vasa.training.motion_task import DIT, MotionTask

COUNT_BATCH = 2  # samples per counted step


@dataclass(frozen=True)
class StepCost:
    """One training step of a network, per sample, with its parameter counts."""

    flop: float  # forward + backward of every module in update order, per sample
    activation_bytes: float  # saved for backward, fp32, the largest module's, per sample
    trained: dict[str, int]  # parameters per module stepped by AdamW
    ema: int  # parameters with an fp32 EMA shadow
    frozen: int  # parameters held on the device but not trained

    @property
    def parameters(self) -> int:
        return sum(self.trained.values())


def count_step(
    models: dict[str, nn.Module],
    order: list[str],
    loss: Callable[[str, dict], Tensor],
    samples: int,
    ema: list[str],
    frozen: tuple[nn.Module, ...] = (),
    backward: bool = True,
) -> StepCost:
    """Count `loss(name, scratch)` -> backward for each module in `order` (models built on the meta device);
    with `backward` False the forward alone is counted (its activations still as if kept for a backward)."""
    weights = {id(p) for m in (*models.values(), *frozen) for p in m.parameters()}
    peak = 0
    with FlopCounterMode(display=False) as counter:
        scratch: dict = {}
        for name in order:
            saved: dict[int, Tensor] = {}  # held until the module's count ends, so no id is reused

            def pack(t: Tensor, saved: dict[int, Tensor] = saved) -> Tensor:
                if id(t) not in weights and id(t._base) not in weights:  # a weight or its view is not an activation
                    saved[id(t)] = t
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                value = loss(name, scratch)
            peak = max(peak, sum(t.numel() * t.element_size() for t in saved.values()))
            if backward:
                value.backward()
    return StepCost(
        flop=counter.get_total_flops() / samples,
        activation_bytes=peak / samples,
        trained={name: sum(p.numel() for p in models[name].parameters()) for name in order},
        ema=sum(p.numel() for name in ema for p in models[name].parameters()),
        frozen=sum(p.numel() for m in frozen for p in m.parameters()),
    )


# --- stage 1 -----------------------------------------------------------------------------------------------


def latent_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random frames in [-1, 1] and crop-centred poses in the pair loader's contract (vasa/loaders/pairs.py);
    cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    out = {k: torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for k in ("source", "driver", "other")}
    pose = torch.zeros(batch, 7)
    pose[:, 3:5], pose[:, 6] = size / 2, size / 4
    out |= {k: pose.clone() for k in ("source_pose", "driver_pose", "other_pose")}
    out |= {f"{role}_expression": torch.zeros(batch, 6) for role in ("source", "driver", "other")}
    out["driver_mouth"] = torch.tensor([[0.3, 0.6, 0.7, 0.9]]).repeat(batch, 1)
    out |= {"speaker": torch.zeros(batch, dtype=torch.int64), "other_speaker": torch.ones(batch, dtype=torch.int64)}
    return {k: v.to(device) for k, v in out.items()}


def count_flops(task: LatentTask, batch_size: int) -> int:
    """FLOPs of one generator + discriminator step of `batch_size` samples (benchmarks/train_latent_throughput.py)."""
    with torch.device("meta"):
        models = task.build()
        batch = latent_batch(batch_size, task.preset.resolution, torch.device("meta"))
        with FlopCounterMode(display=False) as counter:
            scratch: dict = {}
            for name in task.update_order():
                loss, _ = task.loss(name, models, batch, scratch)
                loss.backward()
    return counter.get_total_flops()


def latent_step(cfg: LatentLossConfig, preset: LatentPreset, n_speakers: int) -> StepCost:
    """Stage 1 (FaceLatent + discriminator) with the loss terms `cfg` weights. The VGG19 perceptual trunk is
    counted whenever the term is on with a weights file named, whether or not the file is here (its cost does
    not depend on the weights)."""
    perceptual = cfg.perceptual > 0 and cfg.perceptual_weights is not None
    # Built without the term (nothing to read from disk), then given the trunk and the real weights.
    task = LatentTask(cfg.replace(perceptual=0.0, perceptual_weights=None), preset, n_speakers, preset.resolution)
    task.cfg = cfg
    with torch.device("meta"):
        task.vgg = VGG19Features() if perceptual else None
        models = task.build()
        batch = latent_batch(COUNT_BATCH, preset.resolution, torch.device("meta"))
        return count_step(
            models,
            task.update_order(),
            lambda name, scratch: task.loss(name, models, batch, scratch)[0],
            COUNT_BATCH,
            task.ema_modules(),
            (task.vgg,) if task.vgg is not None else (),
        )


def encoder_forward(preset: LatentPreset) -> StepCost:
    """The stage-1 motion encoder's forward on one frame (`extract-motion`); activations counted as if for
    backward: an upper bound of what inference holds."""
    with torch.device("meta"):
        encoder = MotionEncoder(preset)
        frames = torch.empty(COUNT_BATCH, 3, preset.resolution, preset.resolution)

        def forward(name: str, scratch: dict) -> Tensor:
            pose, dyn = encoder(frames)
            return pose.sum() + dyn.sum()

        counted = count_step({"motion_encoder": encoder}, ["motion_encoder"], forward, COUNT_BATCH, [], backward=False)
    return StepCost(counted.flop, counted.activation_bytes, {}, 0, counted.parameters)


# --- stage 2 -----------------------------------------------------------------------------------------------


def motion_windows(task: MotionTask, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random windows in the motion loader's contract (vasa/training/motion_task.py); cost does not depend on them."""
    g = torch.Generator().manual_seed(0)
    w, k, dims = task.window, task.context, task.dims
    out = {
        "motion": torch.randn(batch, w, dims["motion_dim"], generator=g),
        "motion_pre": torch.randn(batch, k, dims["motion_dim"], generator=g),
        "audio": torch.randn(batch, w, dims["audio_dim"], generator=g),
        "audio_pre": torch.randn(batch, k, dims["audio_dim"], generator=g),
        "has_pre": torch.ones(batch, dtype=torch.bool),
        "gaze": torch.zeros(batch, 2), "distance": torch.zeros(batch, 1),
        "emotion": torch.zeros(batch, dims["emotion_dim"]),
    }  # fmt: skip
    return {key: value.to(device) for key, value in out.items()}


def motion_step(task: MotionTask) -> StepCost:
    """The motion DiT's forward + backward on a window (the x0 loss's elementwise terms are not counted; the
    task's own loss reads noise levels with .item(), which the meta device cannot)."""
    with torch.device("meta"):
        models = task.build()
        batch = motion_windows(task, COUNT_BATCH, torch.device("meta"))
        t = torch.zeros(COUNT_BATCH, dtype=torch.long)
        drop = {c: torch.zeros(COUNT_BATCH, dtype=torch.bool, device="cpu") for c in CONDITIONS}
        dit = models[DIT]
        return count_step(
            models, [DIT], lambda name, scratch: dit(batch["motion"], t, batch, drop).square().mean(), COUNT_BATCH,
            [DIT],
        )  # fmt: skip


def dit_flop_per_window(task: MotionTask) -> float:
    """Forward + backward FLOPs of the DiT on one window (benchmarks/gpu_check.py)."""
    return motion_step(task).flop
