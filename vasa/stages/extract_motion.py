"""Stage `extract_motion` (`vasa extract-motion`, VASA-1 §3.2 trains the diffusion model on the motion
latents of stage 1): the shards' crop mp4 -> the trained stage-1 motion encoder -> one motion shard per
input shard, same shard names and sample keys, plus index.json and the train-split stats.json. The
motion-shard format is documented in vasa/loaders/motion.py. An input shard is re-encoded only when
its input digest changed (input shard sha256 + stage-1 weights sha256 + this code + settings + the score
table's decisions on its samples).

With a score table (`--scores`, vasa/loaders/scores.py): train clips it rejected are left out (index.json
`filtered`, with the reason), and clips it corrected are re-aligned in every split (`align_audio`: the audio
features move by the offset the sync expert found, the unmatched ends are dropped), so stage 2 learns
motion from speech that drives it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from preprocessing import schema
from preprocessing.schema import INDEX_FILE
from preprocessing.shards import Sample, write_shard
from vasa.core import digests
from vasa.core.config import ExtractMotionConfig
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.files import read_json, write_json
from vasa.inference.encoder import Stage1Encoder, load_stage1_encoder
from vasa.loaders.motion import (
    ARRAYS_DIR,
    AUDIO,
    DISTANCE,
    EMOTION,
    FORMAT,
    GAZE,
    JSON,
    MOTION,
    POSE_NAMES,
    STATS_FILE,
    load_npy,
    npy,
    write_arrays,
)
from vasa.loaders.scores import Scores, align_audio, read_scores
from vasa.loaders.shards import decode_frames, read_index, read_samples
from vasa.models.motion_dit import EMOTION_COLUMNS
from vasa.models.motion_encoder import EXPRESSION_DIMS, POSE_DIM, POSE_REST_PERCENTILE, REST_PERCENTILES

log = logging.getLogger(__name__)


def code_digest() -> str:
    """The code that shapes the bytes written (this module's import closure): part of every shard's digest."""
    return digests.code_digest((__name__,))


def motion_sample(
    sample: dict[str, bytes],
    encoder: Stage1Encoder,
    crop_size: int,
    batch_size: int,
    fps: float,
    audio_shift: int = 0,
) -> Sample:
    """One input shard sample -> its motion sample (members in MEMBERS), its audio moved by `audio_shift`
    frames against the video (vasa.loaders.scores.align_audio). Raises KeyError/ValueError on a sample that
    lacks a member or cannot be decoded."""
    frames = decode_frames(sample[schema.MP4], encoder.resolution)
    pose = load_npy(sample[schema.POSE]).astype(np.float32)
    gaze = load_npy(sample[schema.GAZE]).astype(np.float32)
    expression = load_npy(sample[schema.EXPRESSION]).astype(np.float32)
    mel = load_npy(sample[schema.MEL]).astype(np.float32)
    per_frame = max(1, round(len(mel) / max(len(pose), 1)))  # k mel frames per video frame
    # Equal by the schema; a short decode or feature must never index past the end.
    t = min(len(frames), len(pose), len(gaze), len(expression), len(mel) // per_frame)
    if t < 1:
        raise ValueError("no frame with video, pose, gaze, expression and mel")
    motion = encoder.encode(frames[:t], batch_size, expression[:t], pose[:t], crop_size)
    if encoder.measured_expression:  # stage 2 learns the expression relative to this clip's face at rest
        head = motion[:, POSE_DIM : POSE_DIM + EXPRESSION_DIMS]
        head -= np.percentile(head, REST_PERCENTILES, axis=0).diagonal()[None].astype(np.float32)  # column k at its q_k
    if encoder.measured_pose:  # ... and the head pose relative to this clip's median pose (POSE_REST_PERCENTILE)
        rest = np.percentile(motion[:, :POSE_DIM], POSE_REST_PERCENTILE, axis=0)
        motion[:, :POSE_DIM] -= rest[None].astype(np.float32)
    audio = mel[: t * per_frame].reshape(t, per_frame * mel.shape[1])
    scale = pose[:t, schema.POSE_COLUMNS.index("scale_px")]
    distance = np.log(crop_size / np.clip(scale, 1e-6, None))[:, None].astype(np.float32)
    columns = [schema.EXPRESSION_COLUMNS.index(c) for c in EMOTION_COLUMNS]
    (motion, gaze_t, distance, emotion), audio = align_audio(
        [motion, gaze[:t], distance, expression[:t, columns]], audio, audio_shift
    )
    t = len(motion)
    members = {
        MOTION: npy(motion),
        AUDIO: npy(audio.astype(np.float32)),
        GAZE: npy(gaze_t),
        DISTANCE: npy(distance),
        EMOTION: npy(emotion),
        JSON: sample[schema.JSON],
    }
    return Sample(sample["__key__"], members, frames=t, seconds=t / fps)


def extract(
    cfg: ExtractMotionConfig,
    shards: Path,
    stage1: Path,
    out: Path,
    *,
    scores: Path | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Encode every sample of the shards in `shards` with the stage-1 model in `stage1` into motion
    shards in `out`, filtered and re-aligned by the score table `scores` (None: every sample as it is);
    unchanged input shards are kept. Returns counts: shards done/kept, samples, failed, filtered, realigned."""
    index_path = shards / INDEX_FILE
    index = read_index(index_path)
    dataset = index.get("dataset") if isinstance(index.get("dataset"), dict) else {}
    crop_size = dataset.get("crop_size")
    if not isinstance(crop_size, int):
        raise InputError(f"{index_path}: no dataset.crop_size (needed for the head distance)")
    encoder = load_stage1_encoder(stage1, cfg.device)
    table = read_scores(scores)
    code = code_digest()
    settings = {"batch_size": cfg.batch_size, "device": encoder.device.type, "format": FORMAT}
    out.mkdir(parents=True, exist_ok=True)
    old = read_json(out / INDEX_FILE) or {}
    old_entries = {e["shard"]: e for s in old.get("splits", {}).values() for e in s.get("shards", [])}
    plan = []
    for split, entry in sorted(index["splits"].items()):
        for shard in entry.get("shards", []):
            path = shards / shard["shard"]
            if not path.is_file():
                raise InputError(f"{index_path}: split {split} lists a missing shard {shard['shard']}")
            plan.append((split, path, shard.get("samples", 0)))
    counts = {"redone": 0, "kept": 0, "samples": 0, "failed": 0, "filtered": 0, "realigned": 0}
    splits: dict[str, list[dict]] = {}
    failures: list[dict] = []
    filtered: list[dict] = []
    bar = tqdm(total=sum(n for _, _, n in plan), unit="clip", desc="extract-motion", disable=not progress)
    for split, path, n_samples in plan:
        digest = hashlib.sha256(
            json.dumps(
                {
                    "input": sha256_file(path),
                    "stage1": encoder.weights_sha256,
                    "code": code,
                    **settings,
                    "scores": _score_decisions(table, path.name, split),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        target = out / path.name
        previous = old_entries.get(path.name)
        if (
            previous is not None
            and previous.get("input_digest") == digest
            and target.is_file()
            and sha256_file(target) == previous.get("sha256")
        ):
            splits.setdefault(split, []).append(previous)
            failures += [f for f in old.get("failures", []) if f.get("shard") == path.name]
            filtered += [f for f in old.get("filtered", []) if f.get("shard") == path.name]
            counts["kept"] += 1
            bar.update(n_samples)
            continue
        samples = []
        for sample in read_samples(path):
            row = table.rows.get(sample["__key__"])
            if split == schema.TRAIN and sample["__key__"] in table.rejected_train:
                filtered.append({"shard": path.name, "key": sample["__key__"], "reason": row["reason"],
                                 "detail": row["detail"]})  # fmt: skip
                bar.update(1)
                continue
            shift = table.audio_shift(sample["__key__"])
            try:
                samples.append(motion_sample(sample, encoder, crop_size, cfg.batch_size, dataset["fps"], shift))
            except (KeyError, ValueError, av.FFmpegError) as err:
                log.warning("%s: sample %s left out: %s", path.name, sample.get("__key__"), err)
                failures.append({"shard": path.name, "key": sample.get("__key__"), "reason": str(err)[:200]})
            bar.update(1)
        write_shard(target, samples)
        entry = {
            "shard": path.name,
            "samples": len(samples),
            "frames": sum(s.frames for s in samples),
            "input_digest": digest,
            "sha256": sha256_file(target),
        }
        splits.setdefault(split, []).append(entry)
        counts["redone"] += 1
    bar.close()
    counts["samples"] = sum(e["samples"] for entries in splits.values() for e in entries)
    counts["failed"], counts["filtered"] = len(failures), len(filtered)
    counts["realigned"] = sum(1 for r in table.rows.values() if r["audio_shift"])
    stats = train_stats(out, splits.get(schema.TRAIN, []), cfg.std_floor) | rest_convention(
        encoder.measured_expression, encoder.measured_pose
    )
    write_json(out / STATS_FILE, stats)
    arrays = _train_arrays(out, splits.get(schema.TRAIN, []), stats, code, (old.get("dataset") or {}).get("arrays"))
    first = next((e for entries in splits.values() for e in entries if e["samples"]), None)
    dims = _dims(out / first["shard"]) if first else {}
    new_index = {
        "dataset": {
            "format": FORMAT,
            "source_index_sha256": sha256_file(index_path),
            "source_dataset": dataset,
            "stage1_weights_sha256": encoder.weights_sha256,
            "code_sha256": code,
            "motion_columns": list(POSE_NAMES) + [f"z_dyn_{i}" for i in range(dims.get("motion", 7) - 7)],
            "emotion_columns": list(EMOTION_COLUMNS),
            "dims": dims,
            "stats_sha256": sha256_file(out / STATS_FILE),
            "arrays": arrays,
            "scores_sha256": table.sha256,
        },
        "splits": {
            split: {
                "shards": entries,
                "samples": sum(e["samples"] for e in entries),
                "frames": sum(e["frames"] for e in entries),
            }
            for split, entries in sorted(splits.items())
        },
        "failures": failures,
        "filtered": filtered,
    }
    for name in sorted(set(old_entries) - {e["shard"] for entries in splits.values() for e in entries}):
        (out / name).unlink(missing_ok=True)  # only files the previous index listed are ever removed
    write_json(out / INDEX_FILE, new_index)
    return counts


def _train_arrays(out: Path, entries: list[dict], stats: dict, code: str, previous: dict | None) -> dict:
    """The train split as memory-mapped arrays (vasa/loaders/motion.py `write_arrays`), rewritten only when
    the train shards, the statistics or the code changed: the index's `dataset.arrays` entry."""
    digest = hashlib.sha256(
        json.dumps({"shards": [e["sha256"] for e in entries], "stats": stats, "code": code}, sort_keys=True).encode()
    ).hexdigest()
    folder = out / ARRAYS_DIR / schema.TRAIN
    train = (previous or {}).get(schema.TRAIN) or {}
    if train.get("input_digest") == digest and all((folder / name).is_file() for name in train.get("sha256", {})):
        return previous  # type: ignore[return-value]
    written = write_arrays(out, tuple(out / e["shard"] for e in entries), stats)
    return {schema.TRAIN: {"input_digest": digest, **written}}


def _score_decisions(table: Scores, shard: str, split: str) -> list:
    """What the score table decides for one shard's samples (part of its digest): rejected train keys and
    the audio shifts; empty without a table."""
    rejected = table.rejected_train if split == schema.TRAIN else frozenset()
    return [[r["key"], r["key"] in rejected, int(r["audio_shift"] or 0)] for r in table.shard_rows(shard)]


def _dims(path: Path) -> dict[str, int]:
    sample = next(read_samples(path))
    return {
        "motion": int(load_npy(sample[MOTION]).shape[1]),
        "audio": int(load_npy(sample[AUDIO]).shape[1]),
        "emotion": int(load_npy(sample[EMOTION]).shape[1]),
    }


def train_stats(out: Path, entries: list[dict], std_floor: float) -> dict:
    """Mean/std per dimension of motion and audio over the train split's motion shards (float64 sums in
    shard and sample order: deterministic). A std below `std_floor` is stored as 1 (centre only)."""
    sums: dict[str, list] = {}
    frames = 0
    for entry in entries:
        for sample in read_samples(out / entry["shard"]):
            for member in (MOTION, AUDIO):
                x = load_npy(sample[member]).astype(np.float64)
                s, q = x.sum(0), np.square(x).sum(0)
                if member in sums:
                    sums[member][0] += s
                    sums[member][1] += q
                else:
                    sums[member] = [s, q]
            frames += len(load_npy(sample[MOTION]))
    if frames == 0:
        raise InputError(f"{out}: the train split has no motion frames: no normalisation statistics")
    stats: dict = {"split": schema.TRAIN, "frames": frames, "std_floor": std_floor}
    for member, name in ((MOTION, "motion"), (AUDIO, "audio")):
        mean = sums[member][0] / frames
        std = np.sqrt(np.maximum(sums[member][1] / frames - mean**2, 0.0))
        std = np.where(std < std_floor, 1.0, std)
        stats[name] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return stats


def rest_convention(measured: bool, measured_pose: bool = False) -> dict:
    """stats.json's note of how the motion's expression dims (`expression_rest`) and head pose (`pose_rest`) are
    stored (generation reads it from the bundle): relative to the face at rest (REST_PERCENTILES of the clip;
    the pose: its POSE_REST_PERCENTILE), or as they were measured or encoded (None)."""
    dims = list(range(POSE_DIM, POSE_DIM + EXPRESSION_DIMS))
    pose = {"motion_dims": list(range(POSE_DIM)), "percentiles": [POSE_REST_PERCENTILE] * POSE_DIM}
    return {
        "expression_rest": {"motion_dims": dims, "percentiles": list(REST_PERCENTILES)} if measured else None,
        "pose_rest": pose if measured_pose else None,
    }
