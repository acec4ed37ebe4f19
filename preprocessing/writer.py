"""Writing the output of stage `preprocess`: cached clips + manifest -> shards, stats, index, failures.

The per-clip cache (`preprocessing.cache`) holds only what came from the media. Here the manifest's
provenance (schema.PROVENANCE_COLUMNS, split included) is joined into every sample's JSON and the
split into every failure row, so the output is a function of (cache content, manifest) alone: a warm
cache after a licence or split change gives the same bytes as a cold run.

Shards are written per split (train, val and test never share a shard: held-out speakers stay out of
training data). Which shards change is decided by `plan_outputs` from the cache's per-clip records
and the manifest alone (a content digest per shard, kept in its stats file): no tar is opened to
decide. Only changed shards are assembled (`assemble`, run as tasks by the flow). The manifest and
the records come in as Arrow tables and the plan is made from their columns: only the clips of a
shard being written become dicts, one shard at a time (`ShardJobs`). Safety rules:

- Nothing in OUT is touched before every sample and failure is known, and a run that would leave
  zero samples fails (NoSamplesError, with the reasons) unless `allow_empty` is given.
- The only files ever removed are the ones this stage's previous index.json lists (shards and their
  stats), and only names of the stage's own pattern: an unrelated `my_backup.tar` is never touched.
- index.json and failures.parquet are written atomically (temp + rename) with fixed content order,
  so two runs from the same inputs give the same bytes; index.json is written last, as the marker of
  a complete output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing import cache, schema, shards
from preprocessing.ingest import manifest
from preprocessing.shards import Sample
from vasa.core.config import PreprocessConfig
from vasa.core.errors import InputError
from vasa.core.files import PARTIAL_SUFFIX, atomic_path, read_json, write_json

FAILURE_SCHEMA = pa.schema([(name, pa.string()) for name in schema.FAILURE_COLUMNS])
# Statuses of failure rows: the clip never reached processing (its manifest status is the reason).
INGEST_STATUS = "ingest"
UNKNOWN_SPLIT = "unknown_split"
# Bump when `join_sample` changes what it writes: shards' content digests then change (writer.py is
# not in the cache's code digest: joining never needs a clip processed again).
JOIN_VERSION = 1
# `<split>-[g<generation>_]<key prefix or "all">-<4-digit part>.tar` (generations of a pinned layout,
# preprocessing/shards.py): the only shard names the stage writes or removes.
SHARD_NAME = re.compile(rf"^(?:{'|'.join(schema.SPLITS)})-(?:g[0-9]+_)?(?:[0-9a-f]+|all)-[0-9]{{4}}\.tar$")


class ManifestNotFoundError(InputError):
    """The manifest path does not name a file (a mistyped --manifest must not read as empty)."""


class NoSamplesError(InputError):
    """The run would leave no samples at all; refused so a bad input cannot wipe the shards."""


def require_manifest(path: Path) -> None:
    """Raise ManifestNotFoundError unless `path` is a file."""
    if not Path(path).is_file():
        raise ManifestNotFoundError(f"manifest not found: {path} (nothing was read, written or removed)")


def read_manifest(path: Path) -> tuple[pa.Table, str]:
    """The manifest as a table (`manifest.read_table`) and the sha256 of its bytes (recorded in
    index.json's dataset block). Raises ManifestNotFoundError when `path` is not a file."""
    path = Path(path)
    require_manifest(path)
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return manifest.read_table(path), digest.hexdigest()


def select(rows: pa.Table) -> tuple[pa.Table, list[dict]]:
    """(rows to process, failure rows for the others): a clip whose ingest status is not ok, or whose
    split is not one of schema.SPLITS, is recorded and left out. Only left-out rows become dicts."""
    ok = pc.fill_null(pc.equal(rows["status"], manifest.OK), False)
    known = pc.fill_null(pc.is_in(rows["split"], value_set=pa.array(schema.SPLITS)), False)
    usable = pc.and_(ok, known)
    left_out = []
    for row in rows.filter(pc.invert(usable)).to_pylist():
        if row["status"] != manifest.OK:
            left_out.append(_failure(row, INGEST_STATUS, row["status"], row["error"] or ""))
        elif row["split"] not in schema.SPLITS:
            left_out.append(
                _failure(row, INGEST_STATUS, UNKNOWN_SPLIT, f"split {row['split']!r} not in {schema.SPLITS}")
            )
    return (rows.filter(usable) if left_out else rows), left_out


def _failure(row: dict, status: str, reason: str, detail: str, key: str | None = None) -> dict:
    return {
        "clip_id": row["clip_id"],
        "key": key or row["key"],
        "status": status,
        "reason": reason,
        "detail": detail,
        "split": row["split"],
    }


def provenance(row: dict) -> dict:
    """The manifest fields every sample of a clip carries (schema.PROVENANCE_COLUMNS)."""
    return {column: row.get(column) for column in schema.PROVENANCE_COLUMNS}


def join_sample(sample: Sample, row: dict) -> Sample:
    """The sample with the clip's current provenance and split joined into its JSON (replacing any
    older copy), after checking that the sample really belongs to this clip."""
    if not sample.key.startswith(f"{row['key']}_"):
        raise cache.CacheError(f"sample {sample.key} is not a segment of clip {row['key']} ({row['clip_id']})")
    return _join(sample, provenance(row), row["split"])


def _join(sample: Sample, provenance_: dict, split: str) -> Sample:
    meta = json.loads(sample.members[schema.JSON])
    if meta.get("key", sample.key) != sample.key:
        raise cache.CacheError(f"sample {sample.key}: its JSON names key {meta['key']}")
    meta["provenance"] = provenance_
    meta["split"] = split
    members = sample.members | {schema.JSON: json.dumps(meta, sort_keys=True).encode()}
    return Sample(sample.key, members, sample.frames, sample.seconds)


def clip_failures(rows: pa.Table, failures: pa.ChunkedArray) -> list[dict]:
    """The processed clips' failures (media-derived: the `failures` column of their cache records,
    row for row with `rows`) with clip id and split joined, in row order."""
    clips, failures = _flatten(failures)
    owners = rows.select(["clip_id", "key", "split"]).take(clips).to_pylist()
    joined = zip(owners, failures.to_pylist(), strict=True)
    return [_failure(row, f["status"], f["reason"], f["detail"], key=f["key"]) for row, f in joined]


def dataset_block(cfg: PreprocessConfig, manifest_sha256: str, splits: list[str]) -> dict:
    """index.json's `dataset` block (schema.DATASET_KEYS): what a loader must know about the shards."""
    from preprocessing.audio import mel_frames_per_video_frame

    block = {
        "schema_version": schema.SCHEMA_VERSION,
        "crop_size": cfg.crop_size,
        "crop_mode": cfg.crop.mode,
        "pose_frame": schema.POSE_FRAME,
        "fps": cfg.fps,
        "sample_rate": cfg.sample_rate,
        "mel_frames_per_video_frame": mel_frames_per_video_frame(cfg.sample_rate, cfg.fps, cfg.audio.hop_length),
        "n_mels": cfg.audio.n_mels,
        "manifest_sha256": manifest_sha256,
        "splits": [split for split in schema.SPLITS if split in splits],
    }
    assert tuple(block) == schema.DATASET_KEYS, "dataset block and schema.DATASET_KEYS disagree"
    return block


def owned_files(out_dir: Path) -> set[Path]:
    """Files the stage's previous run made in OUT, as its index.json lists them (shards + stats);
    names not of the stage's own pattern are ignored, so an edited index cannot delete other files."""
    index = read_json(out_dir / schema.INDEX_FILE) or {}
    owned = set()
    splits = index.get("splits")
    for split in splits.values() if isinstance(splits, dict) else []:
        for entry in split.get("shards", []) if isinstance(split, dict) else []:
            name = entry.get("shard") if isinstance(entry, dict) else None
            if isinstance(name, str) and SHARD_NAME.match(name):
                owned |= {out_dir / name, out_dir / _stats_name(name)}
    return owned


def _stats_name(shard: str) -> str:
    return shard.removesuffix(".tar") + schema.STATS_SUFFIX


@dataclass(frozen=True)
class ShardJob:
    """One shard to (re)write: what `assemble` needs, small enough to send to a worker. `clips`:
    (clip key, cache record, the manifest row's provenance and split) in key order; `stats`: the
    shard's counts and content digest, decided from records (see `plan_outputs`)."""

    name: str
    clips: tuple[tuple[str, dict, dict], ...]
    keys: tuple[str, ...]
    stats: dict


class ShardJobs(Sequence[ShardJob]):
    """The shard jobs of a plan, each made when it is read: a job's clips as dicts (a few KB per clip)
    exist only while the job is checked or sent, never all at once (a from-scratch run writes every
    shard). Held meanwhile: the shard's name, keys and stats, and its clips' rows in the tables."""

    def __init__(self) -> None:
        self._specs: list[tuple] = []

    def add(self, name: str, clips: _Clips, at: list[int], keys: tuple[str, ...], stats: dict) -> None:
        """A job for shard `name`: its clips are those `at` these positions of `clips`."""
        self._specs.append((name, clips.rows.take(at), clips.record_rows.take(at), keys, stats, clips))

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, at):
        if isinstance(at, slice):
            return [self._job(*spec) for spec in self._specs[at]]
        return self._job(*self._specs[at])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    @staticmethod
    def _job(name: str, rows: pa.Array, record_rows: pa.Array, keys: tuple, stats: dict, clips: _Clips) -> ShardJob:
        found = cache.record_dicts(clips.records.take(record_rows))
        owners = sorted(clips.usable.take(rows).to_pylist(), key=lambda row: row["key"])
        joined = tuple((r["key"], found[r["key"]], {"provenance": provenance(r), "split": clips.split}) for r in owners)
        return ShardJob(name, joined, keys, stats)


