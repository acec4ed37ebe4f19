"""Stage-1 loader: frame pairs from the webdataset shards that `preprocess` writes.

shards' index.json -> the `train` split's shard list -> split by node, then by worker -> shards
resampled (drawn with replacement) under a seed of (seed, epoch, rank, worker) -> for each clip,
`pairs_per_clip` source/driver pairs and as many spare frames drawn first, then only those frames
decoded in the worker (PyAV, from bytes, stopping after the last one) and resized to the preset's
resolution -> a shuffle buffer of pairs (`shuffle_buffer` clips' worth) -> each pair given an `other`
frame of a different speaker from the spare frames of the clips read before it (VASA-1 §3.1's
cross-identity term needs one) -> batches.

Memory is bounded by frames, not clips: a worker holds at most 5 x shuffle_buffer x pairs_per_clip
decoded frames (the buffer's pairs, the spare-frame pool, one clip in flight), whatever the clips' length
(`worker_frames`; at 512², 8 x 16: ~0.5 GB).

Only the train split is read for training, and of every train clip only the first
(1 - holdout_fraction) of its frames: the tail is never trained on and serves, with any val/test
split, as held-out pairs (`heldout_batch`). Train clips in `exclude` (the score table's rejected clips,
vasa/loaders/scores.py) are skipped before decoding, in training and in the held-out tail alike. Member
names and columns come from preprocessing.schema.

Batch (float32 unless said; S = preset resolution):
    source, driver, other:            (B, 3, S, S) in [-1, 1]
    source_pose, driver_pose, other_pose: (B, 7) schema.POSE_COLUMNS (degrees, crop pixels), raw
    speaker, other_speaker:           (B,) int64, index among the train split's speakers (sorted ids);
                                      -1 for a held-out speaker
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from preprocessing import schema
from vasa.core.config import LatentDataConfig
from vasa.core.errors import InputError
from vasa.loaders.shards import (
    ShardSet,
    decode_frames,
    decode_some,
    meta_speaker,
    read_samples,
    video_side,
    worker_shards,
)
from vasa.models.images import to_tensor

log = logging.getLogger(__name__)

# A source "at rest" (LatentDataConfig.source_at_rest) has its mouth opening at or below a percentile of its
# clip's train frames (LatentDataConfig.rest_percentile): closed, as most portraits are. Generation renders
# the portrait's face opened by the expression field; pairs whose source talks teach the rendering to close
# what the field opens (measured on the learning proof's long stage-1 runs; a 5th percentile with every
# source at rest was worse: docs/BENCHMARKS.md).
MOUTH_OPENING = schema.EXPRESSION_COLUMNS.index("mouth_open")


STARVED_CLIPS = 200  # clips in a row without any cross-identity partner before a worker gives up


# Outer-lip FaceMesh landmarks: the mouth box the stage-1 mouth term weights (VASA-1's faces talk; an L1
# over the whole crop lets a model that never opens the mouth score well, the mouth being ~2 % of it).
OUTER_LIP = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
MOUTH_MARGIN = 0.35  # the box grows by this fraction of the lip-corner distance on every side (open jaw, chin)


@dataclass(frozen=True)
class Frame:
    """One decoded training frame with its labels: the `other` of a pair, or one side of it."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    pose: np.ndarray  # (7,)
    expression: np.ndarray  # (E,)
    speaker: int


@dataclass(frozen=True)
class Pair:
    source: Frame
    driver: Frame
    mouth: np.ndarray  # (4,) the driver's mouth box


def stream_item(pair: Pair, other: Frame) -> dict[str, torch.Tensor]:
    """The batch dict of one training pair with its cross-identity frame (vasa.training.latent_task's keys)."""
    return {
        "source": to_tensor(pair.source.image),
        "driver": to_tensor(pair.driver.image),
        "source_pose": torch.from_numpy(pair.source.pose.copy()),
        "driver_pose": torch.from_numpy(pair.driver.pose.copy()),
        "other": to_tensor(other.image),
        "other_pose": torch.from_numpy(other.pose.copy()),
        "source_expression": torch.from_numpy(pair.source.expression.copy()),
        "driver_expression": torch.from_numpy(pair.driver.expression.copy()),
        "other_expression": torch.from_numpy(other.expression.copy()),
        "driver_mouth": torch.from_numpy(pair.mouth.copy()),
        "speaker": torch.tensor(pair.source.speaker, dtype=torch.int64),
        "other_speaker": torch.tensor(other.speaker, dtype=torch.int64),
    }


