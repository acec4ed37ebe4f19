"""Stage `preprocess`: manifest -> deterministic, incremental webdataset shards whose provenance
never goes stale, and an output folder where nothing the stage did not make is ever removed.

The fast tests exercise the library (cache, writer) on synthetic samples; the slow ones run the
flow on the 8-clip sample corpus, processed once per module (`cold`) and then reused: every later
run works on a copy of that cache, so each test pays only for the clips it really processes.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from flows.ingest import MANIFEST_NAME
from flows.ingest import run as run_ingest
from flows.preprocess import run as run_preprocess
from preprocessing import cache, schema, writer
from preprocessing.ingest import manifest
from preprocessing.media import write_mp4
from preprocessing.sample.portraits import prepare_portrait
from preprocessing.shards import Sample
from tests.conftest import REPO, FakeOutcome
from tests.test_incremental import task_runs_with_inputs

slow = pytest.mark.slow
real_code_digest = cache.code_digest  # the slow tests pin cache.code_digest (see fixed_code_digest)


# --- fast: the library on synthetic data -------------------------------------------------------


def _row(clip_id: str, **fields) -> dict:
    return manifest.new_row(clip_id, "local", **({"sha256": "ab" * 32, "speaker_id": "spk", "licence": "CC0"} | fields))


def _sample(row: dict, start: int = 0, frames: int = 30) -> Sample:
    key = f"{row['key']}_{start:05d}"
    meta = {"key": key, "n_frames": frames, "provenance": {"licence": "stale"}, "split": "stale"}
    members = {schema.JSON: json.dumps(meta).encode(), schema.POSE: b"pose-bytes-" + key.encode()}
    return Sample(key, members, frames, frames / 25)


def _store(cache_dir: Path, row: dict, outcome: FakeOutcome) -> dict:
    return cache.store(cache_dir, row["key"], "digest-" + row["key"], outcome)


def test_code_digest_covers_every_module_process_imports():
    """The code digest cannot go stale: every preprocessing module that process.py imports, directly
    or through another module, is hashed (a new module is covered without editing a list)."""
    root = REPO / "preprocessing"
    seen, todo = set(), ["process"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "preprocessing":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("preprocessing."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("preprocessing.")]
            todo += [n for n in names if (root / f"{n}.py").is_file()]
            assert not any((root / n).is_dir() for n in names), f"{name}.py imports a package {names}"
    hashed = {p.stem for p in cache.code_modules() if p.suffix == ".py"}
    assert {"process", "decode", "face", "pose", "audio", "shards", "schema"} <= seen
    assert seen <= hashed, f"modules shaping samples but not in the code digest: {sorted(seen - hashed)}"
    assert "writer" not in hashed  # the writer reads the cache; changing it must not invalidate it
    assert any(p.suffix == ".npz" for p in cache.code_modules())  # the face template


def test_layering_config_and_library_import_without_the_entry_points():
    """vasa.core.config is the ground floor (no CLI, flows or Prefect); the cache and writer are library
    code that flows only wire (no Prefect, no MediaPipe)."""
    code = (
        "import sys, vasa.core.config; bad = {'vasa.cli', 'flows', 'prefect'} & set(sys.modules); assert not bad, bad\n"
        "import preprocessing.cache, preprocessing.writer\n"
        "bad = {'prefect', 'flows', 'mediapipe', 'preprocessing.process'} & set(sys.modules); assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_code_digest_follows_package_versions(monkeypatch):
    before = real_code_digest()
    assert set(cache.package_versions()) == set(cache.VERSIONED_PACKAGES)
    real = cache.metadata.version

    def version(name: str) -> str:
        return "9.9.9" if name == "opencv-contrib-python" else real(name)

    monkeypatch.setattr(cache.metadata, "version", version)
    assert real_code_digest() != before


def test_input_digest_ignores_provenance_and_sharding(params):
    cfg = params.preprocess
    row = _row("local:a.mp4", av_offset=0)
    code = real_code_digest()
    base = cache.input_digest(row, cfg, code)
    moved = row | {"licence": "other", "split": "test", "speaker_id": "x", "source_url": "u", "media_path": "/m"}
    assert cache.input_digest(moved, cfg, code) == base
    resharded = cfg.replace(shards=cfg.shards.model_dump() | {"max_clips_per_shard": 3})
    assert cache.input_digest(row, resharded, code) == base
    assert cache.input_digest(row | {"sha256": "cd" * 32}, cfg, code) != base
    assert cache.input_digest(row | {"av_offset": 4}, cfg, code) != base
    assert cache.input_digest(row, cfg.replace(crop_size=cfg.crop_size + 2), code) != base
    assert cache.input_digest(row, cfg, code + "x") != base


def test_cache_stores_media_results_not_environment_failures(tmp_path):
    row, broken = _row("local:a.mp4"), _row("local:b.mp4")
    samples = [_sample(row, 0), _sample(row, 40)]
    record = _store(tmp_path, row, FakeOutcome(samples=samples))
    assert cache.lookup(tmp_path, row["key"], "digest-" + row["key"]) == record
    assert cache.lookup(tmp_path, row["key"], "other digest") is None
    assert list(cache.load_samples(tmp_path, row["key"], record)) == samples
    # A failure caused by the environment (missing file, permission, memory) is reported, not cached.
    failure = {"clip_id": broken["clip_id"], "key": broken["key"], "status": "error", "reason": "r", "detail": "d"}
    transient = _store(tmp_path, broken, FakeOutcome(samples=[_sample(broken)], failures=[failure], transient=True))
    assert transient["transient"] and transient["samples"] == [] and transient["failures"][0]["reason"] == "r"
    assert cache.lookup(tmp_path, broken["key"], "digest-" + broken["key"]) is None
    assert not any(p.name.startswith(broken["key"]) for p in tmp_path.rglob("*"))
    # A damaged entry (truncated tar) is a cache miss, so the clip is processed again.
    tar_path, _ = cache.paths(tmp_path, row["key"])
    tar_path.write_bytes(tar_path.read_bytes()[:1000])
    assert cache.lookup(tmp_path, row["key"], "digest-" + row["key"]) is None


def test_join_replaces_stale_provenance_and_checks_ownership():
    row = _row("local:a.mp4", split="val", licence="CC-BY-4.0")
    joined = writer.join_sample(_sample(row), row)
    meta = json.loads(joined.members[schema.JSON])
    assert meta["split"] == "val" and meta["provenance"] == writer.provenance(row)
    assert set(meta["provenance"]) == set(schema.PROVENANCE_COLUMNS) and meta["provenance"]["licence"] == "CC-BY-4.0"
    assert joined.members[schema.POSE] == _sample(row).members[schema.POSE]
    with pytest.raises(cache.CacheError, match="not a segment"):
        writer.join_sample(_sample(_row("local:other.mp4")), row)


def _write(cfg, rows, records, cache_dir, out, allow_empty=False):
    table, records = manifest.to_table(rows), cache.records_table(records.values())
    return writer.write_outputs(cfg, table, records, cache_dir, out, "f" * 64, allow_empty=allow_empty)


def test_writer_splits_owns_and_refuses_to_empty(params, tmp_path):
    cfg = params.preprocess.replace(shards={"bucket_hex_digits": 0, "max_clips_per_shard": 64})
    rows = [
        _row("local:t.mp4", split="train"),
        _row("local:v.mp4", split="val"),
        _row("local:x.mp4", split="test"),
        _row("local:bad.mp4", split="test", status=manifest.UNREADABLE, error="moov atom not found"),
        _row("local:odd.mp4", split="holiday"),
    ]
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    records = {r["key"]: _store(cache_dir, r, FakeOutcome(samples=[_sample(r)])) for r in rows[:3]}
    out.mkdir()
    (out / "my_backup.tar").write_bytes(b"not ours")
    (out / "train-0-0000.tar.partial").write_bytes(b"left by a killed run")
    index = _write(cfg, rows, records, cache_dir, out)
    assert index["dataset"]["splits"] == ["train", "val", "test"]
    assert tuple(index["dataset"]) == schema.DATASET_KEYS
    for split in ("train", "val", "test"):
        (entry,) = index["splits"][split]["shards"]
        assert entry["shard"] == f"{split}-all-0000.tar"
        (sample,) = wds.WebDataset(str(out / entry["shard"]), shardshuffle=False)
        assert json.loads(sample["json"])["split"] == split
    failures = pq.read_table(out / schema.FAILURES_FILE).to_pylist()
    assert [(f["clip_id"], f["reason"], f["split"]) for f in sorted(failures, key=lambda f: f["clip_id"])] == [
        ("local:bad.mp4", manifest.UNREADABLE, "test"),
        ("local:odd.mp4", writer.UNKNOWN_SPLIT, "holiday"),
    ]
    assert json.loads((out / "test-all-0000.stats.json").read_text())["failed_clips"] == 1
    assert not (out / "train-0-0000.tar.partial").exists()
    # Same inputs again: byte-identical index and failures, nothing rewritten.
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    _write(cfg, list(reversed(rows)), records, cache_dir, out)
    again = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert {n: b for n, (b, _) in again.items()} == {n: b for n, (b, _) in first.items()}
    assert all(again[n][1] == first[n][1] for n in first if n.endswith(".tar"))
    # No samples left: refused, and OUT is untouched.
    none = [r | {"status": manifest.UNREADABLE, "error": "gone"} for r in rows]
    with pytest.raises(writer.NoSamplesError, match=r"unreadable_media': 5"):
        _write(cfg, none, {}, cache_dir, out)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == again
    # With allow_empty: the stage removes the shards it listed, and only those.
    index = _write(cfg, none, {}, cache_dir, out, allow_empty=True)
    assert index["splits"] == {} and index["dataset"]["splits"] == []
    assert sorted(p.name for p in out.iterdir()) == [schema.FAILURES_FILE, schema.INDEX_FILE, "my_backup.tar"]


def test_owned_files_come_only_from_the_index_and_the_shard_pattern(tmp_path):
    listed = ["train-a-0000.tar", "val-all-0003.tar", "my_backup.tar", "../escape-0-0000.tar", "test-0-0000.tar.bak"]
    index = {"splits": {"train": {"shards": [{"shard": name} for name in listed]}, "val": "junk"}}
    (tmp_path / schema.INDEX_FILE).write_text(json.dumps(index))
    assert writer.owned_files(tmp_path) == {
        tmp_path / n
        for n in ("train-a-0000.tar", "train-a-0000.stats.json", "val-all-0003.tar", "val-all-0003.stats.json")
    }
    (tmp_path / schema.INDEX_FILE).write_text("[1, 2]")
    assert writer.owned_files(tmp_path) == set()


def test_failures_parquet_is_byte_stable_and_atomic(tmp_path, monkeypatch):
    rows = [
        {"clip_id": f"c{i}", "key": f"{i % 3:x}", "status": "rejected", "reason": r, "detail": "d", "split": "train"}
        for i, r in enumerate(["no_face", "too_short", "no_face", "upscaled"])
    ]
    writer.write_failures(tmp_path / "a.parquet", rows)
    writer.write_failures(tmp_path / "b.parquet", list(reversed(rows)))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert pq.read_schema(tmp_path / "a.parquet").names == list(schema.FAILURE_COLUMNS)
    before = (tmp_path / "a.parquet").read_bytes()

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(writer.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        writer.write_failures(tmp_path / "a.parquet", rows[:1])
    assert (tmp_path / "a.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]


def test_missing_manifest_fails_before_any_flow_runs(params, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_backup.tar").write_bytes(b"x")
    with pytest.raises(writer.ManifestNotFoundError, match="manifst.parquet"):
        run_preprocess(params.preprocess, tmp_path / "manifst.parquet", out, tmp_path / "cache")
    assert [p.name for p in out.iterdir()] == ["my_backup.tar"] and not (tmp_path / "cache").exists()


# --- slow: the flow on the sample corpus -------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="module")
def sample_manifest(prefect_harness, fixed_code_digest, params, sample_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest")
    run_ingest(params.ingest.replace(sources=["sample"]), out, sample_dir=sample_corpus)
    return out / MANIFEST_NAME


def _cfg(params, **runner):
    runner = params.preprocess.runner.model_dump() | {"kind": "threads"} | runner
    return params.preprocess.replace(runner=runner)


@dataclass(frozen=True)
class Run:
    out: Path
    cache: Path
    summary: dict


@pytest.fixture(scope="module")
def fixed_code_digest():
    """The code digest as it is when the module starts, for every flow run of the module: the cache
    tests below are about re-use under fixed code, and must not see a module edited while they run
    (the digest itself is tested above)."""
    with pytest.MonkeyPatch.context() as patch:
        digest = real_code_digest()
        patch.setattr(cache, "code_digest", lambda: digest)
        yield


@pytest.fixture(scope="module")
def cold(params, sample_manifest, tmp_path_factory) -> Run:
    """The sample corpus preprocessed once from an empty cache (threads runner)."""
    root = tmp_path_factory.mktemp("cold")
    summary = run_preprocess(_cfg(params), sample_manifest, root / "out", root / "cache")
    return Run(root / "out", root / "cache", summary)


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder: shards, stats, index.json, failures.parquet."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _stamps(folder: Path, pattern: str) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob(pattern)}


def _warm_cache(run: Run, tmp_path: Path, drop: list[dict] = ()) -> Path:
    """A copy of a run's cache (mtimes kept), without the records of the `drop` rows."""
    copy = tmp_path / "cache"
    shutil.copytree(run.cache, copy)
    for row in drop:
        for path in cache.paths(copy, row["key"]):
            path.unlink()
    return copy


