"""The evaluate stage (vasa/stages/evaluate.py): which clips it evaluates, how it summarises and plots, the feature
networks given by path (identity, FVD), and end to end on sample-corpus shards and a tiny bundle made for the test
session (tests/conftest.py): judges trained, real, generated and audio-shifted video scored, real beats shifted
audio."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.shards import Sample, write_shard
from tests.conftest import REPO
from tests.test_extract_motion import _one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from vasa.core.config import Params
from vasa.evaluation.features import FVD_FRAMES, fvd, identity_similarity, load_feature_net
from vasa.loaders.judge_clips import JudgeClip, evaluation_set
from vasa.loaders.shards import ShardSet
from vasa.stages.evaluate import CONDITIONS, SKIPPED, feature_figures, summarise, write_plots

# --- which clips are evaluation clips ------------------------------------------------------------------------


def _shard(path: Path, clips: list[tuple[str, str, str]]) -> Path:
    """A shard of metadata-only samples (key, speaker, clip_id): evaluation_set reads no media."""
    samples = [
        Sample(key, {"json": json.dumps({"provenance": {"speaker_id": spk, "clip_id": clip}}).encode()}, 1, 0.04)
        for key, spk, clip in clips
    ]
    write_shard(path, samples)
    return path


def test_evaluation_set_prefers_test_then_last_clip_per_speaker(tmp_path: Path):
    train = (
        _shard(tmp_path / "train-0.tar", [("k1", "a", "a_000"), ("k2", "a", "a_002"), ("k3", "b", "b_001")]),
        _shard(tmp_path / "train-1.tar", [("k4", "a", "a_001"), ("k5", "b", "b_000")]),
    )
    test = (_shard(tmp_path / "test-0.tar", [("t1", "c", "c_000")]),)
    only_train = ShardSet(tmp_path, tmp_path / "index.json", {"train": train}, 128, ("a", "b"))
    name, why, shards, keys = evaluation_set(only_train)
    assert name == "train_last_clip_per_speaker" and "never train" in why
    assert keys == {"k2", "k3"} and shards == train
    with_test = ShardSet(tmp_path, tmp_path / "index.json", {"train": train, "test": test}, 128, ("a", "b"))
    name, _, shards, keys = evaluation_set(with_test)
    assert (name, keys, shards) == ("test", {"t1"}, test)


# --- summary, plots, feature networks --------------------------------------------------------------------------

# The DVC plots the stage writes: the judges' figures and the judge-free ones.
PLOTS = {f"{figure}.csv" for figure in ("S_C", "S_D", "CAPP", "delta_pose_deg", "mouth_r", "mouth_std",
                                        "sharpness_ratio", "yaw_lag1_autocorr")}  # fmt: skip


def _row(s_c: float, s_d: float, capp: float, dp: float | None = None, mouth: tuple = ()) -> dict[str, float]:
    """A clip's row for one condition; a video's own rows (dp given) also hold the judge-free figures:
    mouth = (mouth_r, mouth_std), sharpness ratio 0.9 and yaw autocorrelation 0.2 throughout."""
    row = {"S_C": s_c, "S_D": s_d, "av_offset": 0.0, "CAPP": capp}
    if dp is None:  # a shifted-audio condition: the same video, so no figures of its own
        return row
    independent = dict(zip(("mouth_r", "mouth_std"), mouth, strict=True)) | {
        "sharpness_ratio": 0.9, "yaw_lag1_autocorr": 0.2}  # fmt: skip
    return row | {"delta_pose_deg": dp, "face_frames": 1.0} | independent


def test_summary_means_margins_and_skips(tmp_path: Path, params: Params):
    per_clip = {
        "x": {"real": _row(6, 7, 0.6, 0.5, (0.6, 0.1)), "generated": _row(4, 8, 0.4, 0.3, (0.2, 0.05)),
              "real_shifted": _row(1, 9, 0.1), "generated_shifted": _row(1, 9, 0.2)},
        "y": {"real": _row(8, 5, 0.4, 0.7, (0.4, 0.1)), "generated": _row(2, 8, math.nan, 0.5, (0.4, 0.03)),
              "real_shifted": _row(3, 9, 0.3), "generated_shifted": _row(1, 10, 0.0)},
    }  # fmt: skip
    report = summarise(per_clip, "test", "held-out speakers", "ab" * 32, {"sync": "s", "capp": "c"}, params)
    assert report["eval_set"] == {"name": "test", "why": "held-out speakers", "clips": ["x", "y"]}
    assert report["real"]["S_C"] == 7 and report["real"]["S_D"] == 6 and report["real"]["delta_pose_deg"] == 0.6
    assert report["generated"]["CAPP"] == pytest.approx(0.4)  # a NaN clip (no window) is left out of the mean
    assert report["margin"]["real"] == {"S_C": 5, "S_D": 3, "CAPP": pytest.approx(0.3)}
    independent = report["independent"]  # judge-free: means over clips, generated vs real
    assert independent["mouth_r_real"] == pytest.approx(0.5) and independent["mouth_r_generated"] == pytest.approx(0.3)
    assert independent["mouth_std_ratio"] == pytest.approx(0.04 / 0.1)
    assert independent["sharpness_ratio_generated"] == pytest.approx(0.9)
    assert report["LSE_C_LSE_D"] == SKIPPED
    assert feature_figures(params.evaluate, []) == {"identity_similarity": SKIPPED, "FVD25": SKIPPED}
    write_plots(tmp_path, per_clip)
    assert {p.name for p in tmp_path.iterdir()} == PLOTS
    lines = (tmp_path / "S_C.csv").read_text().splitlines()
    assert lines[0] == "item,value" and len(lines) == 1 + 2 * len(CONDITIONS)
    assert "x/real,6.000000" in lines
    for figure in ("delta_pose_deg", "mouth_r"):  # real and generated only
        assert len((tmp_path / f"{figure}.csv").read_text().splitlines()) == 1 + 2 * 2, figure


class _MeanColour(torch.nn.Module):
    """A stand-in feature network: mean colour per image (or per video)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1) if x.dim() == 4 else x.flatten(2).mean(-1) + 0 * x[:, :1, 0, 0, 0]


