"""Prefect flow for stage `preprocess`: manifest -> webdataset shards.

    vasa preprocess --manifest data/ingest/manifest.parquet --out data/shards --cache data/preprocess_cache

Clips are mapped, in batches, over the task runner named in params `preprocess.runner`: threads or
processes on this machine, or a Dask cluster through prefect-dask (a LocalCluster, or the scheduler
at `dask_address`, e.g. one started by dask-jobqueue's SLURMCluster; the cache and output folders
must then be on a filesystem every worker sees). Each worker keeps one MediaPipe graph.

Every processed clip is cached under CACHE as `<key>.tar` (its samples) + `<key>.json` (its
outcome and an input digest of media sha256, params and code), so a killed run resumes where it
stopped and a re-run with new clips processes only those. Shards are then planned from the set of
samples (`preprocessing.shards`) and only shards whose content changed are rewritten.

Outputs in OUT: `<split>-<bucket>-<part>.tar` shards (train and test apart: held-out speakers never
share a shard with training data), `.stats.json` beside each, `index.json` (samples per shard and
split, for loaders), `failures.parquet` (every clip or segment left out, with status and reason).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, task, unmapped
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from preprocessing import shards
from preprocessing.files import read_json, write_json
from preprocessing.ingest import manifest
from preprocessing.shards import Sample
from vasa.config import PreprocessConfig, RunnerConfig

CODE_MODULES = ("decode", "face", "pose", "audio", "filters", "process", "shards", "media")
FAILURE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("split", pa.string()),
    ]
)


def input_digest(row: dict, cfg: PreprocessConfig, code: str) -> str:
    """What a clip's outcome depends on: its media bytes, the params that shape samples, the code."""
    params = cfg.model_dump(mode="json", exclude={"runner"})
    payload = {
        "sha256": row["sha256"],
        "clip_id": row["clip_id"],
        "av_offset": row["av_offset"],
        "params": params,
        "code": code,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def code_digest() -> str:
    """Digest of the preprocessing modules and assets, so changed code invalidates cached clips."""
    root = Path(__file__).resolve().parents[1] / "preprocessing"
    digest = hashlib.sha256(metadata.version("vasa-pipeline").encode())
    paths = [root / f"{name}.py" for name in CODE_MODULES] + sorted((root / "assets").glob("*"))
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _cache_paths(cache: Path, key: str) -> tuple[Path, Path]:
    folder = cache / key[:2]
    return folder / f"{key}.tar", folder / f"{key}.json"


def cached_outcome(cache: Path, key: str, digest: str) -> dict | None:
    """The cached outcome of a clip if it was made from the same inputs, else None."""
    tar_path, json_path = _cache_paths(cache, key)
    record = read_json(json_path)
    if record is None or record.get("input_digest") != digest or not tar_path.exists():
        return None
    return record


@task
def process_batch(rows: list[dict], cfg: PreprocessConfig, cache: Path, digests: list[str]) -> list[str]:
    """Process clips and cache each outcome (tar of samples, then the JSON that marks it done)."""
    from preprocessing.process import process_clip

    for row, digest in zip(rows, digests, strict=True):
        outcome = process_clip(row, cfg)
        tar_path, json_path = _cache_paths(cache, row["key"])
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        shards.write_shard(tar_path, outcome.samples)
        record = {
            "clip_id": row["clip_id"],
            "input_digest": digest,
            "samples": [{"key": s.key, "frames": s.frames, "seconds": s.seconds} for s in outcome.samples],
            "failures": outcome.failures,
            "frame_rejections": outcome.frame_rejections,
        }
        write_json(json_path, record)
    return [row["key"] for row in rows]


def load_samples(cache: Path, key: str, record: dict) -> Iterator[Sample]:
    tar_path, _ = _cache_paths(cache, key)
    sizes = {s["key"]: s for s in record["samples"]}
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            sample_key, _, ext = info.name.partition(".")
            members.setdefault(sample_key, {})[ext] = tar.extractfile(info).read()
    for sample_key in sorted(members):
        yield Sample(sample_key, members[sample_key], sizes[sample_key]["frames"], sizes[sample_key]["seconds"])


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
def preprocess_flow(cfg: PreprocessConfig, manifest_path: Path, out_dir: Path, cache: Path) -> dict:
    """Process every ok clip of the manifest (cached), then write the shards, stats and index."""
    rows = manifest.read_manifest(manifest_path)
    usable = [row for row in rows if row["status"] == manifest.OK]
    skipped = [
        {
            "clip_id": r["clip_id"],
            "key": r["key"],
            "status": "ingest",
            "reason": r["status"],
            "detail": r["error"],
            "split": r["split"],
        }
        for r in rows
        if r["status"] != manifest.OK
    ]
    code = code_digest()
    digests = {row["key"]: input_digest(row, cfg, code) for row in usable}
    records = {row["key"]: cached_outcome(cache, row["key"], digests[row["key"]]) for row in usable}
    todo = [row for row in usable if records[row["key"]] is None]
    print(f"{len(usable)} usable clips, {len(todo)} to process, {len(usable) - len(todo)} cached")
    batch = cfg.runner.clips_per_task
    batches = [todo[i : i + batch] for i in range(0, len(todo), batch)]
    futures = process_batch.map(
        batches, unmapped(cfg), unmapped(cache), [[digests[r["key"]] for r in b] for b in batches]
    )
    futures.wait()
    for future in futures:
        future.result()  # a crashed worker is a bug, not a clip status: surface it
    records |= {row["key"]: cached_outcome(cache, row["key"], digests[row["key"]]) for row in todo}
    return write_outputs(cfg, usable, records, skipped, cache, out_dir)


def write_outputs(
    cfg: PreprocessConfig, usable: list[dict], records: dict[str, dict], skipped: list[dict], cache: Path, out_dir: Path
) -> dict:
    """Shards per split (train and test never share a shard: held-out speakers stay out of training
    data), their stats, index.json and failures.parquet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = skipped + [f for record in records.values() for f in record["failures"]]
    written: set[Path] = set()
    summary: dict = {"splits": {}}
    for split in sorted({row["split"] for row in usable}):
        clips = {row["key"]: records[row["key"]] for row in usable if row["split"] == split}
        split_failures = [f for f in failures if f["split"] == split]
        index = _write_split(cfg, split, clips, split_failures, cache, out_dir)
        written |= {out_dir / entry["shard"] for entry in index}
        summary["splits"][split] = {
            "shards": index,
            "samples": sum(e["samples"] for e in index),
            "frames": sum(e["frames"] for e in index),
        }
    for stale in sorted(set(out_dir.glob("*.tar")) - written):
        stale.unlink()
        stale.with_name(stale.name.replace(".tar", ".stats.json")).unlink(missing_ok=True)
    summary["failures_by_reason"] = dict(sorted(Counter(f["reason"] for f in failures).items()))
    write_json(out_dir / "index.json", summary)
    table = pa.Table.from_pylist(sorted(failures, key=lambda f: (f["key"], f["reason"])), schema=FAILURE_SCHEMA)
    pq.write_table(table, out_dir / "failures.parquet", compression="zstd")
    counts = {split: (s["samples"], len(s["shards"])) for split, s in summary["splits"].items()}
    print(f"(samples, shards) by split: {counts}; left out: {summary['failures_by_reason']}")
    return summary


def _write_split(
    cfg: PreprocessConfig, split: str, records: dict[str, dict], failures: list[dict], cache: Path, out_dir: Path
) -> list[dict]:
    """Write the shards of one split whose content changed; returns their index entries."""
    sample_clip = {s["key"]: clip_key for clip_key, record in records.items() for s in record["samples"]}
    plan = shards.plan_shards(list(sample_clip), cfg.shards, prefix=split)
    failures_by_shard: dict[str | None, list[dict]] = {}
    for failure in failures:
        failures_by_shard.setdefault(shards.shard_for(plan, failure["key"], cfg.shards), []).append(failure)
    index = []
    for name, keys in plan.items():
        wanted = set(keys)
        clip_keys = sorted({sample_clip[k] for k in keys})
        samples = [s for ck in clip_keys for s in load_samples(cache, ck, records[ck]) if s.key in wanted]
        stats = shards.shard_stats(name, samples, failures_by_shard.get(name, []))
        tar_path, stats_path = out_dir / f"{name}.tar", out_dir / f"{name}.stats.json"
        old = read_json(stats_path) or {}
        intact = tar_path.exists() and tar_path.stat().st_size == old.get("tar_bytes")
        if old.get("members_sha256") != stats["members_sha256"] or not intact:
            shards.write_shard(tar_path, samples)
        stats["tar_bytes"] = tar_path.stat().st_size
        write_json(stats_path, stats)
        index.append({"shard": f"{name}.tar", "samples": stats["samples"], "frames": stats["frames"]})
    return index


def run(cfg: PreprocessConfig, manifest_path: Path, out_dir: Path, cache: Path) -> dict:
    return preprocess_flow.with_options(task_runner=task_runner(cfg.runner))(cfg, manifest_path, out_dir, cache)
