"""Stage `preprocess`: manifest -> deterministic, incremental webdataset shards."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from flows.ingest import MANIFEST_NAME
from flows.ingest import run as run_ingest
from flows.preprocess import run as run_preprocess
from preprocessing.ingest import manifest
from preprocessing.media import write_mp4
from preprocessing.sample.portraits import prepare_portrait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def sample_manifest(prefect_harness, params, sample_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest")
    run_ingest(params.ingest.replace(sources=["sample"]), out, sample_dir=sample_corpus)
    return out / MANIFEST_NAME


def _cfg(params, **runner):
    runner = params.preprocess.runner.model_dump() | {"kind": "threads"} | runner
    return params.preprocess.replace(runner=runner)


def _samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*-*-*"))} | {
        "index.json": (out / "index.json").read_bytes()
    }


def test_sample_corpus_shards_are_complete_and_reproducible(params, sample_manifest, tmp_path):
    cfg = _cfg(params)
    summary = run_preprocess(cfg, sample_manifest, tmp_path / "a", tmp_path / "cache_a")
    assert summary["splits"]["train"]["samples"] == 8 and summary["failures_by_reason"] == {}
    samples = _samples(tmp_path / "a")
    assert len(samples) == 8
    k = 4  # 16 kHz / 25 fps / hop 160
    for sample in samples:
        meta = json.loads(sample["json"])
        n = meta["n_frames"]
        assert meta["mel_frames_per_video_frame"] == k
        assert np.load(io.BytesIO(sample["mel.npy"])).shape == (n * k, cfg.audio.n_mels)
        pose = np.load(io.BytesIO(sample["pose.npy"]))
        assert pose.shape == (n, 7) and np.isfinite(pose).all()
        assert np.load(io.BytesIO(sample["landmarks.npy"])).dtype == np.float16
        assert np.isfinite(np.load(io.BytesIO(sample["gaze.npy"]))).all()
        assert meta["provenance"]["licence"] == "public-domain" and meta["provenance"]["clip_id"].startswith("sample:")
    # Same inputs, fresh cache: byte-identical shards.
    run_preprocess(cfg, sample_manifest, tmp_path / "b", tmp_path / "cache_b")
    assert _tars(tmp_path / "a") == _tars(tmp_path / "b")


def test_killed_run_resumes_to_the_same_shards(params, sample_manifest, tmp_path):
    cfg = _cfg(params)
    run_preprocess(cfg, sample_manifest, tmp_path / "full", tmp_path / "cache_full")
    # A run killed half way: some clips cached, a shard half written, no index yet.
    rows = manifest.read_manifest(sample_manifest)
    half = tmp_path / "half.parquet"
    manifest.write_manifest(half, rows[:4])
    run_preprocess(cfg, half, tmp_path / "resumed", tmp_path / "cache")
    (tmp_path / "resumed" / "index.json").unlink()
    first_tar = next((tmp_path / "resumed").glob("*.tar"))
    first_tar.write_bytes(first_tar.read_bytes()[:1000])
    (tmp_path / "resumed" / "stray.tar.partial").write_bytes(b"junk")
    run_preprocess(cfg, sample_manifest, tmp_path / "resumed", tmp_path / "cache")
    assert _tars(tmp_path / "resumed") == _tars(tmp_path / "full")


def test_new_clips_rebuild_only_their_shards(params, sample_manifest, tmp_path):
    cfg = _cfg(params)
    rows = manifest.read_manifest(sample_manifest)
    first = tmp_path / "first.parquet"
    manifest.write_manifest(first, rows[:6])
    out = tmp_path / "out"
    run_preprocess(cfg, first, out, tmp_path / "cache")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    run_preprocess(cfg, sample_manifest, out, tmp_path / "cache")
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    digits = cfg.shards.bucket_hex_digits
    new_buckets = {row["key"][:digits] for row in rows[6:]}
    for name, mtime in before.items():
        if name.split("-")[1] not in new_buckets:
            assert after[name] == mtime, f"{name} was rewritten"
    assert len(_samples(out)) == 8


def test_dask_two_workers_match_serial(params, sample_manifest, tmp_path):
    run_preprocess(_cfg(params), sample_manifest, tmp_path / "serial", tmp_path / "cache_serial")
    dask = _cfg(params, kind="dask", workers=2)
    run_preprocess(dask, sample_manifest, tmp_path / "dask", tmp_path / "cache_dask")
    assert _tars(tmp_path / "serial") == _tars(tmp_path / "dask")


def _two_faces(path: Path) -> None:
    faces = [prepare_portrait(name, 256).image for name in ("skimage_astronaut", "matplotlib_grace_hopper")]
    pair = np.concatenate(faces, axis=1)  # (256, 512, 3): two faces side by side
    frames = np.repeat(pair[None], 40, axis=0)
    write_mp4(path, frames, 25, np.zeros(40 * 640, np.float32), 16000)


def test_bad_inputs_are_recorded_and_good_clips_land(params, prefect_harness, sample_corpus, tmp_path):
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
    ingest = params.ingest.replace(sources=["local"], holdout_speakers=["held"])
    run_ingest(ingest, tmp_path / "ingest", local_dir=folder)
    out = tmp_path / "shards"
    summary = run_preprocess(_cfg(params), tmp_path / "ingest" / MANIFEST_NAME, out, tmp_path / "cache")
    failures = pd.read_parquet(out / "failures.parquet").set_index("clip_id")
    assert failures.loc["local:truncated.mp4", "reason"] == "unreadable_media"
    assert failures.loc["local:zero.mp4", "reason"] == "unreadable_media"
    assert failures.loc["local:no_audio.mp4", "reason"] == "missing_audio"
    assert failures.loc["local:audio_only.mp4", "reason"] == "no_video"
    assert failures.loc["local:no_face.mp4", "reason"] == "no_face"
    assert failures.loc["local:two_faces.mp4", "reason"] == "multiple_faces"
    assert failures.loc["local:one_frame.mp4", "reason"] == "too_short"
    assert summary["splits"]["train"]["samples"] == 1 and summary["splits"]["test"]["samples"] == 1
    by_shard = {
        p.name: {json.loads(s["json"])["provenance"]["clip_id"] for s in wds.WebDataset(str(p), shardshuffle=False)}
        for p in out.glob("*.tar")
    }
    assert {c for name, ids in by_shard.items() if name.startswith("train-") for c in ids} == {"local:good.mp4"}
    assert {c for name, ids in by_shard.items() if name.startswith("test-") for c in ids} == {"local:held.mp4"}
    stats = [json.loads(p.read_text()) for p in out.glob("*.stats.json")]
    assert sum(s["failed_clips"] for s in stats) <= len(failures)


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
