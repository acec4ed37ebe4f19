"""`vasa extract-motion` and `vasa train-motion` end to end through their main(argv) on the tiny presets:
synthetic shards -> motion shards -> a few engine steps -> EMA weights + lineage, metrics, curves PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO
from tests.test_extract_motion import motion_fixture  # noqa: F401 (fixture)
from vasa.cli import main as cli_main
from vasa.core.digests import sha256_file
from vasa.core.weights import load_weights
from vasa.stages.train_motion import mouth_audio_check


def small_params(tmp_path: Path) -> Path:
    """params.yaml with train_motion shrunk to a few steps on 10-frame windows."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    motion = params["train_motion"]
    motion |= {"window": 10, "context": 3}
    motion["diffusion"]["sampling_steps"] = 4
    motion["train"] |= {"steps": 6, "batch_size": 4, "log_every": 2, "image_every": 6, "checkpoint_every": 3,
                        "warmup_steps": 1}  # fmt: skip
    motion["data"] |= {"eval_windows": 4, "workers": 0}
    params["extract_motion"] |= {"device": "cpu", "batch_size": 16}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_extract_and_train_motion_end_to_end(tmp_path, motion_fixture):  # noqa: F811
    params = small_params(tmp_path)
    motion = tmp_path / "motion"
    argv = ["--params", str(params), "extract-motion", "--shards", str(motion_fixture["shards"]), "--latent",
            str(motion_fixture["stage1"]), "--out", str(motion), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    # Same inputs and code as the fixture's library call: byte-identical motion shards.
    for name in ("train-0-0000.tar", "test-0-0000.tar", "stats.json"):
        assert (motion / name).read_bytes() == (motion_fixture["motion"] / name).read_bytes()
    out = tmp_path / "run"
    assert (
        cli_main(["--params", str(params), "train-motion", "--motion", str(motion), "--out", str(out), "--no-progress"])
        == 0
    )
    weights, meta = load_weights(out / "model")
    assert list(weights) == ["dit"] and meta["step"] == 6
    index = json.loads((motion / "index.json").read_text())
    assert meta["lineage"]["index_sha256"] == sha256_file(motion / "index.json")
    assert meta["lineage"]["stage1_weights_sha256"] == index["dataset"]["stage1_weights_sha256"]
    assert meta["normalisation"] == json.loads((motion / "stats.json").read_text())
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert "x0_by_noise" in flat and "mouth_audio" in flat and "eval_x0" in flat
    curves = np.asarray(Image.open(out / "images" / "heldout_curves.png"))
    assert curves.ndim == 3 and curves.std() > 0


def test_train_motion_rejects_a_folder_without_motion_shards(tmp_path, capsys):
    params = small_params(tmp_path)
    assert (
        cli_main(
            ["--params", str(params), "train-motion", "--motion", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


def test_mouth_audio_check_separates_following_from_ignoring_the_audio():
    rng = np.random.default_rng(0)
    n, w, m = 16, 25, 10
    audio = rng.normal(size=(n, w, 4)) + np.sin(np.arange(w) / 2)[None, :, None] * rng.normal(size=(n, 1, 1))
    envelope = audio.mean(-1)
    real = rng.normal(size=(n, w, m)) * 0.1
    real[..., 9] = envelope
    following = real + rng.normal(size=real.shape) * 0.1
    ignoring = rng.normal(size=real.shape)
    good = mouth_audio_check(following, real, audio, seed=0)
    bad = mouth_audio_check(ignoring, real, audio, seed=0)
    assert good["mouth_audio/column"] == 2  # z_dyn column 2 = motion column 9
    assert good["mouth_audio/margin"] > 0.5 and abs(bad["mouth_audio/margin"]) < 0.2
