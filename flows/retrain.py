"""Prefect flow `retrain`: scheduled retraining with a promotion gate.

    vasa retrain                          # once, now (params `retrain`)
    vasa retrain --serve                  # long-running: runs on params retrain.cron (flow.serve)
    vasa retrain --deploy vasa-pool       # register a deployment on a work pool (flow.deploy), see docs/OPERATIONS.md

Recipe (each step a task; the decisions are vasa/provenance/promotion.py's):
  1. `dvc repro ingest`, then diff the manifest against the one the promoted bundle was built from (read
     from DVC's cache by the md5 in data/retrain/promoted.json). Nothing added, removed or changed and a
     bundle already promoted: stop, decision `unchanged`.
  2. `dvc repro <retrain.targets>`: ingest and preprocess are incremental (only new clips are processed,
     only the shards whose key range they fall in are rewritten); training stages re-run on the new shards.
     The score stage scores every clip, the new ones included, with that run's judges: the run records the
     corpus's quality (clips kept, corrected, rejected by reason) and data/retrain/quality.csv + quality.png
     show it per week (vasa/provenance/quality.py).
  3. Check the gate (retrain.gate: {file, key, op, value} on the stages' metrics JSON).
  4. Pass: `dvc push` (bundle and every other cached output to the default remote), commit dvc.lock and
     the records, tag `<artifact>@vX.Y.Z` and `<artifact>#<stage>#N` (GTO / DVC model registry). Fail:
     decision `refused` with the failed conditions; promoted.json, the tags and the remote keep the
     current bundle (the workspace holds the refused candidate for inspection).
Every run writes data/retrain/runs/<run>.json (run, manifest diff, stages run, gate results, decision,
reason); promoted.json points at the promoted run.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, task

from vasa.core.config import RetrainConfig, load_params
from vasa.core.errors import InputError
from vasa.core.files import read_json, write_json
from vasa.provenance import history as dvc_history
from vasa.provenance import promotion as decide
from vasa.provenance import quality as corpus_quality

RUNS, PROMOTED = "runs", "promoted.json"
INGEST_STAGE = "ingest"


class RetrainError(InputError):
    """A pipeline command of the retraining run failed."""


def _run(repo: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RetrainError(f"{' '.join(args)} failed in {repo} (exit {done.returncode}):\n{tail}")
    return done.stdout + done.stderr


@task
def dvc_repro(repo: Path, targets: tuple[str, ...]) -> list[str]:
    """`dvc repro` of the targets; returns the stages that ran."""
    out = _run(repo, sys.executable, "-m", "dvc", "repro", *targets)
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


@task
def manifest_change(repo: Path, manifest: str, records: Path) -> dict:
    """The manifest diff against the promoted run's manifest (from the DVC cache)."""
    promoted = read_json(records / PROMOTED)
    old = None
    if promoted is not None:
        cached = dvc_history.cache_file(repo, promoted["manifest_md5"])
        if cached is None:  # a fresh clone: fetch that revision's outputs from the remote first
            raise RetrainError(
                f"the promoted manifest (md5 {promoted['manifest_md5']}) is not in the DVC cache; "
                f"run `dvc fetch --rev {promoted['tags']['version']}` first"
            )
        old = pq.read_table(cached).to_pylist()
    return decide.manifest_diff(old, pq.read_table(repo / manifest).to_pylist())


@task
def pin_layout(repo: Path, params: str, manifest: str, max_generations: int) -> dict:
    """Pin the shard layout to the new manifest (`vasa pin-shards`): the run's new clips become the next
    generation, so preprocess writes them into new shards and rewrites none it promoted before; past
    `max_generations` (retrain.max_shard_generations) the newest generations are folded into one,
    size-tiered (preprocessing/shards.py `fold_pin`), and this run rewrites their shards."""
    from preprocessing import writer

    configured = load_params(repo / params).preprocess.shards.pin
    if not configured:
        raise RetrainError("retrain.pin_shards is true but preprocess.shards.pin names no pin file")
    pin, _, folded = writer.pin_manifest(repo / configured, repo / manifest, max_generations=max_generations)
    return {"path": configured, "clips": len(pin), "generations": len(set(pin.values())), "folded": folded}


@task
def score_quality(repo: Path, scores: str, diff: dict) -> dict | None:
    """The score table's counts for the run record (None, logged, when the targets did not make one)."""
    try:
        found = corpus_quality.table_quality(repo / scores)
    except InputError as err:
        print(f"retrain: no corpus quality for this run: {err}")
        return None
    return found | {"added": diff["counts"]["added"]}


@task
def quality_report(records: Path) -> None:
    """quality.csv and quality.png in `records`, one row per week, from every run record."""
    rows = corpus_quality.weekly(corpus_quality.read_records(records / RUNS))
    if rows:
        corpus_quality.write_report(rows, records)


