"""Prefect flow for stage `preprocess`: manifest -> webdataset shards.

    vasa preprocess --manifest data/ingest/manifest.parquet --out data/shards --cache data/preprocess_cache
                    [--denylist data/takedown/denylist.csv]

Only wiring lives here. Clips not in the cache (`preprocessing.cache`) are mapped, in batches, over
the task runner named in params `preprocess.runner`: threads or processes on this machine, or a Dask
cluster through prefect-dask (a LocalCluster, or the scheduler at `dask_address`, e.g. one started by
dask-jobqueue's SLURMCluster; the cache and output folders must then be on a filesystem every worker
sees). Each worker keeps one MediaPipe graph and stores each clip's media-derived outcome in the
cache, so a killed run resumes. `preprocessing.writer` then decides from the cache's records table
and the manifest alone which shards changed, and only those are assembled, as tasks on the same
runner; finally stats, failures.parquet and index.json are written.

A run with nothing to process and no shard to write finishes without starting Prefect
(`preprocessing.survey`, which also decides what the flow does).
Work is submitted in waves of at most WAVE_PER_WORKER x workers tasks in flight, so the driver's
memory does not grow with the corpus; a task gets its clips as an Arrow batch and returns their
records as one, and shard jobs travel `Sealed` (neither is walked by Prefect). Clips covered by the
takedown denylist are left out (failure reason `taken_down`) and their cached outcomes removed,
whatever the manifest says.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from tqdm import tqdm

from preprocessing import cache, writer
from preprocessing.ingest import manifest
from preprocessing.survey import DIGEST, conclude, damaged, nothing_to_do, survey
from vasa.core.config import PreprocessConfig, RunnerConfig
from vasa.core.errors import InputError

T = TypeVar("T")
TABLES_TO_COMBINE = 64  # per-task record tables gathered before they are combined into one
WAVE_PER_WORKER = 4  # tasks in flight per worker: enough to keep workers busy, bounded driver state
SHARDS_PER_TASK = 8  # shards assembled per task: fewer task runs in Prefect's database at scale
# Seconds to wait for a TCP connection to `dask_address` before any work: a scheduler that is up
# answers in milliseconds even across a cluster; Dask's own connect waits 30 s and ends in a traceback.
DASK_CONNECT_TIMEOUT_S = 5.0
DASK_DEFAULT_PORT = 8786  # the scheduler's port when the address names none (Dask's default)


class Sealed(Generic[T]):
    """A task parameter Prefect hands over without walking it. Prefect visits every element of list,
    dict and dataclass parameters looking for upstream results, and matches plain dicts by id() alone:
    ids of freed results are recycled, so unrelated task runs got linked as inputs (~2.4 KB of bogus
    `task_inputs` per task run at 10^5 clips, repeated in each of its state events). This is no
    collection, and it can be weakly referenced, so Prefect checks its identity properly (an Arrow
    table is both already, so a batch of clips goes as it is). Prefect's own `quote` is a tuple, which
    Dask rebuilds as a plain tuple on the way to a worker."""

    __slots__ = ("value", "__weakref__")

    def __init__(self, value: T) -> None:
        self.value = value


@task(cache_policy=NO_CACHE)
def process_batch(batch: pa.Table, cfg: PreprocessConfig, cache_dir: Path) -> pa.Table:
    """Process the batch's clips (manifest rows with column survey.DIGEST) and cache each outcome;
    returns their records (cache.RECORDS_SCHEMA, without sample bytes)."""
    from preprocessing.decode import bound_frame_allocations
    from preprocessing.process import process_clip

    bound_frame_allocations()  # per worker process (idempotent): keeps decoded pictures off the heap
    rows = manifest.row_dicts(batch.drop_columns([DIGEST]))  # media paths as real file names
    digests = batch[DIGEST].to_pylist()
    records = [
        cache.store(cache_dir, row["key"], digest, process_clip(row, cfg))
        for row, digest in zip(rows, digests, strict=True)
    ]
    return cache.records_table(records)


@task(cache_policy=NO_CACHE)
def assemble_shards(jobs: Sealed[list[writer.ShardJob]], cache_dir: Path, out_dir: Path) -> list[dict]:
    """Write changed shards from the cache; returns their stats."""
    return [writer.assemble(job, cache_dir, out_dir) for job in jobs.value]


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        require_scheduler(cfg.dask_address)
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True})


def require_scheduler(address: str, timeout_s: float = DASK_CONNECT_TIMEOUT_S) -> None:
    """Raise InputError naming `address` unless something accepts a TCP connection there within
    `timeout_s` seconds (tcp:// and tls:// addresses; other transports are left to Dask)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    where = f"preprocess.runner.dask_address {address!r}"
    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location, default_port=DASK_DEFAULT_PORT)
    except ValueError as err:
        raise InputError(f"{where}: not a Dask scheduler address ({err})") from None
    if scheme not in ("tcp", "tls"):
        return
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise InputError(
            f"{where}: no Dask scheduler reachable at {host}:{port} within {timeout_s:g} s ({reason}); "
            "start it, or set preprocess.runner.dask_address: null for a local cluster"
        ) from None


def in_waves(submit: Callable, batches: Iterable, limit: int) -> Iterator:
    """Results of `submit(batch)` for each batch, in order, with at most `limit` futures in flight.
    A crashed task is a bug, not a clip status: its exception surfaces here."""
    pending: deque = deque()
    for batch in batches:
        if len(pending) >= limit:
            yield pending.popleft().result()
        pending.append(submit(batch))
    while pending:
        yield pending.popleft().result()


