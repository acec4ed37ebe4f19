"""Stage `score` (`vasa score`): a score table of every shard sample, and the filters training applies.

    shards (crop mp4, landmarks, log-mel) + the trained sync expert (train_judges' sync/model)
      -> per clip: S_C, S_D and best offset over +-evaluate.sync_offsets (vasa/evaluation/screening.py),
         blur index, frozen blocks and iq_score (vasa/evaluation/image_quality.py)
      -> the judge check (median S_C margin against audio shifted by evaluate.shift_frames, on the judge's
         evaluation clips when the shards hold them, else on every clip)
      -> per clip: ok | corrected (audio_shift) | rejected (reason, detail), params `score`
      -> OUT/scores.parquet (vasa/loaders/scores.py) and METRICS (counts by status and reason, per split,
         the judge check, score quantiles, thresholds)

train_latent and extract_motion read the table (--scores): rejected train clips are never trained on,
corrected clips are re-aligned. The bootstrap: the judges train on every train clip, unfiltered (stage
`train_judges` does not read this table, so a judge never decides its own training set), then score every
clip; a second round (`vasa train-judges --scores`, outside dvc.yaml) may retrain them on the kept clips.

    python -m vasa.cli --params params.yaml score --shards data/shards --judges data/judges --out data/scores \
        --metrics data/metrics/score.json
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from tqdm import tqdm

from preprocessing import schema
from vasa.core.config import EvaluateConfig, ScoreConfig
from vasa.core.errors import InputError
from vasa.core.files import atomic_path
from vasa.core.weights import load_weights
from vasa.evaluation.image_quality import ImageQuality, image_quality
from vasa.evaluation.screening import SyncFinding, clip_sync, decide, judge_margin
from vasa.evaluation.sync import SYNC, SyncExpert, load_sync_expert
from vasa.loaders.judge_clips import normalise_mel, read_judge_clip
from vasa.loaders.scores import REASONS, REJECTED, SCORES_FILE, STATUSES, UNSCORABLE, write_scores
from vasa.loaders.shards import open_shards, read_samples

log = logging.getLogger(__name__)


@dataclass
class Measured:
    """One sample's measurements before the filters (sync/quality None when it could not be scored)."""

    row: dict
    sync: SyncFinding | None
    quality: ImageQuality | None
    error: str | None


@dataclass(frozen=True)
class SyncJudge:
    model: SyncExpert
    stats: dict  # log-mel normalisation of its training data
    sha256: str  # of its weights
    evaluation_keys: frozenset[str]  # the clips train-judges held out (never trained on)


def load_sync_judge(judges: Path) -> SyncJudge:
    """train-judges' sync expert in `judges/sync/model` (sha256-checked, no pickle)."""
    try:
        weights, meta = load_weights(judges / "sync" / "model")
    except (FileNotFoundError, OSError, KeyError, ValueError) as err:
        raise InputError(f"{judges}: no trained sync expert ({err}); run train-judges first") from None
    return SyncJudge(
        load_sync_expert(weights, meta["task"]),
        meta["normalisation"]["audio"],
        meta["weights"][SYNC]["sha256"],
        frozenset((meta.get("evaluation") or {}).get("keys") or ()),
    )


def measure_sample(
    sample: dict[str, bytes], model: SyncExpert, stats: dict, cfg: ScoreConfig, evaluate: EvaluateConfig
) -> tuple[SyncFinding, ImageQuality, int]:
    """Sync and image quality of one shard sample, and its frame count. KeyError/ValueError/FFmpegError when
    a member is missing or unusable."""
    clip = read_judge_clip(sample, keep_media=True)
    assert clip.frames is not None  # keep_media
    landmarks = np.load(io.BytesIO(sample[schema.LANDMARKS]), allow_pickle=False)[: len(clip.frames)]
    mel = normalise_mel(clip.mel, stats)
    sync = clip_sync(model, clip.mouths, mel, evaluate.sync_offsets, evaluate.shift_frames)
    return sync, image_quality(clip.frames, landmarks, cfg.quality.blur_frames), len(clip.frames)


