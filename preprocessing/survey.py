"""What a preprocess run must do, decided in the driver without Prefect and without opening a tar.

`survey` reads the manifest, marks the rows the takedown denylist covers (dropping their cache
entries), and finds each usable clip's cached record in the records table (`cache.read_records`;
the per-clip JSON only for clips the table does not hold). `nothing_to_do` then finishes a run that
has no clip to process and no shard to write (a no-op, or a change of counts only) straight away:
such a run never starts Prefect's server or a runner. Everything else is the flow's
(flows/preprocess.py), which uses the same survey.

Not part of the cache's code digest (see cache.NOT_IN_CODE_DIGEST): nothing here shapes a clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preprocessing import cache, denylist, writer
from vasa.config import PreprocessConfig


@dataclass
class Survey:
    """What the driver knows before any task runs: the manifest rows (takedowns marked), the usable
    ones with their input digests, the cached records found, the records table, and what is left."""

    rows: list[dict]
    manifest_sha256: str
    usable: list[dict]
    digests: dict[str, str]
    records: dict[str, dict]
    table: dict[str, dict]
    table_changed: bool

    @property
    def todo(self) -> list[dict]:
        return [row for row in self.usable if row["key"] not in self.records]


def survey(cfg: PreprocessConfig, manifest_path: Path, cache_dir: Path, denylist_path: Path | None) -> Survey:
    """Read the manifest, the denylist and the records table (no tar, no per-clip JSON of a clip the
    table holds); clips the denylist covers lose their cache entries."""
    rows, manifest_sha256 = writer.read_manifest(manifest_path)
    rows, covered = denylist.mark(rows, denylist.load(denylist_path) if denylist_path else denylist.Denylist())
    table = cache.read_records(cache_dir)
    table_changed = False
    for row in covered:  # a takedown also removes what was derived from the clip
        table_changed |= table.pop(row["key"], None) is not None
        cache.drop(cache_dir, row["key"])
    usable, _ = writer.select(rows)
    code = cache.code_digest()
    digests = cache.input_digests(usable, cfg, code)
    records = cached_records(usable, digests, table, cache_dir)
    return Survey(rows, manifest_sha256, usable, digests, records, table, table_changed)


def cached_records(
    usable: list[dict], digests: dict[str, str], table: dict[str, dict], cache_dir: Path
) -> dict[str, dict]:
    """The cached record of every usable clip made from the same inputs: from the records table, else
    (a killed run's finished clips) from the clip's own JSON record."""
    found = {}
    for row in usable:
        key = row["key"]
        record = table.get(key)
        if record is None or record["input_digest"] != digests[key]:
            record = cache.lookup(cache_dir, key, digests[key])
        if record is not None:
            found[key] = record
    return found


def damaged(jobs: list[writer.ShardJob], cache_dir: Path) -> set[str]:
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
    if found.table_changed or any(found.table.get(key) is not record for key, record in found.records.items()):
        cache.write_records(cache_dir, found.table | found.records)
    index = writer.finish(cfg, plan, out_dir, found.manifest_sha256)
    counts = {split: (s["samples"], len(s["shards"])) for split, s in index["splits"].items()}
    print(f"(samples, shards) by split: {counts}; left out by reason: {index['failures_by_reason']}")
    cached = len(found.usable) - processed
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
    if found.todo:
        return None
    plan = writer.plan_outputs(cfg, found.rows, found.records, out_dir, allow_empty)
    if plan.jobs:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return conclude(cfg, found, plan, Path(cache_dir), out_dir, processed=0)
