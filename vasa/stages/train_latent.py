"""Stage 1 training (`vasa train-latent`, DVC stage `train_latent`): the disentangled face latent
space of VASA-1 §3.1, trained by the shared engine on frame pairs from the shards.

Output in OUT: `model/` (EMA generator as safetensors + model.json: preset, params, step, lineage),
`live/` (DVCLive metrics.json incl. held-out PSNR vs the copy-the-source baseline, plots),
`images/` (PNG grids), `checkpoints/` (resumable states).

Launch commands (every path explicit; the same code from one CPU to many GPU nodes):

    # one process (CPU or one GPU)
    python -m vasa.cli --params params.yaml train-latent --shards data/shards --out data/latent
    # skip the clips the score stage rejected (dvc.yaml does)
    python -m vasa.cli --params params.yaml train-latent --shards data/shards --scores data/scores/scores.parquet \
        --out data/latent
    # resume a killed run from its latest state
    python -m vasa.cli --params params.yaml train-latent --shards data/shards --out data/latent --resume
    # 2 CPU processes (gloo; the engine sets Accelerator(cpu=True) itself when there is no CUDA)
    torchrun --standalone --nproc_per_node 2 -m vasa.cli --params params.yaml train-latent \
        --shards data/shards --out data/latent
    # 1 GPU / 8 GPUs on one node (DDP, bf16)
    accelerate launch --config_file cluster/accelerate/gpu1.yaml -m vasa.cli --params params.yaml train-latent ...
    accelerate launch --config_file cluster/accelerate/gpu8.yaml -m vasa.cli --params params.yaml train-latent ...
    # 8 GPUs with DeepSpeed ZeRO-2 (ZeRO-3: cluster/accelerate/gpu8_zero3.yaml, for `base`)
    accelerate launch --config_file cluster/accelerate/gpu8_zero2.yaml -m vasa.cli --params params.yaml train-latent \
        --shards data/shards --out data/latent --deepspeed cluster/deepspeed/zero2.json
    # many nodes under Slurm: srun starts one `accelerate launch` per node (see the script)
    sbatch --nodes 4 cluster/slurm/train_latent.sbatch params.yaml data/shards data/latent
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from vasa.core.config import TrainLatentConfig
from vasa.loaders.pairs import heldout_batch, pair_batches
from vasa.loaders.scores import read_scores
from vasa.loaders.shards import open_shards
from vasa.training.checkpoint import shards_lineage
from vasa.training.engine import TrainResult, train

log = logging.getLogger(__name__)


def psnr(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of (B, 3, S, S) images in [-1, 1] (peak = the [0, 1] range)."""
    mse = ((prediction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def heldout_psnr(task, models: dict[str, nn.Module], groups: dict[str, dict], batch_size: int) -> dict[str, float]:
    """Held-out reconstruction vs the copy-the-source baseline (the driver predicted as the unchanged
    source frame): mean per-pair PSNR of each, and the margin, for every held-out group."""
    device = next(iter(models.values())).parameters().__next__().device
    figures = {}
    for group, batch in sorted(groups.items()):
        model_db, copy_db = [], []
        count = batch["source"].shape[0]
        for start in range(0, count, batch_size):
            part = {k: v[start : start + batch_size].to(device) for k, v in batch.items()}
            model_db.append(psnr(task.reconstruct(models, part).float(), part["driver"]))
            copy_db.append(psnr(part["source"], part["driver"]))
        model, copy = torch.cat(model_db).mean().item(), torch.cat(copy_db).mean().item()
        figures |= {
            f"heldout_{group}/psnr_model_db": model,
            f"heldout_{group}/psnr_copy_source_db": copy,
            f"heldout_{group}/margin_db": model - copy,
            f"heldout_{group}/pairs": float(count),
        }
    return figures


def heldout_disentanglement(generator: nn.Module, groups: dict[str, dict], crop_size: int | None) -> dict[str, float]:
    """Pose swap vs appearance swap on each held-out group's (source, other-speaker) pairs, judged by the
    pipeline's own pose estimator and the identity encoder, and whether the reconstructions open the mouth
    as their drivers do (FaceMesh; vasa/evaluation/disentanglement.py). `crop_size`: the shards' crop side
    (their head pose, which a `measured_pose` model renders from)."""
    from preprocessing.face import FaceMeshTracker
    from vasa.evaluation.disentanglement import disentanglement, mouth_following
    from vasa.models.motion_encoder import shard_pose_to_model

    tracker = FaceMeshTracker(min_detection_confidence=0.5, min_tracking_confidence=0.5)
    model = getattr(generator, "module", generator)  # the EMA copy is a plain module; a wrapped one is not

    def measured_pose(batch: dict, role: str, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor | None:
        if crop_size is None:
            return None
        return shard_pose_to_model(batch[f"{role}_pose"][rows], crop_size, model.preset.canonical_scale)

    figures = {}
    for group, batch in sorted(groups.items()):
        measured = (batch["source_expression"], batch["driver_expression"])
        poses = measured_pose(batch, "source"), measured_pose(batch, "driver")
        found = mouth_following(model, batch["source"], batch["driver"], tracker, measured, poses)
        figures |= {f"heldout_{group}/{k}": v for k, v in found.items()}
        other = batch["speaker"] != batch["other_speaker"]
        if other.any():
            poses = measured_pose(batch, "source", other), measured_pose(batch, "other", other)
            found = disentanglement(model, batch["source"][other], batch["other"][other], tracker, poses)
            figures |= {f"heldout_{group}/disentangle/{k}": v for k, v in found.items()}
    return figures


def run(
    cfg: TrainLatentConfig,
    shards: Path,
    out: Path,
    *,
    resume: bool,
    scores: Path | None = None,
    deepspeed: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train stage 1 on the shards in `shards` into `out` (library entry: config passed in), leaving out the train
    clips the score table `scores` rejected (None: every clip)."""
    from vasa.models.presets import get_preset
    from vasa.training.latent_task import LatentTask

    if cfg.cpu_threads:
        # Small convs spend more in OpenMP barriers than in arithmetic once the cores are shared
        # (measured: docs/BENCHMARKS.md, stage 1 on CPU).
        torch.set_num_threads(cfg.cpu_threads)
    shard_set = open_shards(shards)
    preset = get_preset(cfg.model)
    task = LatentTask(cfg.loss, preset, n_speakers=len(shard_set.speakers), crop_size=shard_set.crop_size)
    table = read_scores(scores)
    exclude = table.rejected_train
    batches = pair_batches(shard_set, preset.resolution, cfg.data, cfg.train.batch_size, cfg.train.seed, exclude)
    log.info(
        "stage 1: preset %s at %d², %d train shards, %d speakers, %d train clips left out by the scores",
        cfg.model, preset.resolution, len(shard_set.train), len(shard_set.speakers), len(exclude),
    )  # fmt: skip

    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        groups = heldout_batch(shard_set, preset.resolution, cfg.data, cfg.train.seed, exclude)
        figures = heldout_psnr(task, models, groups, cfg.train.batch_size)
        figures |= heldout_disentanglement(models["generator"], groups, shard_set.crop_size)
        for key, value in sorted(figures.items()):
            log.info("%s = %.3f", key, value)
        return figures

    meta = {
        "params": {"train_latent": cfg.model_dump(mode="json")},
        "lineage": {
            "shards": shard_set.index_path.parent.name,
            **shards_lineage(shard_set.index_path),
            **({"scores_sha256": table.sha256} if table.sha256 else {}),
        },
        "speakers": list(shard_set.speakers),
    }
    return train(
        task,
        cfg.train,
        batches,
        out,
        meta=meta,
        resume=resume,
        deepspeed=deepspeed,
        evaluate=evaluate,
        progress=progress,
    )
