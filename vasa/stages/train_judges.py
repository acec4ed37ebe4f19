"""The evaluation judges (`vasa train-judges`, DVC stage `train_judges`): the sync expert behind S_C / S_D and
CAPP, trained by the shared engine (vasa/training/engine.py) on the train split of the shards, minus the
evaluation clips (vasa/loaders/judge_clips.py says which), and checked on those clips before they judge.

Output in OUT, one run folder per judge as every stage writes them: `sync/` and `capp/`, each with `model/`
(EMA weights as safetensors + model.json: preset, params, step, lineage, the log-mel normalisation),
`live/` (DVCLive metrics.json incl. the held-out check, plots), `images/` and `checkpoints/`.

The held-out check, on the evaluation clips' real video: S_C higher and S_D lower with the aligned audio
than with the audio shifted by params `evaluate.shift_frames`; CAPP higher for true pose/audio pairs than
for pairs shuffled across clips.

    python -m vasa.cli --params params.yaml train-judges --shards data/shards --out data/judges

The DVC stage trains on every train clip: the score stage's filters come from the sync expert trained here,
so a judge never decides its own training set. `--scores` (not in dvc.yaml) is the bootstrap's optional
second round: retrain on the clips the first judges kept, into another folder, and score again with it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vasa.core.config import EvaluateConfig, JudgesConfig
from vasa.evaluation import capp as capp_mod
from vasa.evaluation import sync as sync_mod
from vasa.evaluation.metrics import offset_distances, shift_audio, sync_score
from vasa.loaders.judge_clips import JudgeClip, evaluation_set, load_clips, mel_stats, normalise_mel
from vasa.loaders.scores import read_scores
from vasa.loaders.shards import ShardSet, open_shards
from vasa.training.checkpoint import shards_lineage
from vasa.training.engine import TrainResult, train

log = logging.getLogger(__name__)


def sync_check(model: sync_mod.SyncExpert, clips: list[JudgeClip], stats: dict, evaluate: EvaluateConfig) -> dict:
    """Mean S_C / S_D over clips with aligned and with shifted audio, and the margins (aligned better > 0)."""
    found: dict[str, list[float]] = {"aligned/S_C": [], "aligned/S_D": [], "shifted/S_C": [], "shifted/S_D": []}
    for clip in clips:
        mel = normalise_mel(clip.mel, stats)
        for name, audio in (("aligned", mel), ("shifted", shift_audio(mel, evaluate.shift_frames))):
            v, a = sync_mod.embed_clip(model, clip.mouths, audio)
            score = sync_score(offset_distances(v, a, evaluate.sync_offsets))
            found[f"{name}/S_C"].append(score.confidence)
            found[f"{name}/S_D"].append(score.distance)
    out = {k: float(np.mean(v)) for k, v in found.items()}
    out["margin/S_C"] = out["aligned/S_C"] - out["shifted/S_C"]
    out["margin/S_D"] = out["shifted/S_D"] - out["aligned/S_D"]
    out["clips"] = float(len(clips))
    return out


def capp_check(model: capp_mod.Capp, clips: list[JudgeClip], stats: dict, evaluate: EvaluateConfig) -> dict:
    """Mean CAPP of true pairs, of pairs with the audio of the next clip (shuffled) and with shifted audio."""
    mels = [normalise_mel(c.mel, stats) for c in clips]
    true, shuffled, shifted = [], [], []
    for i, clip in enumerate(clips):
        true.append(capp_mod.capp_scores(model, clip.angles, mels[i], evaluate.capp_stride))
        other = mels[(i + 1) % len(clips)]
        n = min(len(clip.angles), len(other))
        shuffled.append(capp_mod.capp_scores(model, clip.angles[:n], other[:n], evaluate.capp_stride))
        shifted.append(capp_mod.capp_scores(model, clip.angles, shift_audio(mels[i], evaluate.shift_frames),
                                            evaluate.capp_stride))  # fmt: skip
    out = {
        "true": float(np.concatenate(true).mean()),
        "shuffled": float(np.concatenate(shuffled).mean()),
        "shifted": float(np.concatenate(shifted).mean()),
        "windows": float(sum(len(t) for t in true)),
    }
    out["margin/shuffled"] = out["true"] - out["shuffled"]
    out["margin/shifted"] = out["true"] - out["shifted"]
    return out


def run(
    cfg: JudgesConfig,
    evaluate: EvaluateConfig,
    shards: Path,
    out: Path,
    *,
    scores: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, TrainResult]:
    """Train both judges on `shards` into `out/sync` and `out/capp` (library entry: config passed in); with a
    score table, without the train clips it rejected (the bootstrap's second round)."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    shard_set = open_shards(shards)
    group, why, eval_shards, eval_keys = evaluation_set(shard_set)
    table = read_scores(scores)
    train_clips = load_clips(shard_set.train, None, exclude=eval_keys | table.rejected_train)
    heldout = load_clips(eval_shards, eval_keys, exclude=set())
    stats = mel_stats(train_clips)
    mel_per_frame = train_clips[0].mel.shape[1] // _n_mels(shard_set)
    log.info("judges: %d train clips, %d evaluation clips (%s)", len(train_clips), len(heldout), group)
    meta = {
        "lineage": {"shards": shards.name, **shards_lineage(shard_set.index_path)},
        "normalisation": {"audio": stats},
        "trained_on": sorted(c.key for c in train_clips),
        **({"scores_sha256": table.sha256} if table.sha256 else {}),
        "evaluation": {"set": group, "why": why, "keys": sorted(eval_keys)},
    }
    results = {}
    sync_task = sync_mod.SyncTask(
        sync_mod.SYNC_PRESETS[cfg.sync.model], mel_per_frame, _n_mels(shard_set), cfg.sync.negatives,
        cfg.sync.temperature,
    )  # fmt: skip

    sync_evaluate = _heldout_check("sync", sync_mod.SYNC, sync_check, heldout, stats, evaluate)
    sync_source = sync_mod.sync_batches(
        train_clips, stats, mel_per_frame, cfg.sync, cfg.sync.train.batch_size, cfg.sync.train.seed
    )
    sync_meta = {**meta, "params": {"judges.sync": cfg.sync.model_dump(mode="json")}}
    results["sync"] = train(
        sync_task, cfg.sync.train, sync_source, out / "sync", meta=sync_meta, resume=resume, evaluate=sync_evaluate,
        progress=progress,
    )  # fmt: skip
    capp_task = capp_mod.CappTask(capp_mod.CAPP_PRESETS[cfg.capp.model], cfg.capp.window, train_clips[0].mel.shape[1])

    capp_evaluate = _heldout_check("capp", capp_mod.CAPP, capp_check, heldout, stats, evaluate)
    capp_source = capp_mod.capp_batches(
        train_clips, stats, cfg.capp.window, cfg.capp.train.batch_size, cfg.capp.train.seed
    )
    capp_meta = {**meta, "params": {"judges.capp": cfg.capp.model_dump(mode="json")}}
    results["capp"] = train(
        capp_task, cfg.capp.train, capp_source, out / "capp", meta=capp_meta, resume=resume, evaluate=capp_evaluate,
        progress=progress,
    )  # fmt: skip
    return results


def _heldout_check(name: str, model_key: str, check, heldout, stats: dict, evaluate: EvaluateConfig):
    """The engine's `evaluate` hook for one judge: `check` on the evaluation clips, logged, as heldout/* figures."""

    def run_check(models: dict[str, nn.Module]) -> dict[str, float]:
        figures = {f"heldout/{k}": v for k, v in check(models[model_key], heldout, stats, evaluate).items()}
        for key, value in sorted(figures.items()):
            log.info("%s %s = %.4f", name, key, value)
        return figures

    return run_check


def _n_mels(shard_set: ShardSet) -> int:
    dataset = json.loads(shard_set.index_path.read_text()).get("dataset") or {}
    return int(dataset.get("n_mels", 80))
