"""Prefect flow for stage `preprocess`: manifest -> webdataset shards.

    vasa preprocess --manifest data/ingest/manifest.parquet --out data/shards --cache data/preprocess_cache

Only wiring lives here. Clips not in the cache (`preprocessing.cache`) are mapped, in batches, over
the task runner named in params `preprocess.runner`: threads or processes on this machine, or a Dask
cluster through prefect-dask (a LocalCluster, or the scheduler at `dask_address`, e.g. one started by
dask-jobqueue's SLURMCluster; the cache and output folders must then be on a filesystem every worker
sees). Each worker keeps one MediaPipe graph and stores each clip's media-derived outcome in the
cache, so a killed run resumes. Then `preprocessing.writer` joins the manifest's provenance and
writes the shards per split, their stats, failures.parquet and index.json.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task, unmapped
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from preprocessing import cache, writer
from vasa.config import PreprocessConfig, RunnerConfig


@task
def process_batch(rows: list[dict], cfg: PreprocessConfig, cache_dir: Path, digests: list[str]) -> dict[str, dict]:
    """Process clips and cache each outcome; returns each clip's record (without sample bytes)."""
    from preprocessing.decode import bound_frame_allocations
    from preprocessing.process import process_clip

    bound_frame_allocations()  # per worker process (idempotent): keeps decoded pictures off the heap
    return {
        row["key"]: cache.store(cache_dir, row["key"], digest, process_clip(row, cfg))
        for row, digest in zip(rows, digests, strict=True)
    }


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True})


@flow(name="preprocess", log_prints=True)
def preprocess_flow(
    cfg: PreprocessConfig, manifest_path: Path, out_dir: Path, cache_dir: Path, allow_empty: bool = False
) -> dict:
    """Process every usable clip of the manifest not yet cached, then write the outputs. Returns the
    index (as written to index.json) plus `processed` and `cached` clip counts of this run."""
    rows, manifest_sha256 = writer.read_manifest(manifest_path)
    usable, _ = writer.select(rows)
    code = cache.code_digest()
    digests = {row["key"]: cache.input_digest(row, cfg, code) for row in usable}
    records = {row["key"]: cache.lookup(cache_dir, row["key"], digests[row["key"]]) for row in usable}
    todo = [row for row in usable if records[row["key"]] is None]
    print(f"{len(usable)} usable clips: {len(todo)} to process, {len(usable) - len(todo)} cached")
    size = cfg.runner.clips_per_task
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    futures = process_batch.map(
        batches, unmapped(cfg), unmapped(cache_dir), [[digests[r["key"]] for r in b] for b in batches]
    )
    futures.wait()
    for future in futures:
        records |= future.result()  # a crashed worker is a bug, not a clip status: surface it
    index = writer.write_outputs(cfg, rows, records, cache_dir, out_dir, manifest_sha256, allow_empty)
    counts = {split: (s["samples"], len(s["shards"])) for split, s in index["splits"].items()}
    print(f"(samples, shards) by split: {counts}; left out by reason: {index['failures_by_reason']}")
    return index | {"processed": len(todo), "cached": len(usable) - len(todo)}


def run(cfg: PreprocessConfig, manifest_path: Path, out_dir: Path, cache_dir: Path, allow_empty: bool = False) -> dict:
    """Entry point for the CLI and tests. A missing manifest fails here, before any flow starts."""
    writer.require_manifest(manifest_path)
    flow_ = preprocess_flow.with_options(task_runner=task_runner(cfg.runner))
    return flow_(cfg, Path(manifest_path), Path(out_dir), Path(cache_dir), allow_empty)