def test_feature_networks_by_path(tmp_path: Path, params: Params):
    path = tmp_path / "net.pt"
    torch.jit.script(_MeanColour()).save(str(path))
    net = load_feature_net(path)
    rng = np.random.default_rng(0)
    portrait = np.full((64, 64, 3), (200, 40, 40), np.uint8)
    same = np.repeat(portrait[None], 3, axis=0)
    other = np.full((3, 64, 64, 3), (40, 40, 200), np.uint8)
    assert identity_similarity(net, portrait, same) == pytest.approx(1.0, abs=1e-5)
    assert identity_similarity(net, portrait, other) < 0.9
    videos = [rng.integers(0, 255, (2 * FVD_FRAMES, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    assert fvd(net, videos, videos) == pytest.approx(0.0, abs=1e-3)
    assert fvd(net, videos, [np.clip(v.astype(int) + 60, 0, 255).astype(np.uint8) for v in videos]) > 0.1
    clip = JudgeClip("k", "c", "s", np.zeros((1, 1, 1), np.uint8), np.zeros((1, 1), np.float32),
                     np.zeros((1, 3), np.float32), frames=videos[0])  # fmt: skip
    cfg = params.evaluate.replace(identity_weights=str(path), fvd_weights=str(path))
    found = feature_figures(cfg, [(clip, videos[0])])
    assert found["identity_similarity"]["real"] == found["identity_similarity"]["generated"]
    assert found["FVD25"] == pytest.approx(0.0, abs=1e-3)


# --- end to end on the sample corpus ----------------------------------------------------------------------------

MIN_SYNC_MARGIN = 0.1  # real video: S_C and S_D with the true audio beat the shifted audio by this much at least
MIN_CAPP_MARGIN = 0.02  # real video: CAPP of the true audio beats the shifted audio


@pytest.mark.slow  # ~45 s for the session's sample shards (shared), ~40 s for judges and evaluate
def test_train_judges_and_evaluate_on_the_sample_corpus(tmp_path: Path, params: Params, sample_shards, tiny_bundle):
    """The session's sample shards (real FaceMesh crops of the sample corpus) and a bundle of untrained tiny
    networks (tests/conftest.py): the judges are trained here, as `dvc repro` trains them."""
    from vasa.cli import main

    bundle = tiny_bundle
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards.shards, copy)  # the shared shards stay as they are, whatever the stages write
    params_path = tmp_path / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    judges, out = tmp_path / "judges", tmp_path / "evaluate"
    assert main(["--params", str(params_path), "train-judges", "--shards", str(copy), "--out", str(judges),
                 "--no-progress"]) == 0  # fmt: skip
    check = json.loads((judges / "sync" / "live" / "metrics.json").read_text())["heldout"]
    assert check["margin"]["S_C"] >= MIN_SYNC_MARGIN and check["margin"]["S_D"] >= MIN_SYNC_MARGIN, check
    capp = json.loads((judges / "capp" / "live" / "metrics.json").read_text())["heldout"]
    assert capp["margin"]["shuffled"] > 0 and capp["margin"]["shifted"] > 0, capp
    assert main(["--params", str(params_path), "evaluate", "--shards", str(copy), "--bundle", str(bundle),
                 "--judges", str(judges), "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    # the held-out sample clips (split test: sentences no training clip says), one per speaker
    assert report["eval_set"]["name"] == "test" and len(report["clips"]) == 2
    for condition in CONDITIONS:
        assert all(math.isfinite(report[condition][k]) for k in ("S_C", "S_D", "CAPP")), report[condition]
    real, shifted = report["real"], report["real_shifted"]
    assert real["S_C"] - shifted["S_C"] >= MIN_SYNC_MARGIN and shifted["S_D"] - real["S_D"] >= MIN_SYNC_MARGIN, report
    assert real["CAPP"] - shifted["CAPP"] >= MIN_CAPP_MARGIN, report
    assert abs(real["av_offset"]) <= 1, report  # the sync expert finds real video in sync
    assert real["face_frames"] == 1.0 and 0 < real["delta_pose_deg"] < 5
    assert report["generated"]["face_frames"] > 0.9 and math.isfinite(report["generated"]["delta_pose_deg"])
    assert report["FVD25"] == SKIPPED and report["identity_similarity"] == SKIPPED
    assert all(math.isfinite(report["independent"][k]) for k in ("mouth_r_real", "sharpness_ratio_generated")), report
    assert {p.name for p in (out / "plots").iterdir()} == PLOTS
    assert (out / "side_by_side.mp4").stat().st_size > 0 and (out / "side_by_side.png").stat().st_size > 0
