"""`vasa audit --history`: which earlier bundles held a taken-down speaker, read from git + the DVC cache
of a real DVC project with two committed states (dvc.lock written by `dvc commit`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing import denylist
from tests import test_audit
from tests.conftest import REPO
from vasa.cli import main
from vasa.provenance import history as dvc_history
from vasa.provenance.audit import AUDIT_JSON, AUDIT_MD

STAGES = [  # stand-in stages: `dvc commit` records their outputs in dvc.lock and the cache without running them
    ["-n", "ingest", "-o", "data/ingest", "true"],
    ["-n", "preprocess", "-d", "data/ingest/manifest.parquet", "-o", "data/shards", "true"],
    ["-n", "export", "-d", "data/shards", "-o", "data/bundle", "true"],
]


def _sh(repo: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def _dvc(repo: Path, *args: str) -> str:
    return _sh(repo, sys.executable, "-m", "dvc", *args)


def _commit_state(repo: Path, message: str) -> str:
    _dvc(repo, "commit", "-f", "-q")
    _sh(repo, "git", "add", "dvc.yaml", "dvc.lock", "data/.gitignore")
    _sh(repo, "git", "commit", "-q", "-m", message)
    return _sh(repo, "git", "rev-parse", "HEAD").strip()


pytestmark = pytest.mark.slow  # ~15 dvc/git commands: ~40 s on the shared 2-core machine


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict, str, str]:
    """A git + DVC project whose first commit trained on bob's clip and whose second did not (built once:
    the last test removes files from its cache)."""
    repo = tmp_path_factory.mktemp("history") / "project"
    repo.mkdir()
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.name", "vasa-test")
    _sh(repo, "git", "config", "user.email", "vasa-test@localhost")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    (repo / "data").mkdir()
    paths = test_audit.write_inputs(repo / "data")
    (repo / "data" / "dvc.lock").unlink()  # write_inputs' stand-in lock; the project's own is at the root
    for stage in STAGES:
        _dvc(repo, "stage", "add", *stage)
    first = _commit_state(repo, "bundle trained with bob")
    for folder in ("ingest", "shards", "bundle"):
        subprocess.run(["rm", "-rf", str(repo / "data" / folder)], check=True)
    clips = test_audit.CLIPS
    test_audit.CLIPS = {c: v for c, v in clips.items() if v[0] != "bob"}
    try:
        paths = test_audit.write_inputs(repo / "data")
    finally:
        test_audit.CLIPS = clips
    (repo / "data" / "dvc.lock").unlink()
    second = _commit_state(repo, "bundle without bob")
    return repo, paths, first, second


def test_history_names_the_earlier_bundle_that_held_the_speaker(project, tmp_path):
    repo, paths, first, second = project
    listed = tmp_path / "denylist.csv"
    requests = [
        denylist.Request("speaker", "bob", "asked by bob", "2026-11-21"),
        denylist.Request("speaker", "cat", "asked by cat", "2026-11-21"),
    ]
    denylist.write(listed, denylist.Denylist(tuple(requests)))
    args = ["--target", str(paths["bundle"]), "--shards", str(paths["shards"]), "--manifest", str(paths["manifest"])]
    args += ["--denylist", str(listed), "--history", str(repo), "--out", str(tmp_path / "audit")]
    assert main(["--params", str(REPO / "params.yaml"), "audit", *args]) == 2  # cat is still in the bundle
    summary = json.loads((tmp_path / "audit" / AUDIT_JSON).read_text())
    assert [(r["id"], r["status"]) for r in summary["takedown"]] == [("bob", "absent"), ("cat", "PRESENT")]
    history = summary["takedown_history"]
    assert [b["commits"] for b in history] == [[second], [first]]  # newest first
    assert [(r["id"], r["status"], r["samples"]) for r in history[0]["requests"]] == [
        ("bob", "absent", 0),
        ("cat", "contained", 1),
    ]
    assert [(r["id"], r["status"], r["samples"]) for r in history[1]["requests"]] == [
        ("bob", "contained", 1),  # b0's one segment; b1 never reached the shards
        ("cat", "contained", 1),
    ]
    lock = dvc_history.lock_at(repo, first)
    assert history[1]["bundle_md5"] == dvc_history.path_md5(lock, "data/bundle")
    report = (tmp_path / "audit" / AUDIT_MD).read_text()
    assert "## Earlier bundles" in report and "| contained (1) | contained (1) |" in report


def test_history_says_what_the_cache_no_longer_holds(project):
    repo, _, first, _ = project
    lock = dvc_history.lock_at(repo, first)
    request = denylist.Request("speaker", "bob", "asked", "2026-11-21")
    bob_tar = next(n for n in dvc_history.dir_listing(repo, dvc_history.path_md5(lock, "data/shards")) if "tar" in n)
    md5 = dvc_history.dir_listing(repo, dvc_history.path_md5(lock, "data/shards"))[bob_tar]
    dvc_history.cache_file(repo, md5).unlink()  # a shard gone from the cache (gc'd, never fetched)
    found = dvc_history.takedown_history(repo, [request], "data/bundle", "data/shards", "data/ingest/manifest.parquet")
    assert found[1]["requests"][0]["status"] == "manifest only"
    manifest = dvc_history.file_at(repo, lock, "data/ingest/manifest.parquet")
    manifest.unlink()
    found = dvc_history.takedown_history(repo, [request], "data/bundle", "data/shards", "data/ingest/manifest.parquet")
    assert found[1]["requests"][0]["status"] == "unknown"
    assert dvc_history.file_at(repo, lock, "data/ingest/manifest.parquet") is None