@task
def promote(repo: Path, cfg: RetrainConfig, records: Path, record: dict) -> dict:
    """Push the outputs, then commit dvc.lock and the records and tag the commit (the tags come last: a
    registered version's data is always in the remote)."""
    if cfg.push:
        _run(repo, sys.executable, "-m", "dvc", "push")
    tags = _run(repo, "git", "tag", "--list").split()
    version, assignment = decide.next_tags(tags, cfg.artifact, cfg.stage)
    record = record | {"pushed": cfg.push, "tags": {"version": version, "stage": assignment}}
    run_file = records / RUNS / f"{record['run']}.json"
    write_json(run_file, record)
    write_json(records / PROMOTED, record)
    if cfg.git_tag:
        paths = [dvc_history.LOCK_FILE, os.path.relpath(run_file, repo), os.path.relpath(records / PROMOTED, repo)]
        if "shard_pin" in record:  # the pin this run's shards were planned with
            paths.append(record["shard_pin"]["path"])
        _run(repo, "git", "add", "--", *paths)
        message = f"Promote {version} (retrain run {record['run']})"
        _run(repo, "git", "commit", "-q", "-m", message, "--", *paths)
        artifact_version = version.split("@", 1)[1]
        _run(repo, "git", "tag", "-a", version, "-m", f"Registering artifact {cfg.artifact} version {artifact_version}")
        note = f"Assigning stage {cfg.stage} to artifact {cfg.artifact} version {artifact_version}"
        _run(repo, "git", "tag", "-a", assignment, "-m", note)
    return record


@flow(name="retrain", log_prints=True)
def retrain_flow(
    repo: str = ".",
    params: str = "params.yaml",
    manifest: str = "data/ingest/manifest.parquet",
    bundle: str = "data/bundle",
    records: str = "data/retrain",
    force: bool = False,
    scores: str = "data/scores/scores.parquet",
) -> dict:
    """One scheduled retraining run in the DVC project at `repo` (paths relative to it); returns the
    run's record. params.yaml is read at run time, so a scheduled run follows the committed settings."""
    root = Path(repo).absolute()
    cfg = load_params(root / params).retrain
    folder = root / records
    (folder / RUNS).mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    record: dict = {"run": started.strftime("%Y%m%dT%H%M%SZ"), "started": started.isoformat(), "targets": cfg.targets}

    ran = dvc_repro(root, (INGEST_STAGE,))
    diff = manifest_change(root, manifest, folder)
    record["manifest_diff"] = diff
    if not decide.has_changes(diff) and not force:
        record |= {"stages_run": ran, "decision": decide.UNCHANGED, "reason": "no clip added, removed or changed"}
        write_json(folder / RUNS / f"{record['run']}.json", record)
        print(f"retrain {record['run']}: {record['reason']}; the promoted bundle stays")
        return record

    if cfg.pin_shards:
        record["shard_pin"] = pin_layout(root, params, manifest, cfg.max_shard_generations)
    ran += dvc_repro(root, cfg.targets)
    record["quality"] = score_quality(root, scores, diff)
    results = decide.check_gate(root, cfg.gate)
    reason = decide.gate_reason(results)
    lock = dvc_history.read_lock(root / dvc_history.LOCK_FILE)
    record |= {
        "stages_run": ran,
        "gate": results,
        "bundle_md5": dvc_history.path_md5(lock, bundle),
        "manifest_md5": dvc_history.path_md5(lock, manifest),
    }
    if reason is None:
        record = promote(root, cfg, folder, record | {"decision": decide.PROMOTED, "reason": "every gate passed"})
        print(f"retrain {record['run']}: promoted {record['tags']['version']} ({record['tags']['stage']})")
    else:
        current = (read_json(folder / PROMOTED) or {}).get("tags", {}).get("version", "none")
        record |= {"decision": decide.REFUSED, "reason": reason, "kept": current}
        write_json(folder / RUNS / f"{record['run']}.json", record)
        print(f"retrain {record['run']}: refused ({reason}); promoted bundle stays {current}")
    quality_report(folder)
    return record


def run(repo: Path, params: Path, records: Path, force: bool = False) -> dict:
    """Entry point for the CLI and tests: one run now."""
    return retrain_flow(str(repo), str(params), records=str(records), force=force)


def serve(cfg: RetrainConfig, repo: Path, params: Path, records: Path) -> None:
    """Long-running: this process polls the Prefect API and runs the flow on `cfg.cron` (Ctrl-C stops)."""
    parameters = {"repo": str(Path(repo).absolute()), "params": str(params), "records": str(records)}
    retrain_flow.serve(name="retrain-served", cron=cfg.cron, parameters=parameters)


def deploy(cfg: RetrainConfig, repo: Path, params: Path, records: Path, work_pool: str) -> object:
    """A deployment on `work_pool` (its workers run the flow from this checkout on `cfg.cron`); returns its id.
    Registered with RunnerDeployment.apply: Flow.deploy's check for online workers sends a query Prefect
    3.8.8's own server rejects (422, limit None) before anything is created."""
    root = Path(repo).absolute()
    source = retrain_flow.from_source(source=str(root), entrypoint="flows/retrain.py:retrain_flow")
    parameters = {"repo": str(root), "params": str(params), "records": str(records)}
    deployment = source.to_deployment(
        name="retrain-scheduled", work_pool_name=work_pool, cron=cfg.cron, parameters=parameters, concurrency_limit=1
    )
    return deployment.apply()