@slow
def test_sample_corpus_shards_are_complete(params, sample_manifest, cold):
    cfg = _cfg(params)
    assert cold.summary["processed"] == 8 and cold.summary["cached"] == 0
    runs, linked = task_runs_with_inputs("process_batch")  # clips go as an Arrow batch, not walked
    assert runs and not linked, linked
    assert cold.summary["splits"]["train"]["samples"] == 8 and cold.summary["failures_by_reason"] == {}
    index = json.loads((cold.out / schema.INDEX_FILE).read_text())
    assert index == {k: v for k, v in cold.summary.items() if k not in ("processed", "cached", "assembled")}
    dataset = index["dataset"]
    assert dataset["schema_version"] == schema.SCHEMA_VERSION and dataset["crop_size"] == cfg.crop_size
    assert dataset["crop_mode"] == cfg.crop.mode and dataset["fps"] == 25 and dataset["splits"] == ["train"]
    assert dataset["manifest_sha256"] == __import__("hashlib").sha256(sample_manifest.read_bytes()).hexdigest()
    listed = {e["shard"]: e for e in index["splits"]["train"]["shards"]}
    assert set(listed) == {p.name for p in cold.out.glob("*.tar")}
    samples = _samples(cold.out)
    assert len(samples) == 8
    k = dataset["mel_frames_per_video_frame"]
    assert k == 4  # 16 kHz / 25 fps / hop 160
    rows = {row["clip_id"]: row for row in manifest.read_manifest(sample_manifest)}
    for sample in samples:
        meta = json.loads(sample["json"])
        n = meta["n_frames"]
        assert np.load(io.BytesIO(sample["mel.npy"])).shape == (n * k, cfg.audio.n_mels)
        pose = np.load(io.BytesIO(sample["pose.npy"]))
        assert pose.shape == (n, 7) and np.isfinite(pose).all()
        assert np.load(io.BytesIO(sample["landmarks.npy"])).dtype == np.float16
        row = rows[meta["provenance"]["clip_id"]]
        assert meta["provenance"] == {c: row[c] for c in schema.PROVENANCE_COLUMNS} and meta["split"] == "train"
    for name, entry in listed.items():
        stats = json.loads((cold.out / name.replace(".tar", schema.STATS_SUFFIX)).read_text())
        assert (stats["samples"], stats["frames"]) == (entry["samples"], entry["frames"])
    assert pq.read_table(cold.out / schema.FAILURES_FILE).num_rows == 0


