"""Stage-2 data: motion shards written by `extract_motion` and the motion-window loader of `train_motion`.

extract_motion (VASA-1 §3.2 trains the diffusion model on the motion latents of stage 1): the shards'
crop mp4 -> the trained stage-1 motion encoder (EMA weights, safetensors) -> per frame [z_pose (7), z_dyn]
-> one motion shard per input shard, same shard names and sample keys, with these members per sample:

    motion.npy    (T, M) float32, M = 7 + dynamics_dim: z_pose in the motion encoder's units (yaw, pitch,
                  roll in degrees, project sign convention; tx, ty, tz in half crop sides; log scale),
                  then z_dyn. Raw: normalise with stats.json.
    audio.npy     (T, k * n_mels) float32: the shard's log-mel, the k mel frames of each video frame
                  flattened (k = 4 at 25 fps with a 10 ms hop), so frame t's audio is row t.
    gaze.npy      (T, 2) float32 schema.GAZE_COLUMNS, degrees, relative to the head (copied).
    distance.npy  (T, 1) float32 head distance: log(crop side / scale_px), larger = farther (a pinhole
                  camera's apparent head size is inversely proportional to distance).
    emotion.npy   (T, E) float32 EMOTION_COLUMNS of the shard's expression.npy (smile and brow raise:
                  the expression columns that neither the speech (mouth) nor blinks (eyes) drive).
    json          the input sample's JSON (provenance included), unchanged.

Beside them: index.json (splits -> shards with their input digest and sha256; dataset block with the
stage-1 weights digest and dims) and stats.json (mean/std per motion and audio dimension over the TRAIN
split only; training normalises with it, generation undoes it). An input shard is re-encoded only when
its input digest changed (input shard sha256 + stage-1 weights sha256 + this code + settings).

Loader: windows of W frames with the K frames before them as context (zeros and has_pre False at a
clip's start), from the train split, shards resampled under a seed of (seed, epoch, rank, worker),
split by node then worker with vasa.data.worker_shards. Batch contract of vasa.train_motion_task:
    motion (B, W, M), motion_pre (B, K, M): normalised; audio (B, W, A), audio_pre (B, K, A): normalised;
    has_pre (B,) bool; gaze (B, 2) window-mean degrees; distance (B, 1) window mean; emotion (B, E) window mean.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from preprocessing import schema
from preprocessing.files import read_json, write_json
from preprocessing.shards import Sample, write_shard
from vasa.config import ExtractMotionConfig, MotionDataConfig
from vasa.data import decode_frames, read_samples, split_shards, to_tensor, worker_shards
from vasa.errors import InputError
from vasa.training.checkpoint import load_weights, sha256_file

log = logging.getLogger(__name__)

# Members of a motion shard sample (see the module docstring).
MOTION = "motion.npy"
AUDIO = "audio.npy"
GAZE = schema.GAZE
DISTANCE = "distance.npy"
EMOTION = "emotion.npy"
JSON = schema.JSON
MEMBERS = (MOTION, AUDIO, GAZE, DISTANCE, EMOTION, JSON)
EMOTION_COLUMNS = ("smile", "brow_raise")
POSE_NAMES = ("yaw_deg", "pitch_deg", "roll_deg", "tx", "ty", "tz", "log_scale")  # MotionEncoder z_pose
STATS_FILE = "stats.json"
INDEX_FILE = schema.INDEX_FILE
FORMAT = "vasa-motion-shards/1"
GENERATOR = "generator"  # the stage-1 module holding the motion encoder (vasa/train_latent_task.py)
# Source files whose change changes the bytes written: part of every shard's input digest.
CODE_FILES = ("vasa/motion_data.py", "vasa/data.py", "vasa/models/motion_encoder.py", "vasa/models/layers.py")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()


# --- the stage-1 motion encoder ----------------------------------------------------------------------


@dataclass
class Stage1Encoder:
    """The stage-1 motion encoder with its EMA weights: (B, 3, S, S) in [-1, 1] -> (B, 7 + Z)."""

    module: torch.nn.Module
    resolution: int  # S
    weights_sha256: str  # of the generator's safetensors file (from model.json, verified on load)
    device: torch.device

    @torch.no_grad()
    def encode(self, frames: np.ndarray, batch_size: int) -> np.ndarray:
        """(T, S, S, 3) uint8 RGB -> (T, 7 + Z) float32 [z_pose, z_dyn], `batch_size` frames at a time."""
        out = []
        for start in range(0, len(frames), batch_size):
            batch = torch.stack([to_tensor(f) for f in frames[start : start + batch_size]]).to(self.device)
            pose, dyn = self.module(batch)
            out.append(torch.cat([pose, dyn], dim=1).float().cpu().numpy())
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
    return Stage1Encoder(module.to(target).eval(), preset.resolution, meta["weights"][GENERATOR]["sha256"], target)


# --- extract_motion ------------------------------------------------------------------------------------


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found (run the preprocess stage first)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable: {err}") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise InputError(f"{path}: no `splits` mapping")
    return index


def motion_sample(
    sample: dict[str, bytes], encoder: Stage1Encoder, crop_size: int, batch_size: int, fps: float = 25.0
) -> Sample:
    """One input shard sample -> its motion sample (members in MEMBERS). Raises KeyError/ValueError on
    a sample that lacks a member or cannot be decoded."""
    frames = decode_frames(sample[schema.MP4], encoder.resolution)
    pose = _load_npy(sample[schema.POSE]).astype(np.float32)
    gaze = _load_npy(sample[schema.GAZE]).astype(np.float32)
    expression = _load_npy(sample[schema.EXPRESSION]).astype(np.float32)
    mel = _load_npy(sample[schema.MEL]).astype(np.float32)
    per_frame = max(1, round(len(mel) / max(len(pose), 1)))  # k mel frames per video frame
    # Equal by the schema; a short decode or feature must never index past the end.
    t = min(len(frames), len(pose), len(gaze), len(expression), len(mel) // per_frame)
    if t < 1:
        raise ValueError("no frame with video, pose, gaze, expression and mel")
    motion = encoder.encode(frames[:t], batch_size)
    audio = mel[: t * per_frame].reshape(t, per_frame * mel.shape[1])
    scale = pose[:t, schema.POSE_COLUMNS.index("scale_px")]
    distance = np.log(crop_size / np.clip(scale, 1e-6, None))[:, None].astype(np.float32)
    columns = [schema.EXPRESSION_COLUMNS.index(c) for c in EMOTION_COLUMNS]
    members = {
        MOTION: _npy(motion),
        AUDIO: _npy(audio.astype(np.float32)),
        GAZE: _npy(gaze[:t]),
        DISTANCE: _npy(distance),
        EMOTION: _npy(expression[:t, columns]),
        JSON: sample[schema.JSON],
    }
    return Sample(sample["__key__"], members, frames=t, seconds=t / fps)


def extract(
    cfg: ExtractMotionConfig, shards: Path, stage1: Path, out: Path, *, progress: bool = True
) -> dict[str, int]:
    """Encode every sample of the shards in `shards` with the stage-1 model in `stage1` into motion
    shards in `out`; unchanged input shards are kept. Returns counts: shards done/kept, samples, failed."""
    index_path = shards / INDEX_FILE
    index = _read_index(index_path)
    dataset = index.get("dataset") if isinstance(index.get("dataset"), dict) else {}
    crop_size = dataset.get("crop_size")
    if not isinstance(crop_size, int):
        raise InputError(f"{index_path}: no dataset.crop_size (needed for the head distance)")
    encoder = load_stage1_encoder(stage1, cfg.device)
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
    counts = {"redone": 0, "kept": 0, "samples": 0, "failed": 0}
    splits: dict[str, list[dict]] = {}
    failures: list[dict] = []
    bar = tqdm(total=sum(n for _, _, n in plan), unit="clip", desc="extract-motion", disable=not progress)
    for split, path, n_samples in plan:
        digest = hashlib.sha256(
            json.dumps(
                {"input": sha256_file(path), "stage1": encoder.weights_sha256, "code": code, **settings},
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
            counts["kept"] += 1
            bar.update(n_samples)
            continue
        samples = []
        for sample in read_samples(path):
            try:
                samples.append(motion_sample(sample, encoder, crop_size, cfg.batch_size, dataset.get("fps", 25)))
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
    counts["failed"] = len(failures)
    stats = train_stats(out, splits.get(schema.TRAIN, []), cfg.std_floor)
    write_json(out / STATS_FILE, stats)
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
    }
    for name in sorted(set(old_entries) - {e["shard"] for entries in splits.values() for e in entries}):
        (out / name).unlink(missing_ok=True)  # only files the previous index listed are ever removed
    write_json(out / INDEX_FILE, new_index)
    return counts


def _dims(path: Path) -> dict[str, int]:
    sample = next(read_samples(path))
    return {
        "motion": int(_load_npy(sample[MOTION]).shape[1]),
        "audio": int(_load_npy(sample[AUDIO]).shape[1]),
        "emotion": int(_load_npy(sample[EMOTION]).shape[1]),
    }


def train_stats(out: Path, entries: list[dict], std_floor: float) -> dict:
    """Mean/std per dimension of motion and audio over the train split's motion shards (float64 sums in
    shard and sample order: deterministic). A std below `std_floor` is stored as 1 (centre only)."""
    sums: dict[str, list] = {}
    frames = 0
    for entry in entries:
        for sample in read_samples(out / entry["shard"]):
            for member in (MOTION, AUDIO):
                x = _load_npy(sample[member]).astype(np.float64)
                s, q = x.sum(0), np.square(x).sum(0)
                if member in sums:
                    sums[member][0] += s
                    sums[member][1] += q
                else:
                    sums[member] = [s, q]
            frames += len(_load_npy(sample[MOTION]))
    if frames == 0:
        raise InputError(f"{out}: the train split has no motion frames: no normalisation statistics")
    stats: dict = {"split": schema.TRAIN, "frames": frames, "std_floor": std_floor}
    for member, name in ((MOTION, "motion"), (AUDIO, "audio")):
        mean = sums[member][0] / frames
        std = np.sqrt(np.maximum(sums[member][1] / frames - mean**2, 0.0))
        std = np.where(std < std_floor, 1.0, std)
        stats[name] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return stats


# --- the motion-window loader ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MotionSet:
    """The motion shards of one extract_motion output, as its index.json and stats.json describe them."""

    root: Path
    index_path: Path
    splits: dict[str, tuple[Path, ...]]
    stats: dict
    dims: dict[str, int]

    @property
    def train(self) -> tuple[Path, ...]:
        return self.splits.get(schema.TRAIN, ())

    def heldout(self) -> tuple[Path, ...]:
        return tuple(p for split in (schema.VAL, schema.TEST) for p in self.splits.get(split, ()))


def open_motion(root: Path) -> MotionSet:
    """Read `root/index.json` and `root/stats.json`; errors name the file and what is wrong."""
    index_path = root / INDEX_FILE
    index = _read_index(index_path)
    dataset = index.get("dataset") or {}
    if dataset.get("format") != FORMAT:
        raise InputError(f"{index_path}: not motion shards of format {FORMAT} (got {dataset.get('format')!r})")
    stats = read_json(root / STATS_FILE)
    if stats is None:
        raise InputError(f"{root / STATS_FILE}: missing or unreadable (re-run extract-motion)")
    splits = split_shards(index, root, index_path)
    if not splits.get(schema.TRAIN):
        raise InputError(f"{index_path}: the train split has no motion shards")
    return MotionSet(root, index_path, splits, stats, dataset["dims"])


@dataclass
class MotionClip:
    """One clip's per-frame arrays, normalised where the contract says so (T frames each)."""

    key: str
    motion: np.ndarray  # (T, M)
    audio: np.ndarray  # (T, A)
    gaze: np.ndarray  # (T, 2)
    distance: np.ndarray  # (T, 1)
    emotion: np.ndarray  # (T, E)