@dataclass
class Clip:
    """One decoded sample: frames (T, S, S, 3) uint8, pose (T, 7), expression (T, E) schema.EXPRESSION_COLUMNS
    (template units), mouth (T, 4) box x0, y0, x1, y1 as fractions of the crop side, its speaker index."""

    key: str
    frames: np.ndarray
    pose: np.ndarray
    speaker: int
    expression: np.ndarray
    mouth: np.ndarray

    def frame(self, i: int) -> Frame:
        return Frame(self.frames[i], self.pose[i], self.expression[i], self.speaker)


def mouth_boxes(landmarks: np.ndarray, side: float) -> np.ndarray:
    """(T, 478, 3) landmarks in crop pixels of a `side`-pixel crop -> (T, 4) mouth boxes as fractions of the
    side, clipped to [0, 1]; frames without landmarks (NaN) get the whole crop's lower half."""
    lips = landmarks[:, OUTER_LIP, :2].astype(np.float64) / side
    lo, hi = np.nanmin(lips, axis=1), np.nanmax(lips, axis=1)
    margin = MOUTH_MARGIN * (hi[:, :1] - lo[:, :1])
    box = np.concatenate([lo - margin, hi + margin], axis=1)
    box[~np.isfinite(box).all(axis=1)] = (0.0, 0.5, 1.0, 1.0)
    return np.clip(box, 0.0, 1.0).astype(np.float32)


def decode_sample(sample: dict[str, bytes], size: int, speakers: dict[str, int], crop_size: int | None = None) -> Clip:
    """A shard sample decoded at `size` pixels. `crop_size`: the shards' crop side (the landmarks' pixel
    unit); None reads it from the mp4."""
    meta = json.loads(sample[schema.JSON])
    frames = decode_frames(sample[schema.MP4], size)
    pose = _npy(sample[schema.POSE])
    expression = _npy(sample[schema.EXPRESSION])
    landmarks = np.load(io.BytesIO(sample[schema.LANDMARKS]), allow_pickle=False)
    side = crop_size or video_side(sample[schema.MP4])
    n = min(len(frames), len(pose), len(expression), len(landmarks))  # equal by the schema; never index past
    speaker = speakers.get(meta_speaker(meta), -1)
    return Clip(sample["__key__"], frames[:n], pose[:n], speaker, expression[:n], mouth_boxes(landmarks[:n], side))


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def train_frames(n: int, holdout_fraction: float) -> int:
    """Frames of a clip available to training: the head; the last ceil(n * fraction) are held out."""
    return n - math.ceil(n * holdout_fraction)


def draw_pair(rng: random.Random, lo: int, hi: int, min_gap: int) -> tuple[int, int] | None:
    """Two frame indices in [lo, hi) at least `min_gap` apart, or None if the range is too short."""
    if hi - lo <= min_gap:
        return None
    while True:
        i, j = rng.randrange(lo, hi), rng.randrange(lo, hi)
        if abs(i - j) >= max(min_gap, 1) or (min_gap == 0 and hi - lo == 1):
            return i, j


def draw_rest_pair(rng: random.Random, rest: list[int], hi: int, min_gap: int) -> tuple[int, int] | None:
    """A source index from `rest` (frames with the mouth at rest) and a driver index in [0, hi) at least
    `min_gap` away, or None if no rest frame has a driver that far."""
    gap = max(min_gap, 1)
    usable = [i for i in rest if i - gap >= 0 or i + gap < hi]
    if not usable:
        return None
    i = usable[rng.randrange(len(usable))]
    while True:
        j = rng.randrange(hi)
        if abs(i - j) >= gap:
            return i, j


def rest_frames(opening: np.ndarray, hi: int, percentile: float) -> list[int]:
    """Train frames [0, hi) whose mouth opening is at or below the clip's `percentile` (NaN: not)."""
    head = opening[:hi]
    if not np.isfinite(head).any():
        return []
    limit = np.nanpercentile(head, percentile)
    return [int(k) for k in np.flatnonzero(np.nan_to_num(head, nan=np.inf) <= limit)]


