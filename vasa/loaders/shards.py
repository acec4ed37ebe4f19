"""Reading the webdataset shards that `preprocess` writes: index.json -> splits -> shard lists, split
by node then worker; tar members per sample; crop mp4 decoded from bytes. Shared by every loader.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Collection, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from preprocessing import schema
from vasa.core.errors import InputError

log = logging.getLogger(__name__)


INDEX_FILE = getattr(schema, "INDEX_FILE", "index.json")


@dataclass(frozen=True)
class ShardSet:
    """The shards of one preprocess output, as its index.json describes them."""

    root: Path
    index_path: Path
    splits: dict[str, tuple[Path, ...]]  # split -> shard files, in index order
    crop_size: int | None  # index.json `dataset.crop_size` when present
    speakers: tuple[str, ...]  # speaker ids of the train split, sorted: `speaker` indexes this

    @property
    def train(self) -> tuple[Path, ...]:
        return self.splits.get(schema.TRAIN, ())

    def speaker_index(self) -> dict[str, int]:
        return {speaker: i for i, speaker in enumerate(self.speakers)}


def split_shards(index: dict, root: Path, index_path: Path) -> dict[str, tuple[Path, ...]]:
    """Split name -> the non-empty shard files an index.json lists (shards and motion shards alike);
    a listed shard that is missing is an error, not a silently smaller dataset."""
    splits = {}
    for split, entry in sorted(index["splits"].items()):
        files = tuple(root / shard["shard"] for shard in entry.get("shards", []) if shard.get("samples", 1) > 0)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index_path}: split {split} lists missing shards {missing[:5]}")
        splits[split] = files
    return splits


def read_index(path: Path) -> dict:
    """A shards folder's index.json (input or motion shards), checked to hold a `splits` mapping."""
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found (run the preprocess stage first)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable: {err}") from None
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise InputError(f"{path}: no `splits` mapping")
    return index


def open_shards(root: Path) -> ShardSet:
    """Read `root/index.json` (defensively: the `dataset` block is optional) and list the train
    speakers. Errors name the file and what is wrong."""
    index_path = root / INDEX_FILE
    index = read_index(index_path)
    dataset = index.get("dataset") if isinstance(index.get("dataset"), dict) else {}
    version = dataset.get("schema_version")
    if version is not None and version != schema.SCHEMA_VERSION:
        raise InputError(f"{index_path}: shards of schema version {version}, this code reads {schema.SCHEMA_VERSION}")
    splits = split_shards(index, root, index_path)
    if not splits.get(schema.TRAIN):
        raise InputError(f"{index_path}: the train split has no shards")
    speakers = tuple(sorted({meta_speaker(meta) for path in splits[schema.TRAIN] for meta in shard_metadata(path)}))
    if len(speakers) < 2:
        raise InputError(
            f"{index_path}: the train split has {len(speakers)} speaker(s); cross-identity pairs need at least 2"
        )
    crop_size = dataset.get("crop_size")
    return ShardSet(root, index_path, splits, crop_size if isinstance(crop_size, int) else None, speakers)


def shard_metadata(path: Path) -> Iterator[dict]:
    """The sample JSONs of one shard, read without loading the media members."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(f".{schema.JSON}"):
                yield json.loads(tar.extractfile(member).read())


def meta_speaker(meta: dict) -> str:
    speaker = (meta.get("provenance") or {}).get("speaker_id")
    if not speaker:
        raise InputError(f"sample {meta.get('key')}: no provenance.speaker_id in its JSON")
    return str(speaker)


def read_samples(path: Path) -> Iterator[dict[str, bytes]]:
    """Samples of one webdataset tar, as {member: bytes} with `__key__`, in tar order."""
    current: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = tar.extractfile(member).read()
    if current:
        yield current


def decode_frames(mp4: bytes, size: int) -> np.ndarray:
    """All frames of an mp4 (bytes) as (T, size, size, 3) uint8 RGB, area-resized."""
    with closing(_video_frames(mp4)) as frames:
        rgb = [_rgb(frame, size) for frame in frames]
    if not rgb:
        raise ValueError("no video frames")
    return np.stack(rgb)


def decode_some(mp4: bytes, size: int, wanted: Collection[int]) -> dict[int, np.ndarray]:
    """The frames of an mp4 (bytes) at the indices in `wanted`, each (size, size, 3) uint8 RGB, area-resized.

    Decoding stops after the last wanted frame and only wanted frames are converted and resized: a training
    sample uses a few frames of a clip, and at 512² converting every frame costs a third of the decode and
    holding them all ~150 MB a clip (docs/BENCHMARKS.md "Stage-1 loader"). Indices past the video's end are
    absent from the result."""
    want = set(wanted)
    last = max(want, default=-1)
    out: dict[int, np.ndarray] = {}
    with closing(_video_frames(mp4)) as frames:
        for index, frame in enumerate(frames):
            if index > last:
                break
            if index in want:
                out[index] = _rgb(frame, size)
    return out


def _video_frames(mp4: bytes) -> Iterator[av.VideoFrame]:
    """The decoded frames of an mp4 (bytes), in order; close the generator to stop decoding early."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        yield from container.decode(stream)


def _rgb(frame: av.VideoFrame, size: int) -> np.ndarray:
    # swscale's area filter, not cv2: cv2's thread pool can deadlock in a forked loader worker.
    return frame.to_ndarray(width=size, height=size, format="rgb24", interpolation="AREA")


def video_side(mp4: bytes) -> int:
    """The frame width of an mp4 (bytes), read from its header (crops are square)."""
    with av.open(io.BytesIO(mp4)) as container:
        return int(container.streams.video[0].codec_context.width)


def worker_shards(shards: tuple[Path, ...], rank: int, world: int, worker: int, workers: int) -> tuple[Path, ...]:
    """Split by node (rank) then by worker; when there are fewer shards than slices, every slice
    reads all shards (resampling under distinct seeds still gives different streams)."""
    mine = shards[rank::world][worker::workers]
    if len(shards) < world * workers or not mine:
        return shards
    return mine
