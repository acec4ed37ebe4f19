"""What a preprocess run must do, decided in the driver without Prefect and without opening a tar.

`survey` reads the manifest, marks the rows the takedown denylist covers (dropping their cache
entries), and finds each usable clip's cached record in the records table (`cache.read_records`;
the per-clip JSON only for clips the table does not hold). `nothing_to_do` then finishes a run that
has no clip to process and no shard to write (a no-op, or a change of counts only) straight away:
such a run never starts Prefect's server or a runner. Everything else is the flow's
(flows/preprocess.py), which uses the same survey.

The manifest and the records stay Arrow tables (a few hundred bytes per clip; as dicts they took
~4.5 KB, ~5 GB of driver memory at VoxCeleb2's 1.13 M clips): only the clips to process, the
takedowns and the clips of the shards to write become dicts (docs/BENCHMARKS.md, "Columnar driver").

Not part of the cache's code digest (see cache.CLIP_MODULES): nothing here shapes a clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from preprocessing import cache, denylist, writer
from vasa.core.config import PreprocessConfig

DIGEST = "input_digest"  # the column `Survey.to_process` adds to manifest rows
LOOKUP_BATCH = 1 << 12  # per-clip JSON records gathered into a table this many at a time


@dataclass
class Survey:
    """What the driver knows before any task runs, as Arrow tables (a few hundred bytes per clip):
    the manifest (takedowns marked), its usable rows and their input digests (row for row), the
    records table read, its rows made from the same inputs as a usable clip (`matched`), and the
    records found or made this run that the table does not hold (`fresh`); `records` is the current
    record of every usable clip found so far."""

    manifest: pa.Table
    manifest_sha256: str
    usable: pa.Table
    digests: pa.Array
    table: pa.Table
    matched: pa.Table
    fresh: pa.Table
    table_changed: bool

    @property
    def records(self) -> pa.Table:
        return pa.concat_tables([_without(self.matched, self.fresh["key"]), self.fresh])

    def to_process(self, keys: list[str] | None = None) -> pa.Table:
        """Usable rows with their input digest (column DIGEST): those of `keys`, else those without
        a record (the clips to process)."""
        rows = self.usable.append_column(DIGEST, self.digests)
        if keys is not None:
            return rows.filter(pc.is_in(rows["key"], value_set=pa.array(keys, pa.string())))
        return rows.filter(pc.invert(pc.is_in(rows["key"], value_set=self.records["key"])))

    def add(self, records: pa.Table) -> None:
        """Records made this run (cache.RECORDS_SCHEMA): they replace any earlier one of the clip."""
        self.fresh = pa.concat_tables([_without(self.fresh, records["key"]), records])

    def save_records(self, cache_dir: Path) -> None:
        """Write the records table with this run's records (when it changed)."""
        if self.table_changed or self.fresh.num_rows:
            self.table = pa.concat_tables([_without(self.table, self.fresh["key"]), self.fresh])
            cache.write_records(cache_dir, self.table)
            self.matched, self.fresh, self.table_changed = self.records, cache.RECORDS_SCHEMA.empty_table(), False


def survey(cfg: PreprocessConfig, manifest_path: Path, cache_dir: Path, denylist_path: Path | None) -> Survey:
    """Read the manifest, the denylist and the records table (no tar, no per-clip JSON of a clip the
    table holds); clips the denylist covers lose their cache entries."""
    rows, manifest_sha256 = writer.read_manifest(manifest_path)
    rows, covered = mark(rows, denylist.load(denylist_path) if denylist_path else denylist.Denylist())
    table = cache.read_records(cache_dir)
    table_changed = False
    if covered:  # a takedown also removes what was derived from the clip
        kept = _without(table, pa.array(covered, pa.string()))
        table_changed, table = kept.num_rows != table.num_rows, kept
        for key in covered:
            cache.drop(cache_dir, key)
    usable, _ = writer.select(rows)
    digests = cache.input_digests(usable, cfg, cache.code_digest())
    wanted, held = _pairs(usable["key"], digests), _pairs(table["key"], table[DIGEST])
    current = pc.is_in(held, value_set=wanted)
    matched = table if pc.all(current).as_py() else table.filter(current)
    missing = usable.select(["key"]).append_column(DIGEST, digests).filter(pc.invert(pc.is_in(wanted, value_set=held)))
    fresh = cached_records(missing, cache_dir)
    return Survey(rows, manifest_sha256, usable, digests, table, matched, fresh, table_changed)