@slow
def test_two_cold_runs_are_byte_identical_serial_and_dask(params, sample_manifest, cold, tmp_path):
    """Shards, stats, index.json and failures.parquet: same bytes from an empty cache, whatever the
    runner (threads vs a 2-worker Dask LocalCluster)."""
    dask = _cfg(params, kind="dask", workers=2)
    summary = run_preprocess(dask, sample_manifest, tmp_path / "out", tmp_path / "cache")
    assert summary["processed"] == 8
    assert _files(tmp_path / "out") == _files(cold.out)


@slow
def test_provenance_change_on_a_warm_cache_equals_a_cold_run(params, sample_manifest, cold, tmp_path):
    """Issue 7 section 3: change a speaker's licence and split in the manifest; the warm cache is
    used (nothing re-processed) and the output equals a cold run's byte for byte."""
    rows = manifest.read_manifest(sample_manifest)
    moved = "grace_hopper"
    changed = [
        r | {"licence": "CC-BY-4.0", "split": "test"} if r["speaker_id"] == moved else r
        for r in rows
        if r["clip_id"].endswith(("_000", "_001", "_002"))  # 6 of the 8 clips: a cheaper cold run
    ]
    assert {r["split"] for r in changed} == {"train", "test"}
    edited = tmp_path / "manifest.parquet"
    manifest.write_manifest(edited, changed)
    cfg = _cfg(params)
    warm = run_preprocess(cfg, edited, tmp_path / "warm", _warm_cache(cold, tmp_path))
    assert (warm["processed"], warm["cached"]) == (0, 6)
    fresh = run_preprocess(cfg, edited, tmp_path / "cold", tmp_path / "cold_cache")
    assert fresh["processed"] == 6
    assert _files(tmp_path / "warm") == _files(tmp_path / "cold")
    for shard in (tmp_path / "warm").glob("*.tar"):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["json"])
            split = shard.name.split("-")[0]
            assert meta["split"] == meta["provenance"]["split"] == split, shard.name
            assert (meta["provenance"]["speaker_id"] == moved) == (split == "test")
            assert meta["provenance"]["licence"] == ("CC-BY-4.0" if split == "test" else "public-domain")


