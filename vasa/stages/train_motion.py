"""Stage 2 training (`vasa train-motion`, DVC stage `train_motion`): the audio-conditioned motion diffusion
transformer of VASA-1 §3.2, trained by the shared engine (vasa/training/engine.py) with MotionTask on
windows of the motion shards that `extract-motion` writes.

Output in OUT, as stage 1: `model/` (EMA DiT as safetensors + model.json: preset, params, step, lineage =
the motion index digest and the stage-1 weights digest, and the normalisation statistics that generation
undoes), `live/` (DVCLive metrics incl. the x0 loss by noise level and the mouth/audio check), `images/`
(PNG curves of generated vs real pose and mouth dynamics), `checkpoints/` (resumable states).

    python -m vasa.cli --params params.yaml train-motion --motion data/motion --out data/motion_dit
    python -m vasa.cli --params params.yaml train-motion --motion data/motion --out data/motion_dit --resume
    accelerate launch --config_file cluster/accelerate/gpu8.yaml -m vasa.cli --params params.yaml train-motion \
        --motion data/motion --out data/motion_dit
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from vasa.core.config import TrainMotionConfig
from vasa.core.digests import sha256_file
from vasa.loaders.motion import heldout_windows, open_motion, window_batches
from vasa.models.motion_encoder import POSE_DIM
from vasa.training.checkpoint import shards_lineage
from vasa.training.engine import TrainResult, train

log = logging.getLogger(__name__)
EVAL_NOISE_LEVELS = (0.1, 0.5, 0.9)  # fractions of T at which the held-out x0 loss is reported


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else 0.0


def mouth_audio_check(generated: np.ndarray, real: np.ndarray, audio: np.ndarray, seed: int) -> dict[str, float]:
    """Does the generated mouth follow the audio? generated, real: (N, W, M) normalised motion; audio:
    (N, W, A). The audio envelope of a frame is the mean of its (normalised log-mel) features; the mouth
    proxy is the z_dyn column whose REAL values correlate most with that envelope (z_dyn has no named
    mouth column), sign-aligned. Returns the correlation of the generated proxy with the true envelope
    and with the same envelope shuffled in time within each window, both over per-window-centred frames."""
    envelope = audio.mean(-1)  # (N, W)
    centred = envelope - envelope.mean(1, keepdims=True)
    dyn_real = real[..., POSE_DIM:] - real[..., POSE_DIM:].mean(1, keepdims=True)
    r = [_pearson(dyn_real[..., j].ravel(), centred.ravel()) for j in range(dyn_real.shape[-1])]
    column = int(np.argmax(np.abs(r)))
    sign = float(np.sign(r[column]) or 1.0)
    mouth = generated[..., POSE_DIM + column] * sign
    mouth = mouth - mouth.mean(1, keepdims=True)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([row[rng.permutation(len(row))] for row in centred])
    true_r, shuffled_r = _pearson(mouth.ravel(), centred.ravel()), _pearson(mouth.ravel(), shuffled.ravel())
    return {
        "mouth_audio/column": float(column),
        "mouth_audio/real_r": abs(r[column]),
        "mouth_audio/generated_r": true_r,
        "mouth_audio/shuffled_r": shuffled_r,
        "mouth_audio/margin": true_r - shuffled_r,
    }


@torch.no_grad()
def evaluate_windows(task, model: nn.Module, batch: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """Held-out x0 loss (no condition dropout, fixed noise) at EVAL_NOISE_LEVELS, and the mouth/audio check
    on windows sampled with the task's guidance and sampling steps."""
    from vasa.diffusion import x0_loss

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    x0 = batch["motion"]
    generator = torch.Generator().manual_seed(seed)
    figures = {}
    for fraction in EVAL_NOISE_LEVELS:
        level = min(int(fraction * task.schedule.train_steps), task.schedule.train_steps - 1)
        t = torch.full((x0.shape[0],), level, dtype=torch.long, device=device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        prediction = model(task.schedule.add_noise(x0, t, noise), t, batch, None)
        figures[f"eval_x0/t_{level}"] = float(x0_loss(prediction, x0).mean())
    generated = task.sample_window(model, batch).float().cpu().numpy()
    figures |= mouth_audio_check(generated, x0.float().cpu().numpy(), batch["audio"].float().cpu().numpy(), seed)
    return figures


def run(
    cfg: TrainMotionConfig,
    motion: Path,
    out: Path,
    *,
    resume: bool,
    deepspeed: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train stage 2 on the motion shards in `motion` into `out` (library entry: config passed in)."""
    from vasa.models.presets import get_motion_preset
    from vasa.training.motion_task import DIT, MotionTask

    motion_set = open_motion(motion)
    dims = motion_set.dims
    task = MotionTask(
        get_motion_preset(cfg.model),
        motion_dim=dims["motion"],
        audio_dim=dims["audio"],
        emotion_dim=dims["emotion"],
        window=cfg.window,
        context=cfg.context,
        diffusion=cfg.diffusion,
        guidance=cfg.guidance,
        loss=cfg.loss,
    )
    batches = window_batches(motion_set, cfg.data, cfg.window, cfg.context, cfg.train.batch_size, cfg.train.seed)
    log.info("stage 2: preset %s, W=%d K=%d, %d train motion shards, dims %s",
             cfg.model, cfg.window, cfg.context, len(motion_set.train), dims)  # fmt: skip

    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        found = heldout_windows(motion_set, cfg.data, cfg.window, cfg.context, cfg.train.seed)
        if found is None:
            log.warning("no clip of %d frames: no evaluation windows", cfg.window)
            return {}
        group, batch = found
        figures = {f"{group}/{k}": v for k, v in evaluate_windows(task, models[DIT], batch, cfg.train.seed).items()}
        image = task.images(models, {k: v[:1] for k, v in batch.items()})
        (out / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / "images" / f"{group}_curves.png")
        for key, value in sorted(figures.items()):
            log.info("%s = %.4f", key, value)
        return figures

    meta = {
        "params": {"train_motion": cfg.model_dump(mode="json")},
        "lineage": {
            "motion": motion.name,
            **shards_lineage(motion_set.index_path),
            "stage1_weights_sha256": _index_dataset(motion_set.index_path).get("stage1_weights_sha256"),
            "stats_sha256": sha256_file(motion_set.root / "stats.json"),
        },
        "normalisation": motion_set.stats,  # generation undoes it: motion = normalised * std + mean
    }
    return train(task, cfg.train, batches, out, meta=meta, resume=resume, deepspeed=deepspeed, evaluate=evaluate,
                 progress=progress)  # fmt: skip


def _index_dataset(path: Path) -> dict:
    import json

    return json.loads(path.read_text()).get("dataset") or {}