def _chunks(items: list | pa.Table, size: int) -> Iterator:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def batch_size(runner: RunnerConfig, clips: int) -> int:
    """Clips per task: enough tasks to fill the waves (WAVE_PER_WORKER per worker) when there are few
    clips, at most `clips_per_task` when there are many (each task run is a row set in Prefect's
    database: ~20 KB, so 64 clips per task is ~0.3 MB per 1000 clips)."""
    return max(1, min(runner.clips_per_task, -(-clips // (WAVE_PER_WORKER * runner.workers))))


def process(cfg: PreprocessConfig, rows: pa.Table, cache_dir: Path) -> pa.Table:
    """Process `rows` (manifest rows with column survey.DIGEST) in batches (`batch_size`), in waves;
    their records as a table (cache.RECORDS_SCHEMA). Only the batches in flight are dicts."""
    limit = WAVE_PER_WORKER * cfg.runner.workers
    tables = [cache.RECORDS_SCHEMA.empty_table()]

    def submit(batch: pa.Table):
        return process_batch.submit(batch, cfg, cache_dir)

    with tqdm(total=rows.num_rows, desc="preprocess", unit="clip", disable=not rows.num_rows) as bar:
        for result in in_waves(submit, _chunks(rows, batch_size(cfg.runner, rows.num_rows)), limit):
            tables.append(result)
            if len(tables) >= TABLES_TO_COMBINE:  # one chunk per task would be ~10^4 chunks at 10^6 clips
                tables = [pa.concat_tables(tables).combine_chunks()]
            bar.update(result.num_rows)
    return pa.concat_tables(tables).combine_chunks()


def assemble(cfg: PreprocessConfig, plan: writer.OutputPlan, cache_dir: Path, out_dir: Path) -> None:
    """Write the changed shards as tasks, a few shards per task, in waves."""
    unchanged = sum(len(entries) for entries in plan.entries.values()) - len(plan.jobs)
    print(f"{len(plan.jobs)} shards to write, {unchanged} unchanged")

    def submit(jobs: list[writer.ShardJob]):
        return assemble_shards.submit(Sealed(jobs), cache_dir, out_dir)

    per_task = max(1, min(SHARDS_PER_TASK, -(-len(plan.jobs) // cfg.runner.workers)))
    batches = _chunks(plan.jobs, per_task)
    with tqdm(total=len(plan.jobs), desc="shards", unit="shard", disable=not plan.jobs) as bar:
        for written in in_waves(submit, batches, WAVE_PER_WORKER * cfg.runner.workers):
            bar.update(len(written))


@contextmanager
def shared_api() -> Iterator[None]:
    """Point process workers at this flow's Prefect API. Without PREFECT_API_URL (the ephemeral
    server of a plain `vasa preprocess`), each spawned worker would start a server of its own (~10 s
    each); ProcessPoolTaskRunner hands the workers this process's environment at its first submit."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    os.environ["PREFECT_API_URL"] = str(get_client(sync_client=True).api_url)
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@flow(name="preprocess", log_prints=True)
def preprocess_flow(
    cfg: PreprocessConfig,
    manifest_path: Path,
    out_dir: Path,
    cache_dir: Path,
    allow_empty: bool = False,
    denylist_path: Path | None = None,
) -> dict:
    """Process every usable clip of the manifest not yet cached, then write the changed outputs.
    Returns the index (as written to index.json) plus `processed`, `cached` and `assembled` counts."""
    found = survey(cfg, manifest_path, cache_dir, denylist_path)
    todo = found.to_process()
    usable = found.usable.num_rows
    print(f"{usable} usable clips: {todo.num_rows} to process, {usable - todo.num_rows} cached")
    with shared_api():
        found.add(process(cfg, todo, cache_dir))
        plan = writer.plan_outputs(cfg, found.manifest, found.records, out_dir, allow_empty)
        redo = damaged(plan.jobs, cache_dir)
        if redo:
            print(f"{len(redo)} cache entries damaged: processed again")
            found.add(process(cfg, found.to_process(sorted(redo)), cache_dir))
            plan = writer.plan_outputs(cfg, found.manifest, found.records, out_dir, allow_empty)
        found.save_records(cache_dir)  # before assembly: a crash keeps them
        out_dir.mkdir(parents=True, exist_ok=True)
        assemble(cfg, plan, cache_dir, out_dir)
    return conclude(cfg, found, plan, cache_dir, out_dir, processed=todo.num_rows + len(redo))


def run(
    cfg: PreprocessConfig,
    manifest_path: Path,
    out_dir: Path,
    cache_dir: Path,
    allow_empty: bool = False,
    denylist_path: Path | None = None,
) -> dict:
    """Entry point for the CLI and tests. A missing manifest fails here, before any flow starts; a
    run with nothing to process and no shard to write finishes without Prefect
    (`preprocessing.survey.nothing_to_do`)."""
    writer.require_manifest(manifest_path)
    summary = nothing_to_do(cfg, manifest_path, out_dir, cache_dir, allow_empty, denylist_path)
    if summary is None:
        summary = run_flow(cfg, manifest_path, out_dir, cache_dir, allow_empty, denylist_path)
    return summary


def run_flow(
    cfg: PreprocessConfig,
    manifest_path: Path,
    out_dir: Path,
    cache_dir: Path,
    allow_empty: bool = False,
    denylist_path: Path | None = None,
) -> dict:
    """The flow on the runner of `cfg.runner` (no fast path)."""
    flow_ = preprocess_flow.with_options(task_runner=task_runner(cfg.runner))
    path = Path(denylist_path) if denylist_path else None
    return flow_(cfg, Path(manifest_path), Path(out_dir), Path(cache_dir), allow_empty, path)
