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

That floor is what a layout that is a function of the key set alone can do: ~14 % of shards rewritten
for +1 % clips at VoxCeleb2 scale with 64-clip shards. Weekly additions cost less with a *pin*
(params `preprocess.shards.pin`, written by `vasa pin-shards`): a versioned file giving each clip key
a generation. Each generation is its own trie; generation 0 keeps the names above and generation g
is named `<split>-g<g>_<prefix>-<part>`. Clips not in the pin form the next generation. So a week's
new clips only write new shards (their generation's), no shard of an earlier generation changes, and
pinning them afterwards (`vasa pin-shards` appends them as that generation) moves nothing. Generations
are bounded by folding (`fold_pin`, `vasa pin-shards --max-generations N`, what scheduled retraining
does): the newest small generations merge into one, size-tiered, so the big first build is not
rewritten for a week's clips. Compacting (`--compact`: every clip in generation 0) folds everything
into one trie, at the key-range cost above, once. The layout is a function of (key set, pin), both versioned inputs:
same inputs, same shards still holds.

Tar members carry a fixed mtime, owner and mode, so shards are byte-identical across runs. Whether a
shard must be rewritten is decided from small per-clip records (`content_digest`), never by reading
the shard or the cache's tars.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vasa.core.config import ShardConfig
from vasa.core.errors import InputError
from vasa.core.files import atomic_path

TAR_MTIME = 0  # 1970-01-01: no wall-clock time inside an artifact
KEY_HEX = 16  # hex characters of a clip key (manifest.clip_key): the trie's depth limit
HEX = "0123456789abcdef"
PIN_HEADER = (
    "# Shard layout pin (vasa pin-shards; params preprocess.shards.pin): `<clip key> <generation>` per line.\n"
    "# Each generation is its own key-range trie (generation g>0: shards `<split>-g<g>_<prefix>-<part>`);\n"
    "# clips not listed form the next generation. No lines: one trie over all keys.\n"
)
_PIN_LINE = re.compile(rf"^([0-9a-f]{{{KEY_HEX}}}) ([0-9]{{1,6}})$")


@dataclass(frozen=True)
class Sample:
    """One training sample: webdataset members by extension ("mp4", "pose.npy", "json", ...)."""

    key: str  # webdataset __key__: letters, digits, '-' and '_' only (no dots)
    members: dict[str, bytes]
    frames: int
    seconds: float

    def digest(self) -> str:
        return sample_digest(self.key, {ext: hashlib.sha256(data).digest() for ext, data in self.members.items()})


def sample_digest(key: str, member_digests: dict[str, bytes]) -> str:
    """sha256 of a sample from its key and the raw sha256 of each member (by extension, sorted): what
    `members_sha256` chains, computable from a tar without decoding anything."""
    h = hashlib.sha256(key.encode())
    for ext in sorted(member_digests):
        h.update(ext.encode() + b"\0" + member_digests[ext])
    return h.hexdigest()


def plan_shards(keys: Iterable[str], cfg: ShardConfig, prefix: str, generation: int = 0) -> dict[str, list[str]]:
    """Shard name (`<prefix>-[g<generation>_]<key prefix or "all">-<part>`) -> the sorted sample keys
    it holds, in key order (see the module docstring for the trie and the generations)."""
    layer = f"g{generation}_" if generation else ""
    ordered = sorted(keys)
    plan: dict[str, list[str]] = {}
    limit = cfg.max_clips_per_shard

    def visit(node: str, lo: int, hi: int) -> None:
        if hi - lo <= limit or len(node) >= KEY_HEX:
            members = ordered[lo:hi]
            for part, start in enumerate(range(0, len(members), limit)):
                plan[f"{prefix}-{layer}{node or 'all'}-{part:04d}"] = members[start : start + limit]
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
    """The key prefix a planned shard name covers ("" for `all`), whatever its generation."""
    node = name.split("-")[1].rpartition("_")[2]
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


def generation_of(name: str) -> int:
    """The pin generation of a planned shard name (0 for `train-3f-0000`, 2 for `train-g2_3f-0000`)."""
    node = name.split("-")[1]
    return int(node[1:].partition("_")[0]) if node.startswith("g") else 0


def plan_layers(keys: Iterable[str], cfg: ShardConfig, prefix: str, pin: dict[str, int]):
    """The plan of one split's sample keys, one trie per pin generation of their clips (`<clip key>_...`;
    clips not in the pin: the next generation; no pin: one trie), and a lookup of the shard covering
    a failed key (in its own clip's generation)."""
    after = max(pin.values(), default=-1) + 1

    def generation(key: str) -> int:
        return pin.get(key[:KEY_HEX], after)

    by_generation: dict[int, list[str]] = {}
    for key in keys:
        by_generation.setdefault(generation(key), []).append(key)
    plan: dict[str, list[str]] = {}
    lookups: dict[int, ShardLookup] = {}
    for number in sorted(by_generation):
        layer = plan_shards(by_generation[number], cfg, prefix, number)
        plan |= layer
        lookups[number] = ShardLookup(layer)

    def lookup(key: str) -> str | None:
        found = lookups.get(generation(key))
        return found(key) if found else None

    return plan, lookup


def read_pin(path: Path) -> dict[str, int]:
    """Clip key -> generation, from a pin file (`<16-hex key> <generation>` per line; `#` comments and
    blank lines skipped). Raises InputError for a missing file or a malformed line, naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"shard pin file not found: {path} (write it with `vasa pin-shards`, or set preprocess.shards.pin: null)"
        ) from None
    pin = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN_LINE.match(line)
        if not match:
            raise InputError(
                f"{path}:{number}: {line[:40]!r} is not `<clip key> <generation>` ({KEY_HEX} lowercase hex, an integer)"
            )
        if match[1] in pin:
            raise InputError(f"{path}:{number}: clip key {match[1]} is listed twice")
        pin[match[1]] = int(match[2])
    return pin


def write_pin(path: Path, pin: dict[str, int]) -> int:
    """Write a pin file (clip key -> generation; sorted by key, with the header), atomically; returns
    how many keys it holds."""
    bad = [key for key, number in pin.items() if not _PIN_LINE.match(f"{key} {number}")]
    if bad:
        raise InputError(f"not clip keys with a generation: {bad[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(PIN_HEADER + "".join(f"{key} {pin[key]}\n" for key in sorted(pin)), encoding="utf-8")
    return len(pin)


def grow_pin(pin: dict[str, int], keys: Iterable[str], compact: bool = False) -> dict[str, int]:
    """The pin after `vasa pin-shards`: `keys` (the manifest's usable clips) keep their generation and
    the others get the next one, which is the generation their shards already have (pinning moves no
    shard); keys no longer present are dropped. `compact`: every key in generation 0."""
    keys = set(keys)
    if compact:
        return dict.fromkeys(keys, 0)
    after = max(pin.values(), default=-1) + 1
    return {key: pin.get(key, after) for key in keys}


def fold_pin(pin: dict[str, int], max_generations: int) -> tuple[dict[str, int], list[int]]:
    """Size-tiered compaction of a pin to at most `max_generations` generations (0: no limit); returns
    the pin and the generations folded (oldest last; empty when none).

    Starting from the newest generation, older ones are taken in while there are still too many or the
    next older one is no larger than all taken so far; the taken ones become one generation under the
    oldest number among them. Generations are thus kept in decreasing size, so a clip is rewritten
    about log2(corpus / weekly batch) times in its life, and the large old generations (the first
    build, generation 0) are only folded once the clips added since outnumber them. Compare `--compact`
    (everything into generation 0), which rewrites every shard whose key range gained clips, each time.
    """
    sizes = Counter(pin.values())
    left = sorted(sizes)
    if max_generations <= 0 or len(left) <= max_generations:
        return pin, []
    taken = [left.pop()]
    total = sizes[taken[0]]
    while left and (len(left) + 1 > max_generations or sizes[left[-1]] <= total):
        taken.append(left.pop())
        total += sizes[taken[-1]]
    into, folded = taken[-1], set(taken)
    return {key: into if number in folded else number for key, number in pin.items()}, taken


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


def read_shard(path: Path, content: bool = False) -> tuple[list[str], str | None]:
    """Sample keys of a webdataset tar from its member names (`<key>.<member>`), in tar order; with
    `content` also its `members_sha256` as `shard_stats` computes it (member bytes
    hashed, never decoded)."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                stream = tar.extractfile(info) if content and info.isfile() else None
                digest = hashlib.file_digest(stream, "sha256").digest() if stream else b""
                members.setdefault(key, {})[ext] = digest
    except FileNotFoundError:
        raise InputError(f"{path}: listed in index.json but missing") from None
    except tarfile.TarError as err:
        raise InputError(f"{path}: not a readable shard: {err}") from None
    if not content:
        return list(members), None
    samples = [sample_digest(key, found) for key, found in members.items()]
    return list(members), hashlib.sha256("".join(samples).encode()).hexdigest()