def run(
    cfg: ScoreConfig, evaluate: EvaluateConfig, shards: Path, judges: Path, out: Path, *, progress: bool = True
) -> dict:
    """Score every sample of `shards` with the sync expert in `judges`, write OUT/scores.parquet; returns the
    metrics (library entry: config passed in)."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    shard_set = open_shards(shards)
    judge = load_sync_judge(judges)
    measured: list[Measured] = []
    total = sum(1 for paths in shard_set.splits.values() for _ in paths)
    bar = tqdm(total=total, unit="shard", desc="score", disable=not progress)
    for split, paths in sorted(shard_set.splits.items()):
        for path in paths:
            for sample in read_samples(path):
                measured.append(_measure(sample, split, path.name, judge.model, judge.stats, cfg, evaluate))
            bar.update(1)
    bar.close()
    if not measured:
        raise InputError(f"{shards}: no samples to score")
    scored = [m for m in measured if m.sync is not None]
    held_out = [m for m in scored if m.row["key"] in judge.evaluation_keys]
    checked = held_out or scored
    margin = judge_margin([m.sync for m in checked if m.sync is not None])
    sync_on = bool(margin >= cfg.sync.min_judge_margin)
    rows = [_decided(m, cfg, sync_on) for m in measured]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SCORES_FILE) as tmp:
        write_scores(rows, tmp)
    check = {
        "sync_sha256": judge.sha256,
        "checked_on": f"{len(held_out)} evaluation clips (never trained on)" if held_out else f"{len(scored)} clips",
        "margin": margin if math.isfinite(margin) else None,
        "min_margin": cfg.sync.min_judge_margin,
        "sync_filter": "on" if sync_on else f"off: judge margin {margin:.3f} < min_judge_margin",
    }
    if not sync_on:
        log.warning("score: sync filter off (judge margin %.3f < %.3f): no clip rejected for sync", margin,
                    cfg.sync.min_judge_margin)  # fmt: skip
    return summarise(rows, check, cfg)


def _measure(sample, split: str, shard: str, model, stats, cfg: ScoreConfig, evaluate: EvaluateConfig) -> Measured:
    meta = json.loads(sample[schema.JSON]) if schema.JSON in sample else {}
    provenance = meta.get("provenance") or {}
    row = {
        "key": sample["__key__"],
        "clip_id": str(provenance.get("clip_id", sample["__key__"])),
        "speaker_id": str(provenance.get("speaker_id", "")),
        "split": split,
        "shard": shard,
    }
    try:
        sync, quality, frames = measure_sample(sample, model, stats, cfg, evaluate)
    except (KeyError, ValueError, av.FFmpegError) as err:
        log.warning("%s: sample %s not scored: %s", shard, sample["__key__"], err)
        return Measured(row | {"frames": 0}, None, None, f"{type(err).__name__}: {err}"[:200])
    return Measured(row | {"frames": frames}, sync, quality, None)


def _decided(m: Measured, cfg: ScoreConfig, sync_on: bool) -> dict:
    nan = float("nan")
    if m.sync is None or m.quality is None:
        return m.row | {
            "sync_confidence": nan, "sync_distance": nan, "sync_offset": None, "blur": nan, "frozen": nan,
            "iq_score": nan, "status": REJECTED, "reason": UNSCORABLE, "detail": m.error, "audio_shift": 0,
        }  # fmt: skip
    decision = decide(m.sync.score if sync_on else None, m.quality, cfg)
    return m.row | {
        "sync_confidence": m.sync.score.confidence,
        "sync_distance": m.sync.score.distance,
        "sync_offset": m.sync.score.offset,
        "blur": m.quality.blur,
        "frozen": m.quality.frozen,
        "iq_score": m.quality.score,
        "status": decision.status,
        "reason": decision.reasons[0] if decision.reasons else None,
        "detail": decision.detail or None,
        "audio_shift": decision.audio_shift,
    }


def summarise(rows: list[dict], judge: dict, cfg: ScoreConfig) -> dict:
    """The stage metrics: counts by status, by split and status, rejections by reason (all splits and the train
    split: what training loses), corrected offsets, quantiles of the scores, the judge check, the thresholds."""
    by_split: dict[str, Counter] = {}
    for row in rows:
        by_split.setdefault(row["split"], Counter())[row["status"]] += 1
    rejected = [r for r in rows if r["status"] == REJECTED]

    def reasons(selected: list[dict]) -> dict[str, int]:
        found = Counter(r["reason"] for r in selected)
        return {reason: found[reason] for reason in REASONS if found[reason]}

    def quantiles(column: str) -> dict[str, float]:
        values = np.array([r[column] for r in rows if r[column] is not None and np.isfinite(r[column])])
        if not len(values):
            return {}
        q = np.percentile(values, [0, 10, 50, 90, 100])
        return dict(zip(("min", "p10", "median", "p90", "max"), (float(v) for v in q), strict=True))

    return {
        "clips": len(rows),
        "by_status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "by_split": {split: {s: c[s] for s in STATUSES} for split, c in sorted(by_split.items())},
        "rejected_by_reason": reasons(rejected),
        "train_rejected_by_reason": reasons([r for r in rejected if r["split"] == schema.TRAIN]),
        "corrected_offsets": dict(sorted(Counter(str(r["audio_shift"]) for r in rows if r["audio_shift"]).items())),
        "sync_confidence": quantiles("sync_confidence"),
        "iq_score": quantiles("iq_score"),
        "judge": judge,
        "thresholds": cfg.model_dump(mode="json"),
    }