@dataclass(frozen=True)
class _Clips:
    """The usable clips of one split, without copying the tables: `rows` of `usable` (manifest rows),
    their `record_rows` in `records`, and `joined` (their `_joined_digest`)."""

    split: str
    usable: pa.Table
    records: pa.Table
    rows: pa.Array
    record_rows: pa.Array
    joined: pa.Array


@dataclass
class OutputPlan:
    """What a run writes: shard jobs (the changed shards), stats files whose counts alone changed,
    the index entries per split, every failure row, and the files the previous run listed."""

    jobs: ShardJobs
    stats_only: dict[str, dict]
    entries: dict[str, list[dict]]
    failures: list[dict]
    previous: set[Path]


def plan_outputs(
    cfg: PreprocessConfig, rows: pa.Table, records: pa.Table, out_dir: Path, allow_empty: bool = False
) -> OutputPlan:
    """Decide, from the manifest and the cache records alone (no tar is opened), which shards must be
    written. `rows`: the manifest table (`manifest.read_table`); `records`: a records table
    (cache.RECORDS_SCHEMA) holding one record per usable clip key, and maybe others. Only the clips of
    the shards to write become dicts. Raises NoSamplesError when no sample would remain and
    `allow_empty` is False."""
    usable, failures = select(rows.select([*schema.PROVENANCE_COLUMNS, "status", "error"]))
    found = pc.index_in(usable["key"], value_set=records["key"])  # usable row -> its record's row
    if found.null_count:  # a bug in the caller, not a clip status: never drop clips silently
        unprocessed = usable["clip_id"].filter(pc.is_null(found)).to_pylist()
        raise ValueError(f"{len(unprocessed)} usable clips have no outcome, e.g. {unprocessed[:3]}")
    failures += clip_failures(usable, records["failures"].take(found))
    lengths = pc.list_value_length(records["samples"]).take(found)
    n_samples = pc.sum(lengths).as_py() or 0
    if n_samples == 0 and not allow_empty:
        reasons = dict(sorted(Counter(f["reason"] for f in failures).items()))
        raise NoSamplesError(
            f"no samples from {rows.num_rows} manifest rows (left out by reason: {reasons or 'none'}); "
            f"nothing in {out_dir} was changed. Pass --allow-empty to write an empty output."
        )
    pin = shards.read_pin(cfg.shards.pin) if cfg.shards.pin else {}
    plan = OutputPlan(ShardJobs(), {}, {}, failures, owned_files(out_dir))
    failures_by_split: dict[str, list[dict]] = {}
    for failure in failures:
        failures_by_split.setdefault(failure["split"], []).append(failure)
    joined = _joined_digests(usable)
    for split in schema.SPLITS:
        at = pa.array(np.flatnonzero(pc.equal(usable["split"], split).to_numpy()), pa.int64())
        if pc.sum(lengths.take(at)).as_py():
            clips = _Clips(split, usable, records, at, found.take(at).combine_chunks(), joined.take(at))
            _plan_split(cfg, split, clips, failures_by_split.get(split, []), out_dir, plan, pin)
    return plan