def read_clip(sample: dict[str, bytes], stats: dict) -> MotionClip:
    def norm(x: np.ndarray, block: dict) -> np.ndarray:
        return ((x - np.asarray(block["mean"])) / np.asarray(block["std"])).astype(np.float32)

    return MotionClip(
        sample["__key__"],
        norm(_load_npy(sample[MOTION]), stats["motion"]),
        norm(_load_npy(sample[AUDIO]), stats["audio"]),
        _load_npy(sample[GAZE]).astype(np.float32),
        _load_npy(sample[DISTANCE]).astype(np.float32),
        _load_npy(sample[EMOTION]).astype(np.float32),
    )


def window_item(clip: MotionClip, start: int, window: int, context: int) -> dict[str, torch.Tensor]:
    """The window clip[start : start + window] with its K context frames. A window with fewer than K
    frames before it is a clip-start window: zero context, has_pre False (VASA-1 generates the first
    window without X_pre/A_pre)."""
    end = start + window
    has_pre = start >= context
    if has_pre:
        motion_pre, audio_pre = clip.motion[start - context : start], clip.audio[start - context : start]
    else:
        motion_pre = np.zeros((context, clip.motion.shape[1]), np.float32)
        audio_pre = np.zeros((context, clip.audio.shape[1]), np.float32)
    return {
        "motion": torch.from_numpy(clip.motion[start:end].copy()),
        "motion_pre": torch.from_numpy(np.ascontiguousarray(motion_pre)),
        "audio": torch.from_numpy(clip.audio[start:end].copy()),
        "audio_pre": torch.from_numpy(np.ascontiguousarray(audio_pre)),
        "has_pre": torch.tensor(has_pre),
        "gaze": torch.from_numpy(clip.gaze[start:end].mean(0)),
        "distance": torch.from_numpy(clip.distance[start:end].mean(0)),
        "emotion": torch.from_numpy(clip.emotion[start:end].mean(0)),
    }