def pair_item(rng: random.Random, clip: Clip, i: int, j: int, other: Clip) -> dict[str, torch.Tensor]:
    """The batch dict of frames i, j of `clip` with a random frame of `other` (held-out pairs)."""
    other_frame = other.frame(rng.randrange(len(other.frames)))
    return stream_item(Pair(clip.frame(i), clip.frame(j), clip.mouth[j]), other_frame)


def worker_frames(cfg: LatentDataConfig) -> int:
    """The most decoded frames a loader worker holds: the buffer's pairs (2 each), the spare-frame pool
    (2 x buffer), and the clip being added (its pairs and spares)."""
    buffered = cfg.shuffle_buffer * cfg.pairs_per_clip
    return 2 * buffered + 2 * buffered + 3 * cfg.pairs_per_clip


class PairStream(IterableDataset):
    """Endless stream of single training pairs (see module docstring) for one rank and epoch."""

    def __init__(
        self, shard_set: ShardSet, size: int, cfg: LatentDataConfig, seed: int, epoch: int, rank: int, world: int,
        exclude: frozenset[str] = frozenset(),
    ):  # fmt: skip
        self.shards, self.size, self.cfg, self.exclude = shard_set.train, size, cfg, exclude
        self.speakers, self.crop_size = shard_set.speaker_index(), shard_set.crop_size
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A str seed is hashed with SHA-512 by `random`: stable across runs and platforms.
        rng = random.Random(f"vasa.data/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        mine = worker_shards(self.shards, self.rank, self.world, worker, workers)
        capacity = self.cfg.shuffle_buffer * self.cfg.pairs_per_clip
        buffer: list[Pair] = []
        # Spare frames of the clips read before: the `other` frames. With few speakers, a buffer of one
        # speaker's pairs happens by chance; twice the buffer's clips keep another speaker in reach.
        spares: deque[Frame] = deque(maxlen=2 * capacity)
        starved = 0  # clips in a row that gave no pair (no second speaker in reach)
        for pairs, extra in self._clips(rng, mine):
            buffer.extend(pairs)
            if len(buffer) >= capacity:  # filled: as many pairs out as came in, drawn from the whole buffer
                made = 0
                for _ in range(len(pairs)):
                    pick = rng.randrange(len(buffer))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    pair = buffer.pop()
                    others = [f for f in spares if f.speaker != pair.source.speaker]
                    if others:
                        made += 1
                        yield stream_item(pair, others[rng.randrange(len(others))])
                starved = 0 if made else starved + 1
            spares.extend(extra)
            if starved > STARVED_CLIPS:
                raise InputError(
                    f"loader worker {worker} (rank {self.rank}): {starved} clips in a row without a second speaker "
                    f"in reach; its shards {[p.name for p in mine][:5]} hold one speaker"
                )

    def _clips(self, rng: random.Random, shards: tuple[Path, ...]) -> Iterator[tuple[list[Pair], list[Frame]]]:
        """Resampled shards (with replacement, forever) -> per usable clip its pairs and spare frames, decoded;
        clips too short for a pair, excluded or unreadable are skipped."""
        visited, usable = set(), 0
        while True:
            path = shards[rng.randrange(len(shards))]
            visited.add(path)
            for sample in read_samples(path):
                if sample["__key__"] in self.exclude:
                    continue
                try:
                    drawn = self._draw(rng, sample)
                except (ValueError, KeyError, av.FFmpegError) as err:
                    log.warning("%s: sample %s unreadable, skipped: %s", path.name, sample.get("__key__"), err)
                    continue
                if drawn is not None:
                    usable += 1
                    yield drawn
            if usable == 0 and len(visited) == len(set(shards)):  # every shard read once, not one clip
                raise InputError(
                    f"no usable train clip in {[p.name for p in shards][:5]} ({len(self.exclude)} excluded by the "
                    "scores; the rest unreadable or too short)"
                )

    def _draw(self, rng: random.Random, sample: dict[str, bytes]) -> tuple[list[Pair], list[Frame]] | None:
        """A clip's `pairs_per_clip` pairs and as many spare frames, drawn from its train frames before
        decoding, then only those frames decoded; None when the clip is too short for a pair."""
        meta = json.loads(sample[schema.JSON])
        pose, expression = _npy(sample[schema.POSE]), _npy(sample[schema.EXPRESSION])
        landmarks = np.load(io.BytesIO(sample[schema.LANDMARKS]), allow_pickle=False)
        n = min(len(pose), len(expression), len(landmarks))
        hi = train_frames(n, self.cfg.holdout_fraction)
        if hi <= self.cfg.min_frame_gap:
            return None
        rest = (
            rest_frames(expression[:, MOUTH_OPENING], hi, self.cfg.rest_percentile) if self.cfg.source_at_rest else []
        )
        pairs = [
            draw_rest_pair(rng, rest, hi, self.cfg.min_frame_gap)
            if rest and rng.random() < self.cfg.source_at_rest
            else draw_pair(rng, 0, hi, self.cfg.min_frame_gap)
            for _ in range(self.cfg.pairs_per_clip)
        ]
        spare = [rng.randrange(hi) for _ in range(self.cfg.pairs_per_clip)]
        images = decode_some(sample[schema.MP4], self.size, {i for pair in pairs if pair for i in pair} | set(spare))
        if not images:
            raise ValueError("no video frames")
        speaker = self.speakers.get(meta_speaker(meta), -1)
        mouth = mouth_boxes(landmarks[:n], self.crop_size or video_side(sample[schema.MP4]))

        def frame(i: int) -> Frame:
            return Frame(images[i], pose[i], expression[i], speaker)

        # A video shorter than its label arrays (the schema says equal) loses the pairs past its end.
        kept = [Pair(frame(i), frame(j), mouth[j]) for i, j in (p for p in pairs if p) if i in images and j in images]
        return kept, [frame(k) for k in spare if k in images]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding parallelism comes from the workers themselves


def pair_batches(
    shard_set: ShardSet, size: int, cfg: LatentDataConfig, batch_size: int, seed: int,
    exclude: frozenset[str] = frozenset(),
):  # fmt: skip
    """The engine's batch source: `(epoch, rank, world) -> iterator of batch dicts`; train clips in `exclude`
    are never read."""

    def source(epoch: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = PairStream(shard_set, size, cfg, seed, epoch, rank, world, exclude)
        loader = DataLoader(
            stream, batch_size=batch_size, num_workers=cfg.workers, worker_init_fn=_worker_init if cfg.workers else None
        )
        return iter(loader)

    return source


def heldout_batch(
    shard_set: ShardSet, size: int, cfg: LatentDataConfig, seed: int, exclude: frozenset[str] = frozenset()
) -> dict[str, dict]:
    """Deterministic held-out pairs, by group: `frames` (the held-out tail of train clips: known
    speakers, unseen frames; clips in `exclude` left out) and `speakers` (the val/test splits, when they
    have shards). Each group is a batch dict of up to `cfg.eval_pairs` pairs; the `other` frame comes from
    the same pool."""
    speakers = shard_set.speaker_index()
    groups = {"frames": (shard_set.train, True)}
    heldout = tuple(p for split in (schema.VAL, schema.TEST) for p in shard_set.splits.get(split, ()))
    if heldout:
        groups["speakers"] = (heldout, False)
    out = {}
    for name, (shards, tail_only) in groups.items():
        rng = random.Random(f"vasa.data.heldout/{seed}/{name}")
        clips = []
        for path in shards:
            for sample in read_samples(path):
                if tail_only and sample["__key__"] in exclude:
                    continue
                clip = decode_sample(sample, size, speakers, shard_set.crop_size)
                start = train_frames(len(clip.frames), cfg.holdout_fraction) if tail_only else 0
                if len(clip.frames) - start > cfg.min_frame_gap:
                    clips.append((clip, start))
                if len(clips) >= cfg.eval_pairs:
                    break
            if len(clips) >= cfg.eval_pairs:
                break
        if not clips:
            continue
        items = []
        for n in range(cfg.eval_pairs):
            clip, start = clips[n % len(clips)]
            pair = draw_pair(rng, start, len(clip.frames), cfg.min_frame_gap)
            others = [c for c, _ in clips if c.key != clip.key] or [clip]
            items.append(pair_item(rng, clip, *pair, others[rng.randrange(len(others))]))
        out[name] = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    return out
