"""Packing processed samples into webdataset shards, deterministically and incrementally.

Shard membership is by key range, never by position. Keys are hashes (`<16 hex of the clip id>_<start>`),
and the plan is a trie over them: every prefix of `bucket_hex_digits` hex characters that holds samples
starts a node; a node with more than `max_clips_per_shard` samples is split into its (up to 16) children
by the next hex digit, and a node at most that full is one shard, named after its prefix:
`<split>-<prefix>-0000` (`all` for the empty prefix). Only a clip with more segments than a shard
holds reaches the end of its key and is then cut into parts `-0001`, `-0002`... in key order.

So the plan is a function of the set of sample keys alone (same inputs, same shards, whatever the
order of processing), and a new key changes only the shard whose range it falls in (or, when that
shard overflows, that shard's range split into its sub-ranges); every other shard keeps its name and
bytes. With random keys the shards touched by K new keys are ~ S (1 - exp(-K/S)) of S: at +1 % of the
clips that is ~ 1 - exp(-0.01 x mean clips per shard), the floor for any key-range layout
(docs/BENCHMARKS.md, "Incremental preprocess at scale").

Tar members carry a fixed mtime, owner and mode, so shards are byte-identical across runs. Whether a
shard must be rewritten is decided from small per-clip records (`content_digest`), never by reading
the shard or the cache's tars.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vasa.config import ShardConfig

TAR_MTIME = 0  # 1970-01-01: no wall-clock time inside an artifact
KEY_HEX = 16  # hex characters of a clip key (manifest.clip_key): the trie's depth limit
HEX = "0123456789abcdef"


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


def plan_shards(keys: Iterable[str], cfg: ShardConfig, prefix: str) -> dict[str, list[str]]:
    """Shard name (`<prefix>-<key prefix or "all">-<part>`) -> the sorted sample keys it holds, in key
    order (see the module docstring for the trie)."""
    ordered = sorted(keys)
    plan: dict[str, list[str]] = {}
    limit = cfg.max_clips_per_shard

    def visit(node: str, lo: int, hi: int) -> None:
        if hi - lo <= limit or len(node) >= KEY_HEX:
            members = ordered[lo:hi]
            for part, start in enumerate(range(0, len(members), limit)):
                plan[f"{prefix}-{node or 'all'}-{part:04d}"] = members[start : start + limit]
            return
        for digit in HEX:  # children in key order: the plan stays sorted by key
            child = node + digit
            a = bisect.bisect_left(ordered, child, lo, hi)
            b = bisect.bisect_left(ordered, child + "\x7f", a, hi)  # every key starting with `child`
            if b > a:
                visit(child, a, b)

    depth = cfg.bucket_hex_digits
    i = 0
    while i < len(ordered):  # the top-level buckets present, in order
        bucket = ordered[i][:depth]
        j = bisect.bisect_left(ordered, bucket + "\x7f", i)
        visit(bucket, i, j)
        i = j
    return plan


def shard_prefix(name: str) -> str:
    """The key prefix a planned shard name covers ("" for `all`)."""
    node = name.split("-")[1]
    return "" if node == "all" else node


class ShardLookup:
    """The shard whose key range a key falls in, by bisection over the plan (O(log S) per key):
    failed clips are counted in the shard of their key range."""

    def __init__(self, plan: dict[str, list[str]]):
        self._names = list(plan)
        # A shard's range starts at its prefix (its first key for the later parts of one long clip).
        self._starts = [shard_prefix(n) if n.endswith("-0000") else plan[n][0] for n in self._names]
        assert self._starts == sorted(self._starts), "plan is not in key order"

    def __call__(self, key: str) -> str | None:
        """The shard covering `key`, or None when no shard's range holds it (an empty key range)."""
        i = bisect.bisect_right(self._starts, key) - 1
        if i < 0:
            return None
        name = self._names[i]
        return name if key.startswith(shard_prefix(name)) else None


def content_digest(samples: Iterable[tuple[str, str]]) -> str:
    """sha256 over a shard's samples as (media digest from the cache, digest of what is joined into
    them from the manifest), in shard order: equal digests mean byte-identical shards."""
    h = hashlib.sha256()
    for media, joined in samples:
        h.update(f"{media}:{joined};".encode())
    return h.hexdigest()


def write_shard(path: Path, samples: list[Sample]) -> None:
    """Write a webdataset tar (members `<key>.<ext>`, keys in the given order, extensions sorted)
    with webdataset's TarWriter at a fixed mtime, owner and mode, atomically."""
    from webdataset import TarWriter  # imported here: webdataset pulls in torch (seconds of start-up)

    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as stream:
        writer = TarWriter(stream, user="vasa", group="vasa", mode=0o444, mtime=TAR_MTIME, encoder=False)
        for sample in samples:
            writer.write({"__key__": sample.key, **sample.members})
        writer.close()
    tmp.replace(path)


def shard_stats(name: str, samples: list[dict], failures: list[dict], content: str) -> dict:
    """Counts for one shard from its samples' records ({"frames", "seconds"}): samples, frames, seconds,
    the failed clips of its key range by reason, and the content digest that decides a rewrite.
    `members_sha256` and `tar_bytes` are added when the tar is written (see `members_sha256`)."""
    return {
        "shard": f"{name}.tar",
        "samples": len(samples),
        "frames": sum(s["frames"] for s in samples),
        "seconds": round(sum(s["seconds"] for s in samples), 3),
        "failed_clips": len(failures),
        "failures_by_status": dict(sorted(Counter(f["status"] for f in failures).items())),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "content_sha256": content,
    }


def members_sha256(samples: list[Sample]) -> str:
    """sha256 of the shard's member bytes as `vasa audit --content` recomputes it from the tar."""
    return hashlib.sha256("".join(s.digest() for s in samples).encode()).hexdigest()
