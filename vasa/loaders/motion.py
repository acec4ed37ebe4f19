"""Stage-2 data: the motion-shard format (written by vasa/stages/extract_motion.py) and the motion-window
loader of `train_motion`.

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

Beside them, arrays/train/: the train split as memory-mapped arrays (`write_arrays`, rebuilt by
extract_motion whenever the train shards or stats change): motion, audio, gaze, distance and emotion .npy,
every clip's frames concatenated in index order and normalised as `read_clip` does, clips.npy (C, 2) int64
(first row, frames) and keys.json. The tar shards stay the format of record (provenance, audit, held-out
figures); the arrays are what training reads.

Loader (`ArrayWindows`): batches of windows of W frames with the K frames before them as context (zeros and
has_pre False at a clip's start) drawn at random from the train clips (a clip uniformly, then a start
uniformly; starts with fewer than K frames before them snap to 0), gathered from the memory-mapped arrays
in one indexing per array and batch: no clip is decoded or held, so a worker's memory is the pages the OS
maps and its cost per window a few microseconds. Clips are split by rank then worker (all clips when there
are fewer clips than slices), each slice drawing under a seed of (seed, epoch, rank, worker). Batch contract
of vasa.training.motion_task:
    motion (B, W, M), motion_pre (B, K, M): normalised; audio (B, W, A), audio_pre (B, K, A): normalised;
    has_pre (B,) bool; gaze (B, 2) window-mean degrees; distance (B, 1) window mean; emotion (B, E) window mean.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from preprocessing import schema
from vasa.core.config import MotionDataConfig
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.files import read_json, write_json
from vasa.loaders.shards import read_index, read_samples, split_shards

log = logging.getLogger(__name__)


# Members of a motion shard sample (see the module docstring).
MOTION = "motion.npy"


AUDIO = "audio.npy"


GAZE = schema.GAZE


DISTANCE = "distance.npy"


EMOTION = "emotion.npy"


JSON = schema.JSON


MEMBERS = (MOTION, AUDIO, GAZE, DISTANCE, EMOTION, JSON)


POSE_NAMES = ("yaw_deg", "pitch_deg", "roll_deg", "tx", "ty", "tz", "log_scale")  # MotionEncoder z_pose


STATS_FILE = "stats.json"


INDEX_FILE = schema.INDEX_FILE


FORMAT = "vasa-motion-shards/1"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_shape(data: bytes) -> tuple[int, ...]:
    """The shape an npy member holds, from its header alone (nothing else parsed)."""
    buffer = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(buffer)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, _ = read(buffer)
    return tuple(shape)


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
    index = read_index(index_path)
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
        norm(load_npy(sample[MOTION]), stats["motion"]),
        norm(load_npy(sample[AUDIO]), stats["audio"]),
        load_npy(sample[GAZE]).astype(np.float32),
        load_npy(sample[DISTANCE]).astype(np.float32),
        load_npy(sample[EMOTION]).astype(np.float32),
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


ARRAYS_DIR = "arrays"  # root/arrays/<split>/: the split's clips as memory-mappable arrays
ARRAY_MEMBERS = ("motion", "audio", "gaze", "distance", "emotion")
_ARRAY_MEMBER_FILES = dict(zip(ARRAY_MEMBERS, (MOTION, AUDIO, GAZE, DISTANCE, EMOTION), strict=True))
CLIPS_FILE = "clips.npy"  # (C, 2) int64: each clip's first row in the arrays and its frames
KEYS_FILE = "keys.json"  # the clips' sample keys, in the same order


def write_arrays(root: Path, shards: tuple[Path, ...], stats: dict, split: str = schema.TRAIN) -> dict:
    """The clips of `shards` (in that order, samples in shard order), normalised as `read_clip` normalises
    them, written to root/arrays/<split>/ (module docstring). Filled in place through `open_memmap` (a first
    pass reads the clips' lengths): memory is one clip, whatever the split's size. Written beside and swapped
    in whole: a killed run leaves the previous arrays. Returns {"frames", "clips", "sha256": {file: digest}}."""
    folder = root / ARRAYS_DIR / split
    rows, keys, frames = [], [], 0
    dims: dict[str, tuple[int, ...]] = {}
    for path in shards:  # the first pass reads the npy headers only
        for sample in read_samples(path):
            shapes = {name: npy_shape(sample[member]) for name, member in _ARRAY_MEMBER_FILES.items()}
            rows.append((frames, shapes["motion"][0]))
            keys.append(f"{path.name}/{sample['__key__']}")
            frames += shapes["motion"][0]
            dims = {name: shape[1:] for name, shape in shapes.items()}
    if not rows:
        raise InputError(f"{root}: the {split} split has no clips to write as arrays")
    staging = folder.with_name(f".{split}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    arrays = {
        name: np.lib.format.open_memmap(
            staging / f"{name}.npy", mode="w+", dtype=np.float32, shape=(frames, *dims[name])
        )  # fmt: skip
        for name in ARRAY_MEMBERS
    }
    row = 0
    for path in shards:
        for sample in read_samples(path):
            clip = read_clip(sample, stats)
            for name, array in arrays.items():
                array[row : row + len(clip.motion)] = getattr(clip, name)
            row += len(clip.motion)
    for array in arrays.values():
        array.flush()
    del arrays
    np.save(staging / CLIPS_FILE, np.asarray(rows, np.int64), allow_pickle=False)
    write_json(staging / KEYS_FILE, {"keys": keys})
    files = [f"{name}.npy" for name in ARRAY_MEMBERS] + [CLIPS_FILE, KEYS_FILE]
    digests = {name: sha256_file(staging / name) for name in files}
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return {"frames": frames, "clips": len(rows), "sha256": digests}


class ArrayWindows(IterableDataset):
    """Endless batches of motion windows from root/arrays/train for one rank and epoch (module docstring)."""

    def __init__(
        self, root: Path, window: int, context: int, batch_size: int, seed: int, epoch: int, rank: int, world: int
    ) -> None:
        self.folder = root / ARRAYS_DIR / schema.TRAIN
        self.window, self.context, self.batch_size = window, context, batch_size
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world

    def open(self, worker: int = 0, workers: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The memory-mapped arrays and this slice's usable clips ((C, 2): first row, frames)."""
        try:
            arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ARRAY_MEMBERS}
            clips = np.load(self.folder / CLIPS_FILE, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{self.folder}: the train split's motion arrays are missing or unreadable ({err}); "
                             "re-run extract-motion") from None  # fmt: skip
        usable = clips[clips[:, 1] >= self.window]
        if not len(usable):
            raise InputError(f"no train clip of {self.folder} has the {self.window} frames a window needs")
        slices = self.world * workers
        mine = usable[self.rank :: self.world][worker::workers]
        return arrays, (usable if len(usable) < slices or not len(mine) else mine)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        arrays, clips = self.open(worker, workers)
        seed = hashlib.sha256(f"vasa.motion_arrays/{self.seed}/{self.epoch}/{self.rank}/{worker}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
        steps, before = np.arange(self.window), np.arange(-self.context, 0)
        while True:
            chosen = clips[rng.integers(len(clips), size=self.batch_size)]
            starts = rng.integers(0, chosen[:, 1] - self.window + 1)
            starts[starts < self.context] = 0  # as draw_start: has_pre False always means a clip start
            has_pre = starts >= self.context
            rows = (chosen[:, 0] + starts)[:, None]
            window, pre = rows + steps, np.maximum(rows + before, chosen[:, :1])  # pre of a clip start: masked
            batch = {name: arrays[name][window] for name in ARRAY_MEMBERS}
            keep = has_pre[:, None, None].astype(np.float32)
            yield {
                "motion": torch.from_numpy(batch["motion"]),
                "motion_pre": torch.from_numpy(arrays["motion"][pre] * keep),
                "audio": torch.from_numpy(batch["audio"]),
                "audio_pre": torch.from_numpy(arrays["audio"][pre] * keep),
                "has_pre": torch.from_numpy(has_pre),
                "gaze": torch.from_numpy(batch["gaze"].mean(1)),
                "distance": torch.from_numpy(batch["distance"].mean(1)),
                "emotion": torch.from_numpy(batch["emotion"].mean(1)),
            }


def window_batches(
    motion_set: MotionSet, cfg: MotionDataConfig, window: int, context: int, batch_size: int, seed: int
) -> Callable[[int, int, int], Iterator[dict[str, torch.Tensor]]]:
    """The engine's batch source: `(epoch, rank, world) -> iterator of batch dicts` (ArrayWindows; a worker
    yields whole batches)."""
    ArrayWindows(motion_set.root, window, context, batch_size, seed, 0, 0, 1).open()  # fail here, not in a worker

    def source(epoch: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
        batches = ArrayWindows(motion_set.root, window, context, batch_size, seed, epoch, rank, world)
        return iter(DataLoader(batches, batch_size=None, num_workers=cfg.workers))

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