def mark(rows: pa.Table, deny: denylist.Denylist) -> tuple[pa.Table, list[str]]:
    """`denylist.mark` over a manifest table: (the table with covered rows marked, their keys). Only
    rows holding an id of the list are read as dicts."""
    if not deny:
        return rows, []
    ids = {kind: pa.array([r.id for r in deny.requests if r.kind == kind], pa.string()) for kind in denylist.KINDS}
    columns = (("speaker_id", "speaker"), ("youtube_id", "video"), ("source_url", "video"), ("clip_id", "clip"))
    hit = np.zeros(rows.num_rows, dtype=bool)
    for column, kind in columns:
        hit |= pc.fill_null(pc.is_in(rows[column], value_set=ids[kind]), False).to_numpy()
    marked, covered = denylist.mark(rows.take(np.flatnonzero(hit)).to_pylist(), deny)
    if not covered:
        return rows, []
    for column in ("status", "error"):  # rows of `hit` that no request covers keep their values
        values = pa.array([row[column] for row in marked], pa.string())
        values = pc.replace_with_mask(rows[column].combine_chunks(), pa.array(hit), values)
        rows = rows.set_column(rows.schema.get_field_index(column), column, values)
    return rows, [row["key"] for row in covered]


def cached_records(missing: pa.Table, cache_dir: Path) -> pa.Table:
    """The cached records of the clips `missing` names (key and DIGEST: usable clips the records
    table holds no record of, e.g. a killed run's finished clips) that were made from the same
    inputs, from each clip's own JSON record."""
    found = []
    for batch in missing.to_batches(max_chunksize=LOOKUP_BATCH):
        pairs = zip(batch.column("key").to_pylist(), batch.column(DIGEST).to_pylist(), strict=True)
        records = [cache.lookup(cache_dir, key, digest) for key, digest in pairs]
        found.append(cache.records_table(record for record in records if record is not None))
    return pa.concat_tables([cache.RECORDS_SCHEMA.empty_table(), *found])


def _pairs(keys, digests) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(keys, digests, ":")


def _without(table: pa.Table, keys) -> pa.Table:
    """The rows of a records table whose key is not in `keys` (the table itself when none is)."""
    drop = pc.is_in(table["key"], value_set=keys)
    return table.filter(pc.invert(drop)) if pc.any(drop).as_py() else table


def damaged(jobs: writer.ShardJobs, cache_dir: Path) -> set[str]:
    """Clips of the shards to write whose cached tar is missing or not the size its record says (a
    stat each, no read): processed again before assembly."""
    bad = set()
    for job in jobs:
        for key, record, _ in job.clips:
            tar_path, _ = cache.paths(cache_dir, key)
            try:
                if tar_path.stat().st_size != record["tar_bytes"]:
                    bad.add(key)
            except OSError:
                bad.add(key)
    return bad


def conclude(
    cfg: PreprocessConfig, found: Survey, plan: writer.OutputPlan, cache_dir: Path, out_dir: Path, processed: int
) -> dict:
    """Records table (when it changed), then stats, failures and index; returns the summary."""
    found.save_records(cache_dir)
    index = writer.finish(cfg, plan, out_dir, found.manifest_sha256)
    counts = {split: (s["samples"], len(s["shards"])) for split, s in index["splits"].items()}
    print(f"(samples, shards) by split: {counts}; left out by reason: {index['failures_by_reason']}")
    cached = found.usable.num_rows - processed
    return index | {"processed": processed, "cached": cached, "assembled": len(plan.jobs)}


def nothing_to_do(
    cfg: PreprocessConfig,
    manifest_path: Path,
    out_dir: Path,
    cache_dir: Path,
    allow_empty: bool = False,
    denylist_path: Path | None = None,
) -> dict | None:
    """The run's summary when it had nothing to process and no shard to write (then its stats,
    failures and index are written here); None when the flow must run. Raises
    writer.NoSamplesError as the flow would."""
    out_dir = Path(out_dir)
    found = survey(cfg, Path(manifest_path), Path(cache_dir), Path(denylist_path) if denylist_path else None)
    if found.to_process().num_rows:
        return None
    plan = writer.plan_outputs(cfg, found.manifest, found.records, out_dir, allow_empty)
    if plan.jobs:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return conclude(cfg, found, plan, Path(cache_dir), out_dir, processed=0)
