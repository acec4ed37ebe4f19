"""Packing processed samples into webdataset shards, deterministically and incrementally.

A sample belongs to bucket = the first `bucket_hex_digits` hex characters of its key (a hash of the
clip id), and a bucket's samples, sorted by key, are cut into shards of at most
`max_clips_per_shard`. Shard membership is therefore a function of the set of samples alone: the
same inputs give the same shards whatever the order of processing, and new clips only change the
buckets they fall in. Tar members carry a fixed mtime, owner and mode, so shards are byte-identical
across runs; each shard has a `<name>.stats.json` beside it whose `members_sha256` lets a re-run skip
shards whose content would not change.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from vasa.config import ShardConfig

TAR_MTIME = 0  # 1970-01-01: no wall-clock time inside an artifact


@dataclass(frozen=True)
class Sample:
    """One training sample: webdataset members by extension ("mp4", "pose.npy", "json", ...)."""

    key: str  # webdataset __key__: letters, digits, '-' and '_' only (no dots)
    members: dict[str, bytes]
    frames: int
    seconds: float

    def digest(self) -> str:
        h = hashlib.sha256(self.key.encode())
        for ext in sorted(self.members):
            h.update(ext.encode() + b"\0" + hashlib.sha256(self.members[ext]).digest())
        return h.hexdigest()


def bucket_of(key: str, digits: int) -> str:
    return key[:digits]


def plan_shards(keys: list[str], cfg: ShardConfig, prefix: str) -> dict[str, list[str]]:
    """Shard name (`<prefix>-<bucket>-<part>`) -> the sorted sample keys it holds."""
    buckets: dict[str, list[str]] = {}
    for key in sorted(keys):
        buckets.setdefault(bucket_of(key, cfg.bucket_hex_digits), []).append(key)
    plan = {}
    for bucket, members in sorted(buckets.items()):
        for part, start in enumerate(range(0, len(members), cfg.max_clips_per_shard)):
            plan[f"{prefix}-{bucket or 'all'}-{part:04d}"] = members[start : start + cfg.max_clips_per_shard]
    return plan


def shard_for(plan: dict[str, list[str]], key: str, cfg: ShardConfig) -> str | None:
    """The shard whose key range a (failed) key falls in, for per-shard failure counts; None if
    its bucket holds no samples at all."""
    bucket = bucket_of(key, cfg.bucket_hex_digits)
    parts = [name for name, keys in plan.items() if bucket_of(keys[0], cfg.bucket_hex_digits) == bucket]
    chosen = None
    for name in parts:  # plan order is key order within a bucket
        if chosen is None or plan[name][0] <= key:
            chosen = name
    return chosen


def write_shard(path: Path, samples: list[Sample]) -> None:
    """Write a webdataset tar (members `<key>.<ext>`, keys in the given order, extensions sorted)
    with webdataset's TarWriter at a fixed mtime, owner and mode, atomically."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as stream:
        writer = wds.TarWriter(stream, user="vasa", group="vasa", mode=0o444, mtime=TAR_MTIME, encoder=False)
        for sample in samples:
            writer.write({"__key__": sample.key, **sample.members})
        writer.close()
    tmp.replace(path)


def shard_stats(name: str, samples: list[Sample], failures: list[dict]) -> dict:
    """Counts for one shard: samples, frames, seconds, and the failed clips of its key range by reason."""
    return {
        "shard": f"{name}.tar",
        "samples": len(samples),
        "frames": sum(s.frames for s in samples),
        "seconds": round(sum(s.seconds for s in samples), 3),
        "failed_clips": len(failures),
        "failures_by_status": dict(sorted(Counter(f["status"] for f in failures).items())),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "members_sha256": hashlib.sha256("".join(s.digest() for s in samples).encode()).hexdigest(),
    }