def draw_start(rng: random.Random, frames: int, window: int, context: int) -> int:
    """A window start in [0, frames - window]; starts with fewer than K frames before them snap to 0, so
    has_pre False always means a true clip start."""
    start = rng.randrange(frames - window + 1)
    return 0 if start < context else start


class WindowStream(IterableDataset):
    """Endless stream of single motion windows from the train split for one rank and epoch."""

    def __init__(
        self, motion_set: MotionSet, cfg: MotionDataConfig, window: int, context: int, seed: int, epoch: int,
        rank: int, world: int,
    ):  # fmt: skip
        self.shards, self.stats, self.cfg = motion_set.train, motion_set.stats, cfg
        self.window, self.context = window, context
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A str seed is hashed with SHA-512 by `random`: stable across runs and platforms.
        rng = random.Random(f"vasa.motion_data/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        mine = worker_shards(self.shards, self.rank, self.world, worker, workers)
        buffer: list[MotionClip] = []
        usable, visited = 0, set()
        for path, clip in self._clips(rng, mine):
            visited.add(path)
            if len(clip.motion) < self.window:
                if usable == 0 and len(visited) == len(set(mine)):  # every shard read once, not one window
                    raise InputError(f"no train clip of {mine[0].parent} has the {self.window} frames a window needs")
                continue
            usable += 1
            if len(buffer) >= self.cfg.shuffle_buffer:
                buffer.pop(rng.randrange(len(buffer)))
            buffer.append(clip)
            for _ in range(self.cfg.windows_per_clip):
                chosen = buffer[rng.randrange(len(buffer))]
                yield window_item(chosen, draw_start(rng, len(chosen.motion), self.window, self.context), self.window,
                                  self.context)  # fmt: skip

    def _clips(self, rng: random.Random, shards: tuple[Path, ...]) -> Iterator[tuple[Path, MotionClip]]:
        while True:  # shards resampled with replacement, forever
            path = shards[rng.randrange(len(shards))]
            for sample in read_samples(path):
                yield path, read_clip(sample, self.stats)


def window_batches(
    motion_set: MotionSet, cfg: MotionDataConfig, window: int, context: int, batch_size: int, seed: int
) -> Callable[[int, int, int], Iterator[dict[str, torch.Tensor]]]:
    """The engine's batch source: `(epoch, rank, world) -> iterator of batch dicts`."""

    def source(epoch: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = WindowStream(motion_set, cfg, window, context, seed, epoch, rank, world)
        return iter(DataLoader(stream, batch_size=batch_size, num_workers=cfg.workers))

    return source


def heldout_windows(
    motion_set: MotionSet, cfg: MotionDataConfig, window: int, context: int, seed: int
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """Deterministic evaluation windows: from the val/test splits when they have clips long enough,
    else from the train split (then the figures are not held out: the group name says which).
    Returns (group, batch of up to `cfg.eval_windows` windows) or None when no clip is long enough."""
    rng = random.Random(f"vasa.motion_data.heldout/{seed}")
    for group, shards in (("heldout", motion_set.heldout()), ("train", motion_set.train)):
        clips = [
            clip
            for path in shards
            for clip in (read_clip(s, motion_set.stats) for s in read_samples(path))
            if len(clip.motion) >= window
        ]
        if not clips:
            continue
        items = []
        for n in range(cfg.eval_windows):
            clip = clips[n % len(clips)]
            items.append(window_item(clip, draw_start(rng, len(clip.motion), window, context), window, context))
        return group, {key: torch.stack([item[key] for item in items]) for key in items[0]}
    return None