def _joined_digest(row: dict) -> str:
    """Digest of what `join_sample` adds to a clip's samples (with the join's version)."""
    joined = {"join": JOIN_VERSION, "provenance": provenance(row), "split": row["split"]}
    return hashlib.sha256(json.dumps(joined, sort_keys=True, default=str).encode()).hexdigest()


def _joined_digests(clips: pa.Table) -> pa.Array:
    """`_joined_digest` of every row of a manifest table, in row order."""
    digests = []
    for batch in clips.select(list(schema.PROVENANCE_COLUMNS)).to_batches(max_chunksize=1 << 14):
        digests += [_joined_digest(row) for row in batch.to_pylist()]
    return pa.array(digests, pa.string())


def _sample_table(clips: _Clips) -> pa.Table:
    """One row per sample of the clips: its key, frames, seconds and media digest, its clip's
    position in `clips`, and the digest of what is joined into it."""
    clip, flat = _flatten(clips.records["samples"].take(clips.record_rows))
    columns = {name: pc.struct_field(flat, name) for name in ("key", "frames", "seconds", "digest")}
    return pa.table(columns | {"clip": clip, "joined": clips.joined.take(clip)})


def _flatten(lists: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(row of each item, the items) of a list column, items in row order."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    return np.repeat(np.arange(len(lengths)), lengths), pc.list_flatten(lists.combine_chunks())


def _plan_split(
    cfg: PreprocessConfig,
    split: str,
    clips: _Clips,
    failures: list[dict],
    out_dir: Path,
    plan: OutputPlan,
    pin: dict[str, int],
) -> None:
    samples = _sample_table(clips)
    layout, lookup = shards.plan_layers(samples["key"].to_pylist(), cfg.shards, split, pin)
    failures_by_shard: dict[str | None, list[dict]] = {}
    for failure in failures:
        failures_by_shard.setdefault(lookup(failure["key"]), []).append(failure)
    planned = pa.array([key for keys in layout.values() for key in keys], pa.string())
    samples = samples.take(pc.index_in(planned, value_set=samples["key"]))  # in layout order
    entries = plan.entries.setdefault(split, [])
    start = 0
    for name, keys in layout.items():
        shard = samples.slice(start, len(keys)).to_pylist()
        start += len(keys)
        content = shards.content_digest((s["digest"], s["joined"]) for s in shard)
        stats = shards.shard_stats(name, shard, failures_by_shard.get(name, []), content)
        tar_path, stats_path = out_dir / f"{name}.tar", out_dir / _stats_name(f"{name}.tar")
        old = read_json(stats_path) or {}
        try:
            intact = tar_path.stat().st_size == old.get("tar_bytes")
        except OSError:
            intact = False
        if old.get("content_sha256") == content and intact:
            full = stats | {"members_sha256": old.get("members_sha256"), "tar_bytes": old["tar_bytes"]}
            if full != old:
                plan.stats_only[name] = full
        else:
            plan.jobs.add(name, clips, sorted({s["clip"] for s in shard}), tuple(keys), stats)
        entries.append({"shard": f"{name}.tar", "samples": stats["samples"], "frames": stats["frames"]})


def assemble(job: ShardJob, cache_dir: Path, out_dir: Path) -> dict:
    """Write one shard from the cache (its clips' tars are read here, and only here) with the manifest's
    provenance joined, then its stats file; returns the stats."""
    wanted = set(job.keys)
    samples = []
    for clip, record, joined in job.clips:
        for sample in cache.load_samples(cache_dir, clip, record):
            if sample.key in wanted:
                samples.append(_join(sample, joined["provenance"], joined["split"]))
    if [s.key for s in samples] != list(job.keys):
        raise cache.CacheError(f"{job.name}: the cache holds {len(samples)} of its {len(job.keys)} samples")
    tar_path = out_dir / f"{job.name}.tar"
    shards.write_shard(tar_path, samples)
    stats = job.stats | {"members_sha256": shards.members_sha256(samples), "tar_bytes": tar_path.stat().st_size}
    write_json(out_dir / _stats_name(tar_path.name), stats)
    return stats


def finish(cfg: PreprocessConfig, plan: OutputPlan, out_dir: Path, manifest_sha256: str) -> dict:
    """After the jobs ran: stats whose counts alone changed, stale files removed, failures.parquet,
    then index.json (last: it marks a complete output). Returns the index."""
    for name, stats in plan.stats_only.items():
        write_json(out_dir / _stats_name(f"{name}.tar"), stats)
    index: dict = {"splits": {}}
    for split, entries in plan.entries.items():
        index["splits"][split] = {
            "shards": entries,
            "samples": sum(e["samples"] for e in entries),
            "frames": sum(e["frames"] for e in entries),
        }
    written = {out_dir / e["shard"] for s in index["splits"].values() for e in s["shards"]}
    written |= {out_dir / _stats_name(p.name) for p in written}
    for stale in sorted(plan.previous - written):
        stale.unlink(missing_ok=True)
    for partial in out_dir.glob(f"*{PARTIAL_SUFFIX}"):  # left by a killed run, of our own names only
        if SHARD_NAME.match(partial.name.removesuffix(PARTIAL_SUFFIX)):
            partial.unlink(missing_ok=True)
    index["dataset"] = dataset_block(cfg, manifest_sha256, list(index["splits"]))
    index["failures_by_reason"] = dict(sorted(Counter(f["reason"] for f in plan.failures).items()))
    write_failures(out_dir / schema.FAILURES_FILE, plan.failures)
    write_json(out_dir / schema.INDEX_FILE, index)  # last: marks a complete output
    return index


def write_outputs(
    cfg: PreprocessConfig,
    rows: pa.Table,
    records: pa.Table,
    cache_dir: Path,
    out_dir: Path,
    manifest_sha256: str,
    allow_empty: bool = False,
) -> dict:
    """Write shards per split, their stats, failures.parquet and index.json in this process; returns
    the index. (The flow runs `assemble` as tasks instead.) Nothing in OUT is touched before the plan
    is made, so NoSamplesError leaves OUT as it was."""
    plan = plan_outputs(cfg, rows, records, out_dir, allow_empty)
    out_dir.mkdir(parents=True, exist_ok=True)
    for job in plan.jobs:
        assemble(job, cache_dir, out_dir)
    return finish(cfg, plan, out_dir, manifest_sha256)


def write_failures(path: Path, failures: list[dict]) -> None:
    """failures.parquet: schema.FAILURE_COLUMNS, rows in a total order, written atomically."""
    rows = sorted(
        ({column: _text(f.get(column)) for column in schema.FAILURE_COLUMNS} for f in failures),
        key=lambda f: tuple(f[c] or "" for c in ("key", "reason", "status", "clip_id", "detail", "split")),
    )
    table = pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _text(value) -> str | None:
    return None if value is None else str(value)


def pin_manifest(
    pin_path: Path, manifest_path: Path, compact: bool = False, max_generations: int = 0
) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """`vasa pin-shards`: pin the manifest's usable clips (shards.grow_pin) into `pin_path`, then fold
    it to at most `max_generations` generations (shards.fold_pin; 0: no limit); returns the new pin,
    the previous one and the generations folded into one (empty when none)."""
    rows, _ = read_manifest(manifest_path)
    usable, _ = select(rows)
    before = shards.read_pin(pin_path) if Path(pin_path).is_file() else {}
    pin, folded = shards.fold_pin(shards.grow_pin(before, usable["key"].to_pylist(), compact), max_generations)
    shards.write_pin(Path(pin_path), pin)
    return pin, before, folded
