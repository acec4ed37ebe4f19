"""Incremental preprocess at scale : key-range shards, and decisions from records alone.

Synthetic clips (small fake members, cached as `process_clip` would cache them) stand in for
processed media, so these tests measure the planner and the writer, never FaceMesh.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import pytest

from flows.preprocess import run as run_preprocess
from preprocessing import cache, schema, shards, writer
from preprocessing.ingest import manifest
from preprocessing.shards import Sample
from tests.conftest import FakeOutcome


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        manifest.new_row(
            f"local:{seed}/{i}.mp4",
            "local",
            sha256=hashlib.sha256(f"{seed}/{i}".encode()).hexdigest(),
            speaker_id=f"spk{rng.randrange(50)}",
            licence="CC0",
            media_path=f"/media/{seed}/{i}.mp4",
        )
        for i in range(n)
    ]


def _outcome(row: dict) -> FakeOutcome:
    key = f"{row['key']}_00000"
    members = {schema.JSON: json.dumps({"key": key, "n_frames": 25}).encode(), schema.POSE: b"pose:" + key.encode()}
    return FakeOutcome(samples=[Sample(key, members, 25, 1.0)])


def _cache(rows: list[dict], cfg, cache_dir: Path) -> dict[str, dict]:
    code = cache.code_digest()
    return {r["key"]: cache.store(cache_dir, r["key"], cache.input_digest(r, cfg, code), _outcome(r)) for r in rows}


def _write(cfg, rows: list[dict], records: dict[str, dict], cache_dir: Path, out: Path, sha: str) -> dict:
    table, records = manifest.to_table(rows), cache.records_table(records.values())
    return writer.write_outputs(cfg, table, records, cache_dir, out, sha)


def _tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")}


def _cfg(params, digits: int = 1, per_shard: int = 16):
    runner = params.preprocess.runner.model_dump() | {"kind": "threads", "workers": 2}
    return params.preprocess.replace(
        shards={"bucket_hex_digits": digits, "max_clips_per_shard": per_shard}, runner=runner
    )


# --- the planner ----------------------------------------------------------------------------------


def test_plan_is_a_trie_of_key_ranges(params):
    cfg = _cfg(params, digits=1, per_shard=8).shards
    keys = [hashlib.sha1(str(i).encode()).hexdigest()[:16] + "_00000" for i in range(500)]
    plan = shards.plan_shards(keys, cfg, "train")
    assert shards.plan_shards(reversed(keys), cfg, "train") == plan  # a function of the key set
    assert sorted(k for ks in plan.values() for k in ks) == sorted(keys)
    assert all(0 < len(ks) <= 8 for ks in plan.values())
    assert all(writer.SHARD_NAME.match(f"{name}.tar") for name in plan)
    for name, ks in plan.items():  # every shard is one key prefix (its range), parts only for long clips
        prefix = shards.shard_prefix(name)
        assert len(prefix) >= 1 and all(k.startswith(prefix) for k in ks) and name.endswith("-0000")
    prefixes = [shards.shard_prefix(n) for n in plan]
    assert not any(a != b and b.startswith(a) for a in prefixes for b in prefixes)  # disjoint ranges
    lookup = shards.ShardLookup(plan)
    for name, ks in plan.items():
        assert all(lookup(k) == name for k in ks)
        assert lookup(shards.shard_prefix(name) + "0" * 20) == name  # a failed key of the range, not planned
    assert lookup("g") is None  # a range no shard covers


def test_a_clip_longer_than_a_shard_is_cut_into_parts(params):
    cfg = _cfg(params, digits=0, per_shard=4).shards
    keys = [f"{'a' * 16}_{start:05d}" for start in range(10)] + ["b" * 16 + "_00000"]
    plan = shards.plan_shards(keys, cfg, "val")
    assert list(plan) == ["val-" + "a" * 16 + f"-{p:04d}" for p in range(3)] + ["val-b-0000"]
    lookup = shards.ShardLookup(plan)
    assert [lookup(k) for k in keys] == [n for n, ks in plan.items() for _ in ks]


# --- the writer: +1 % clips rewrites only their ranges; decided without reading --------------------


def test_one_percent_new_clips_rewrite_only_the_shards_of_their_ranges(params, tmp_path, monkeypatch):
    cfg = _cfg(params, digits=1, per_shard=16)
    old, new = _rows(2000, seed=1), _rows(20, seed=2)
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    records = _cache(old + new, cfg, cache_dir)
    _write(cfg, old, {r["key"]: records[r["key"]] for r in old}, cache_dir, out, "a" * 64)
    before = _tar_digests(out)
    _write(cfg, old + new, records, cache_dir, out, "b" * 64)
    after = _tar_digests(out)
    changed = {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
    layout = shards.plan_shards([s["key"] for r in records.values() for s in r["samples"]], cfg.shards, "train")
    lookup = shards.ShardLookup(layout)
    holding_new = {f"{lookup(r['key'] + '_00000')}.tar" for r in new}
    # Changed: exactly the shards the new keys fall in, plus (when one overflowed) the shard they split.
    assert holding_new <= changed
    split_away = changed - holding_new
    assert split_away <= set(before) - set(after)
    assert all(any(n.startswith(f"train-{shards.shard_prefix(p.removesuffix('.tar'))}") for p in split_away)
               for n in changed - holding_new - split_away)  # fmt: skip
    assert len(changed) <= 2 * len(new) and len(changed) < len(after) / 4, (len(changed), len(after))
    # A no-op over the same inputs opens no tar at all (cache or shards): decided from records.
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    plan = writer.plan_outputs(cfg, manifest.to_table(old + new), cache.records_table(records.values()), out)
    assert plan.jobs == [] and plan.stats_only == {}
    _write(cfg, old + new, records, cache_dir, out, "b" * 64)
    assert opened == [] and _tar_digests(out) == after


def test_incremental_output_equals_a_cold_build(params, tmp_path):
    cfg = _cfg(params, digits=1, per_shard=8)
    old, new = _rows(300, seed=3), _rows(30, seed=4)
    cache_dir = tmp_path / "cache"
    records = _cache(old + new, cfg, cache_dir)
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    _write(cfg, old, {r["key"]: records[r["key"]] for r in old}, cache_dir, warm, "c" * 64)
    _write(cfg, old + new, records, cache_dir, warm, "c" * 64)
    _write(cfg, old + new, records, cache_dir, cold, "c" * 64)
    files = sorted(p.name for p in cold.iterdir())
    assert sorted(p.name for p in warm.iterdir()) == files
    assert all((warm / n).read_bytes() == (cold / n).read_bytes() for n in files)


def test_records_table_round_trips(tmp_path, params):
    cfg = _cfg(params)
    rows = _rows(5, seed=5)
    records = _cache(rows, cfg, tmp_path)
    records["x" * 16] = {"key": "x" * 16, "transient": True, "samples": [], "failures": []}
    cache.write_records(tmp_path, cache.records_table(reversed(records.values())))
    table = cache.read_records(tmp_path)
    assert table["key"].to_pylist() == sorted(k for k in records if k != "x" * 16)  # sorted, transient left out
    assert cache.record_dicts(table) == {k: r for k, r in records.items() if k != "x" * 16}
    (tmp_path / cache.RECORDS_FILE).write_bytes(b"not parquet")
    assert cache.read_records(tmp_path).num_rows == 0


# --- the flow: a no-op run opens no cached tar ----------------------------------------------------


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.mark.slow
def test_flow_no_op_reads_only_records_and_new_clips_only_their_shards(params, prefect_harness, tmp_path, monkeypatch):
    cfg = _cfg(params, digits=1, per_shard=8)
    old, new = _rows(400, seed=6), _rows(4, seed=7)
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    _cache(old + new, cfg, cache_dir)  # every clip's outcome is cached: nothing runs FaceMesh
    first = tmp_path / "first.parquet"
    manifest.write_manifest(first, old)
    summary = run_preprocess(cfg, first, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (0, 400) and (cache_dir / cache.RECORDS_FILE).is_file()
    before = _tar_digests(out)
    loads = []
    real_load, real_lookup = cache.load_samples, cache.lookup
    monkeypatch.setattr(cache, "load_samples", lambda *a: loads.append(a[1]) or real_load(*a))
    monkeypatch.setattr(cache, "lookup", lambda *a: pytest.fail("a per-clip JSON record was read"))
    summary = run_preprocess(cfg, first, out, cache_dir)
    assert summary["assembled"] == 0 and loads == [] and _tar_digests(out) == before
    both = tmp_path / "both.parquet"
    manifest.write_manifest(both, old + new)
    monkeypatch.setattr(cache, "lookup", real_lookup)  # the new clips' records: not in the table yet
    summary = run_preprocess(cfg, both, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (0, 404)
    after = _tar_digests(out)
    changed = {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
    assert 0 < summary["assembled"] <= 2 * len(new) and len(changed) <= 2 * len(new)
    assert set(loads) <= {k for n in changed for k in _clips_of(out / n)}
    assert len(set(loads)) < 8 * 2 * len(new)
    # Prefect links no upstream runs by recycled object ids (its id()-only tracking of plain dicts),
    # so task runs and their events stay small in its database.
    runs, linked = task_runs_with_inputs("assemble_shards")
    assert runs and not linked, linked


def task_runs_with_inputs(name: str) -> tuple[int, list[dict]]:
    """(how many task runs of the test server are named `name-...`, the `task_inputs` of those that
    list an upstream run). The flow's tasks have none: each gets its work in full."""
    from prefect import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
    runs = [r for r in runs if r.name.startswith(f"{name}-")]
    return len(runs), [r.task_inputs for r in runs if any(r.task_inputs.values())]


def _clips_of(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with tarfile.open(path) as tar:
        return {info.name.split("_")[0] for info in tar}


def test_batches_fill_every_worker_when_few_clips_and_stay_bounded_when_many(params):
    from flows.preprocess import WAVE_PER_WORKER, batch_size

    runner = params.preprocess.runner.replace(workers=2, clips_per_task=64)
    assert WAVE_PER_WORKER * 2 == 8
    assert [batch_size(runner, n) for n in (0, 1, 8, 9, 100, 512, 10**6)] == [1, 1, 1, 2, 13, 64, 64]
    assert batch_size(runner.replace(clips_per_task=4), 10**6) == 4
