"""A takedown reaches the data: `vasa takedown` of one sample speaker, then ingest marks the speaker's
manifest rows `taken_down`, and preprocess leaves them out of the shards (also from a manifest written
before the request), drops their cached outcomes, and leaves the other speaker's shards byte-identical.

The clips' media-derived outcomes are synthesised into the cache (as test_incremental does), so the
test is about the takedown path, not FaceMesh.
"""

from __future__ import annotations

import hashlib
import json
import tarfile

import pandas as pd
import pytest

from flows.ingest import MANIFEST_NAME
from flows.ingest import run as run_ingest
from flows.preprocess import run as run_preprocess
from preprocessing import cache, denylist, schema
from preprocessing.ingest import manifest
from preprocessing.shards import Sample
from tests.conftest import FakeOutcome
from vasa.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


def _seed_cache(rows: list[dict], cfg, cache_dir) -> None:
    code = cache.code_digest()
    for row in rows:
        key = f"{row['key']}_00000"
        members = {schema.JSON: json.dumps({"key": key}).encode(), schema.POSE: row["sha256"].encode()}
        outcome = FakeOutcome(samples=[Sample(key, members, 25, 1.0)])
        cache.store(cache_dir, row["key"], cache.input_digest(row, cfg, code), outcome)


def _speakers(path) -> set[str]:
    with tarfile.open(path) as tar:
        return {
            json.loads(tar.extractfile(m).read())["provenance"]["speaker_id"] for m in tar if m.name.endswith(".json")
        }


def _tars(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")}


def test_takedown_of_a_speaker_reaches_manifest_shards_and_cache(params, prefect_harness, sample_corpus, tmp_path):
    cfg = params.preprocess.replace(runner=params.preprocess.runner.model_dump() | {"kind": "threads"})
    ingest_cfg = params.ingest.replace(sources=["sample"])
    ingest_dir, out, cache_dir = tmp_path / "ingest", tmp_path / "shards", tmp_path / "cache"
    deny = tmp_path / "takedown" / "denylist.csv"
    run_ingest(ingest_cfg, ingest_dir, sample_dir=sample_corpus, denylist_path=deny)  # no list yet: nothing covered
    manifest_path = ingest_dir / MANIFEST_NAME
    rows = manifest.read_manifest(manifest_path)
    assert {r["status"] for r in rows} == {manifest.OK} and {r["speaker_id"] for r in rows} == {
        "astronaut",
        "grace_hopper",
    }
    _seed_cache(rows, cfg, cache_dir)
    run_preprocess(cfg, manifest_path, out, cache_dir, denylist_path=deny)
    before = _tars(out)
    only_grace = {n for n in before if _speakers(out / n) == {"grace_hopper"}}
    assert only_grace and len(only_grace) < len(before)

    argv = ["takedown", "--speaker", "astronaut", "--reason", "request by the rights holder", "--date", "2026-11-22"]
    assert main([*argv, "--denylist", str(deny)]) == 0
    assert denylist.load(deny).requests == (
        denylist.Request("speaker", "astronaut", "request by the rights holder", "2026-11-22"),
    )
    astronaut = [r for r in rows if r["speaker_id"] == "astronaut"]

    # Preprocess first, from the manifest written before the request: the denylist is checked there too.
    summary = run_preprocess(cfg, manifest_path, out, cache_dir, denylist_path=deny)
    after = _tars(out)
    assert {n: after[n] for n in only_grace} == {n: before[n] for n in only_grace}  # byte-identical
    assert all(_speakers(out / n) == {"grace_hopper"} for n in after)
    assert summary["splits"]["train"]["samples"] == len(rows) - len(astronaut)
    failures = pd.read_parquet(out / schema.FAILURES_FILE)
    assert sorted(failures["clip_id"]) == sorted(r["clip_id"] for r in astronaut)
    assert set(failures["reason"]) == {denylist.TAKEN_DOWN}
    assert all("request by the rights holder" in d for d in failures["detail"])
    for row in astronaut:  # cached outcomes dropped, from the files and from the records table
        assert not any(p.exists() for p in cache.paths(cache_dir, row["key"]))
        assert row["key"] not in cache.read_records(cache_dir)["key"].to_pylist()

    # Ingest with the request: the speaker's rows are marked, never probed again.
    counts = run_ingest(ingest_cfg, ingest_dir, sample_dir=sample_corpus, denylist_path=deny)
    assert counts == {manifest.OK: len(rows) - len(astronaut), denylist.TAKEN_DOWN: len(astronaut)}
    marked = {r["clip_id"]: r for r in manifest.read_manifest(manifest_path)}
    for row in astronaut:
        assert marked[row["clip_id"]]["status"] == denylist.TAKEN_DOWN
        assert "takedown of speaker astronaut (2026-11-22)" in marked[row["clip_id"]]["error"]
    summary = run_preprocess(cfg, manifest_path, out, cache_dir, denylist_path=deny)
    assert summary["assembled"] == 0 and _tars(out) == after
