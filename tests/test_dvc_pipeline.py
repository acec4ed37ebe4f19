"""`dvc repro` on a copy of the project: the pipeline runs, and a second run has nothing to do."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from preprocessing import schema
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> str:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # The stages' Prefect flows get their own database (not the user's ~/.prefect, which another
        # run may hold) and time to start their temporary server on a busy machine.
        "PREFECT_HOME": str(cwd / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _shorten_training(params_path: Path) -> None:
    """The chain end to end, with a few optimiser steps per training stage: `make repro` runs the full
    schedules; this test checks the wiring (every stage runs, a second run has nothing to do)."""
    params = yaml.safe_load(params_path.read_text())
    for stage in ("train_latent", "train_motion"):
        params[stage]["train"].update(steps=4, warmup_steps=1, checkpoint_every=2, log_every=1, image_every=2)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_twice(tmp_path):
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        source = REPO / name
        if source.is_file() and not name.startswith("data/"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp_path / name)
    _shorten_training(tmp_path / "params.yaml")
    _run(["git", "init", "-q"], tmp_path)
    # As in a cloned checkout, HEAD exists (DVCLive in stage train_latent reads the baseline revision).
    identity = ["-c", "user.name=vasa-test", "-c", "user.email=vasa-test@localhost"]
    _run(["git", *identity, "commit", "-q", "--allow-empty", "-m", "copy of the project"], tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], tmp_path)
    index = tmp_path / "data" / "sample" / "index.json"
    assert index.is_file()
    shards = json.loads((tmp_path / "data" / "shards" / schema.INDEX_FILE).read_text())
    manifest = tmp_path / "data" / "ingest" / "manifest.parquet"
    assert shards["dataset"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert shards["dataset"]["schema_version"] == schema.SCHEMA_VERSION
    listed = {e["shard"] for split in shards["splits"].values() for e in split["shards"]}
    assert listed and listed == {p.name for p in (tmp_path / "data" / "shards").glob("*.tar")}
    assert (tmp_path / "data" / "shards" / schema.FAILURES_FILE).is_file()
    for stage_out in ("latent/model", "motion", "motion_dit/model"):
        assert (tmp_path / "data" / stage_out).is_dir(), f"data/{stage_out} missing after dvc repro"
    second = _run([*dvc, "repro"], tmp_path)
    assert "Data and pipelines are up to date" in second
    assert "Running stage" not in second
    assert "up to date" in _run([*dvc, "status"], tmp_path)