def _params_file(params, tmp_path: Path, **runner) -> Path:
    """The session's params (not params.yaml as it is now) with runner changes, for a CLI run."""
    data = params.model_dump(mode="json")
    data["preprocess"]["runner"] |= runner
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@slow
def test_killed_run_resumes_from_the_cache_to_the_same_shards(params, sample_manifest, cold, tmp_path, monkeypatch):
    """A real `vasa preprocess` process is killed once some clips are cached; the re-run processes
    only the rest (the cached records are not rewritten) and gives the uninterrupted run's bytes."""
    params_file = _params_file(params, tmp_path, kind="threads", workers=2, clips_per_task=1)
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "vasa.cli", "--params", str(params_file), "preprocess"]
    command += ["--manifest", str(sample_manifest), "--out", str(out), "--cache", str(cache_dir)]
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    }
    # The subprocess digests the code as it is now; so does the resume below (fixed_code_digest would
    # differ only if a module was edited since the module started).
    digest = real_code_digest()
    monkeypatch.setattr(cache, "code_digest", lambda: digest)
    log = (tmp_path / "log.txt").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while len(list(cache_dir.glob("*/*.json"))) < 2:
            assert process.poll() is None, f"finished before it could be killed: {(tmp_path / 'log.txt').read_text()}"
            assert time.monotonic() < deadline, "no clip cached in 10 minutes"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = _stamps(cache_dir, "*/*")
    n_done = len(list(cache_dir.glob("*/*.json")))
    assert 2 <= n_done < 8, n_done
    assert not (out / schema.INDEX_FILE).exists()
    summary = run_preprocess(_cfg(params), sample_manifest, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (8 - n_done, n_done)
    after = _stamps(cache_dir, "*/*")
    assert {name: after[name] for name in done if name.endswith((".json", ".tar"))} == {
        name: stamp for name, stamp in done.items() if name.endswith((".json", ".tar"))
    }
    assert _files(out) == _files(cold.out)


@slow
def test_new_clips_rebuild_only_their_shards_from_the_cache(params, sample_manifest, cold, tmp_path):
    rows = manifest.read_manifest(sample_manifest)
    cache_dir = _warm_cache(cold, tmp_path, drop=rows[6:])
    first = tmp_path / "first.parquet"
    manifest.write_manifest(first, rows[:6])
    out, cfg = tmp_path / "out", _cfg(params)
    summary = run_preprocess(cfg, first, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (0, 6)
    before = _stamps(out, "*.*")
    summary = run_preprocess(cfg, sample_manifest, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (2, 6)
    after = _stamps(out, "*.*")
    digits = cfg.shards.bucket_hex_digits
    touched = {f"train-{row['key'][:digits]}" for row in rows[6:]}  # 8 clips: no range is split further

    def bucket(name: str) -> str:
        return "-".join(name.split("-")[:2])

    untouched = [n for n in before if n.endswith((".tar", ".stats.json")) and bucket(n) not in touched]
    assert untouched, "the test needs shards that the new clips do not fall in"
    assert {n: after[n] for n in untouched} == {n: before[n] for n in untouched}
    rewritten = {n for n in after if n.endswith(".tar") and after[n] != before.get(n)}
    assert {bucket(n) for n in rewritten} == touched
    assert _files(out) == _files(cold.out)


@slow
def test_zero_samples_are_refused_and_unrelated_files_survive(params, sample_manifest, cold, tmp_path):
    from vasa.cli import main

    out = tmp_path / "out"
    shutil.copytree(cold.out, out)
    (out / "my_backup.tar").write_bytes(b"a user's own file")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    rows = manifest.read_manifest(sample_manifest)
    broken = tmp_path / "broken.parquet"
    manifest.write_manifest(broken, [r | {"status": manifest.MISSING_MEDIA, "error": "gone"} for r in rows])
    params_file = _params_file(params, tmp_path, kind="threads")
    args = ["--params", str(params_file), "preprocess", "--manifest", str(broken), "--out", str(out)]
    args += ["--cache", str(cold.cache)]
    assert main(args) == 2
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert main([*args, "--allow-empty"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [schema.FAILURES_FILE, schema.INDEX_FILE, "my_backup.tar"]
    assert (out / "my_backup.tar").read_bytes() == b"a user's own file"
    assert pd.read_parquet(out / schema.FAILURES_FILE)["reason"].tolist() == [manifest.MISSING_MEDIA] * 8


@slow
def test_environment_failure_is_not_cached_and_heals_on_rerun(params, sample_manifest, cold, tmp_path):
    """Issue 8 section 2: a clip whose media is missing fails this run (recorded), is not cached, and
    lands once the file is back, with the bytes of an undisturbed run."""
    rows = manifest.read_manifest(sample_manifest)
    media = tmp_path / "media" / "clip.mp4"
    media.parent.mkdir()
    shutil.copy(rows[0]["media_path"], media)
    moved = tmp_path / "manifest.parquet"
    manifest.write_manifest(moved, [rows[0] | {"media_path": str(media)}, *rows[1:]])
    cache_dir, out, cfg = _warm_cache(cold, tmp_path, drop=rows[:1]), tmp_path / "out", _cfg(params)
    media.rename(media.with_suffix(".away"))
    summary = run_preprocess(cfg, moved, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (1, 7)
    (failure,) = pq.read_table(out / schema.FAILURES_FILE).to_pylist()
    assert failure["clip_id"] == rows[0]["clip_id"] and failure["split"] == rows[0]["split"]
    assert not any(p.exists() for p in cache.paths(cache_dir, rows[0]["key"]))
    media.with_suffix(".away").rename(media)
    summary = run_preprocess(cfg, moved, out, cache_dir)
    assert (summary["processed"], summary["cached"]) == (1, 7)
    assert pq.read_table(out / schema.FAILURES_FILE).num_rows == 0
    shards = {name: data for name, data in _files(out).items() if name.endswith((".tar", schema.STATS_SUFFIX))}
    assert shards == {name: data for name, data in _files(cold.out).items() if name in shards}
    assert set(shards) == {name for name in _files(cold.out) if name.endswith((".tar", schema.STATS_SUFFIX))}


def _two_faces(path: Path) -> None:
    faces = [prepare_portrait(name, 256).image for name in ("skimage_astronaut", "matplotlib_grace_hopper")]
    pair = np.concatenate(faces, axis=1)  # (256, 512, 3): two faces side by side
    frames = np.repeat(pair[None], 40, axis=0)
    write_mp4(path, frames, 25, np.zeros(40 * 640, np.float32), 16000)


@slow
def test_bad_inputs_are_recorded_and_good_clips_land(
    params, prefect_harness, fixed_code_digest, sample_corpus, tmp_path
):
    folder = tmp_path / "videos"
    folder.mkdir()
    good = sorted(sample_corpus.glob("*.mp4"))[0]
    shutil.copy(good, folder / "good.mp4")
    shutil.copy(sorted(sample_corpus.glob("*.mp4"))[-1], folder / "held.mp4")  # speaker "held": held out
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "zero.mp4").write_bytes(b"")
    write_mp4(folder / "no_audio.mp4", np.zeros((30, 64, 64, 3), np.uint8), 25)
    write_mp4(folder / "no_face.mp4", np.full((40, 128, 128, 3), 90, np.uint8), 25, np.zeros(40 * 640, np.float32))
    write_mp4(folder / "one_frame.mp4", np.full((1, 128, 128, 3), 90, np.uint8), 25, np.zeros(640, np.float32))
    _two_faces(folder / "two_faces.mp4")
    with __import__("av").open(str(folder / "audio_only.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = __import__("av").AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    # Speakers of files in the root are their stems: "held" and "no_face" are held out (split test).
    ingest = params.ingest.replace(sources=["local"], holdout_speakers=["held", "no_face"])
    run_ingest(ingest, tmp_path / "ingest", local_dir=folder)
    out = tmp_path / "shards"
    summary = run_preprocess(_cfg(params), tmp_path / "ingest" / MANIFEST_NAME, out, tmp_path / "cache")
    failures = pd.read_parquet(out / schema.FAILURES_FILE)
    by_clip = failures.set_index("clip_id")
    assert by_clip.loc["local:truncated.mp4", "reason"] == "unreadable_media"
    assert by_clip.loc["local:zero.mp4", "reason"] == "unreadable_media"
    assert by_clip.loc["local:no_audio.mp4", "reason"] == "missing_audio"
    assert by_clip.loc["local:audio_only.mp4", "reason"] == "no_video"
    assert by_clip.loc["local:no_face.mp4", "reason"] == "no_face"
    assert by_clip.loc["local:two_faces.mp4", "reason"] == "multiple_faces"
    assert by_clip.loc["local:one_frame.mp4", "reason"] == "too_short"
    assert sorted(failures["clip_id"]) == sorted(f"local:{n}" for n in (
        "truncated.mp4", "zero.mp4", "no_audio.mp4", "audio_only.mp4", "no_face.mp4", "two_faces.mp4", "one_frame.mp4"
    ))  # fmt: skip
    # The split is joined from the manifest into media-derived (cached) failures too.
    assert by_clip.loc["local:no_face.mp4", "split"] == "test"
    assert set(failures.loc[failures["clip_id"] != "local:no_face.mp4", "split"]) == {"train"}
    assert summary["splits"]["train"]["samples"] == 1 and summary["splits"]["test"]["samples"] == 1
    by_shard = {
        p.name: {json.loads(s["json"])["provenance"]["clip_id"] for s in wds.WebDataset(str(p), shardshuffle=False)}
        for p in out.glob("*.tar")
    }
    assert {c for name, ids in by_shard.items() if name.startswith("train-") for c in ids} == {"local:good.mp4"}
    assert {c for name, ids in by_shard.items() if name.startswith("test-") for c in ids} == {"local:held.mp4"}
    # Each split has one shard (one sample); it counts exactly the failures of its split and bucket.
    digits = params.preprocess.shards.bucket_hex_digits
    for split in ("train", "test"):
        (stats_path,) = out.glob(f"{split}-*{schema.STATS_SUFFIX}")
        bucket = stats_path.name.split("-")[1]
        mine = failures[(failures["split"] == split) & (failures["key"].str[:digits] == bucket)]
        stats = json.loads(stats_path.read_text())
        assert stats["failed_clips"] == len(mine)
        assert stats["failures_by_reason"] == dict(sorted(mine["reason"].value_counts().items()))


@slow
def test_real_fixtures_end_to_end(params, prefect_harness, fixtures_dir, tmp_path):
    run_ingest(params.ingest.replace(sources=["local"]), tmp_path / "ingest", local_dir=fixtures_dir)
    out = tmp_path / "shards"
    summary = run_preprocess(_cfg(params), tmp_path / "ingest" / MANIFEST_NAME, out, tmp_path / "cache")
    samples = _samples(out)
    clips = {json.loads(s["json"])["provenance"]["clip_id"] for s in samples}
    assert clips == {f"local:{p.name}" for p in fixtures_dir.glob("*.mp4")}, summary["failures_by_reason"]
    for sample in samples:
        meta = json.loads(sample["json"])
        rejected = sum(meta["frames_rejected"].get(r, 0) for r in ("no_face", "multiple_faces"))
        assert rejected <= 0.01 * (meta["n_frames"] + rejected), (
            meta["provenance"]["clip_id"],
            meta["frames_rejected"],
        )
        assert np.isfinite(np.load(io.BytesIO(sample["pose.npy"]))).all()
        assert np.isfinite(np.load(io.BytesIO(sample["gaze.npy"]))).all()
        assert np.load(io.BytesIO(sample["mel.npy"])).shape[0] == 4 * meta["n_frames"]
