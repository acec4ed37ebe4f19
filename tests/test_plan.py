"""Issue 23 part 1: the VoxCeleb2 512² / 8-GPU recipe (cluster/recipes/voxceleb2_512_8gpu.yaml), the overlay
merge that loads it (vasa.core.config.load_params), and `vasa plan` (vasa/plan/), which prints its budget and
refuses what cannot fit; slow: three steps of every stage with the recipe's networks on a small sample corpus."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from vasa.cli import main
from vasa.core.config import ConfigError, load_params
from vasa.plan.budget import budget
from vasa.plan.costs import GPUS, VOXCELEB2, Costs, measure, shard_frame_bytes

RECIPE = REPO / "cluster" / "recipes" / "voxceleb2_512_8gpu.yaml"
PARAMS = REPO / "params.yaml"


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def recipe_costs() -> Costs:
    """The recipe's networks counted once on the meta device (20-45 s for `base` on the shared 2-core VM: the
    tests that use it are marked slow)."""
    return measure(load_params(PARAMS, [RECIPE]))


# --- the recipe and the overlay merge ---------------------------------------------------------------------------


def test_the_recipe_loads_and_is_paper_like():
    params = load_params(PARAMS, [RECIPE])
    latent, motion = params.train_latent, params.train_motion
    assert params.preprocess.crop_size == 512 and latent.model == motion.model == "base"
    assert (motion.window, motion.context) == (100, 25)
    assert latent.loss.adversarial > 0 and latent.loss.feature_matching > 0  # GAN on
    assert latent.train.lr == 2e-4 and motion.train.lr == 1e-4 and motion.train.ema_decay == 0.9999
    for train in (latent.train, motion.train, params.judges.sync.train, params.judges.capp.train):
        assert train.precision == "bf16" and train.steps >= 50_000 and train.checkpoint_every >= 10_000
    assert latent.train.batch_size * 8 == 16 and motion.train.batch_size * 8 == 256  # global batches on 8 GPUs
    # Only what the recipe names changed: the rest is params.yaml's.
    assert params.generate == load_params(PARAMS).generate and params.sample == load_params(PARAMS).sample


def test_overlays_stack_in_order_and_change_only_their_keys(tmp_path):
    first = write(tmp_path / "a.yaml", {"train_latent": {"train": {"steps": 70, "lr": 0.5}}})
    second = write(tmp_path / "b.yaml", {"train_latent": {"train": {"steps": 90}}, "ingest": {"sources": ["local"]}})
    params, base = load_params(PARAMS, [first, second]), load_params(PARAMS)
    assert (params.train_latent.train.steps, params.train_latent.train.lr) == (90, 0.5)
    assert params.ingest.sources == ("local",)  # a list replaces the list
    assert params.train_latent.train.batch_size == base.train_latent.train.batch_size
    assert params.train_motion == base.train_motion


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"train_latent": {"train": {"stepz": 3}}}, "train_latent.train.stepz: unknown key (an overlay only changes"),
        ({"train_latnt": {"model": "base"}}, "train_latnt: unknown key"),
        ({"train_latent": {"model": {"name": "base"}}}, "train_latent.model: a mapping given where the params file"),
        ({"train_latent": {"train": {"steps": "many"}}}, "train_latent.train.steps: Input should be a valid integer"),
        ({"train_motion": {"window": 20, "context": 25}}, "context (25) must be shorter than the window (20)"),
    ],
)
def test_a_bad_overlay_is_refused_naming_the_file_and_key(tmp_path, tree, message):
    overlay = write(tmp_path / "bad.yaml", tree)
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, [overlay])
    assert message in str(err.value) and str(overlay) in str(err.value)


def test_an_overlay_that_is_not_a_mapping_or_not_there_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="an overlay is a mapping"):
        load_params(PARAMS, [write(tmp_path / "list.yaml", ["a"])])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overlay not found"):
        load_params(PARAMS, [tmp_path / "missing.yaml"])


def test_the_cli_reads_overlays_and_exits_2_on_a_bad_one(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", {"train_motion": {"windw": 100}})
    assert main(["--overlay", str(bad), "plan", "--gpus", "8"]) == 2
    assert "train_motion.windw: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_dvc_exp_run_sets_give_the_same_params_as_the_overlay(tmp_path):
    """`apply.py --dvc-sets` lines, applied by DVC's own `-S` code (Hydra overrides on params.yaml, what `dvc exp
    run -S` does), and `apply.py --out` both give exactly load_params(params.yaml, [recipe])."""
    hydra = pytest.importorskip("dvc.utils.hydra")
    script = REPO / "cluster" / "recipes" / "apply.py"
    lines = subprocess.run([sys.executable, str(script), str(RECIPE), "--dvc-sets"], capture_output=True, text=True,
                           check=True).stdout.splitlines()  # fmt: skip
    assert lines and all(line.startswith("--set-param=") for line in lines)
    copy = tmp_path / "params.yaml"
    copy.write_text(PARAMS.read_text())
    hydra.apply_overrides(copy, [line.removeprefix("--set-param=") for line in lines])
    expected = load_params(PARAMS, [RECIPE])
    assert load_params(copy) == expected
    merged = tmp_path / "run" / "params.yaml"
    subprocess.run([sys.executable, str(script), str(RECIPE), "--out", str(merged)], check=True)
    assert load_params(merged) == expected
    bad = write(tmp_path / "bad.yaml", {"train_latent": {"modle": "base"}})
    result = subprocess.run([sys.executable, str(script), str(bad), "--dvc-sets"], capture_output=True, text=True)
    assert result.returncode == 2 and "train_latent.modle: unknown key" in result.stderr and not result.stdout


# --- vasa plan ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_prints_every_figure_of_the_recipe(recipe_costs, monkeypatch, capsys):
    monkeypatch.setattr("vasa.plan.costs.measure", lambda params: recipe_costs)
    assert main(["--overlay", str(RECIPE), "plan", "--gpus", "8", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    figures = ("8 x NVIDIA H100", "MFU 30%", "global batch", "GPU-h", "wall h", "GiB/GPU", "train_latent",
               "extract_motion", "train_motion", "train_judges", "total", "memory per GPU", "a checkpoint every",
               "loader (train_latent)", "cores per GPU", "GiB RAM per GPU", "storage: shards",
               "checkpoints")  # fmt: skip
    for text in figures:
        assert text in out, text
    assert "REFUSED" not in out


@pytest.mark.slow
def test_plan_figures_are_consistent(recipe_costs):
    params = load_params(PARAMS, [RECIPE])
    plan = budget(params, recipe_costs, 8, "h100")
    latent, extract, motion, judges = plan.stages
    h100 = GPUS["h100"]
    # GPU-bound stage 1: steps x global batch x FLOP per sample / (peak x MFU).
    assert latent.bound == "GPU" and latent.global_batch == 16
    expected = 500_000 * 16 * recipe_costs.latent.flop / (h100.peak_tflops * 1e12 * 0.3) / 3600
    assert latent.gpu_hours == pytest.approx(expected) and latent.wall_hours == pytest.approx(expected / 8)
    assert 4.5e12 < recipe_costs.latent.flop < 5.5e12  # docs/BENCHMARKS.md: 4.8 TFLOP with the GAN off
    assert 40e6 < recipe_costs.latent.trained["generator"] < 50e6  # 47 M with VoxCeleb2's speakers
    assert 25e6 < recipe_costs.motion.parameters < 32e6  # ~29 M (VASA-1)
    assert latent.memory_total_gib == pytest.approx(sum(latent.memory_gib.values()))
    assert latent.memory_gib["activations"] == pytest.approx(2 * recipe_costs.latent.activation_bytes / 2**30)
    assert all(s.memory_total_gib < h100.memory_gib for s in plan.stages) and not plan.refusals
    loader = plan.loaders[0]
    assert loader.cores_needed == pytest.approx(loader.gpu_rate * loader.cpu_s)
    assert loader.workers >= loader.cores_needed  # the recipe's workers keep up with the GPU
    assert extract.items == pytest.approx((VOXCELEB2.dev_hours + VOXCELEB2.test_hours) * 3600 * 25)
    assert plan.storage_bytes["shards"] == pytest.approx(extract.items * sum(shard_frame_bytes(params).values()))
    assert 1e12 < plan.storage_bytes["shards"] < 5e12  # docs/BENCHMARKS.md: crop videos alone ~1.7 TB
    assert plan.gpu_hours == pytest.approx(sum(s.gpu_hours for s in (latent, extract, motion, judges)))


@pytest.mark.slow
def test_doubling_the_gpus_at_the_same_global_batch_halves_the_hours(recipe_costs):
    params = load_params(PARAMS, [RECIPE])
    halved = params.replace(
        train_latent=params.train_latent.replace(train=params.train_latent.train.replace(batch_size=1)),
        train_motion=params.train_motion.replace(train=params.train_motion.train.replace(batch_size=16)),
    )
    on8, on16 = budget(params, recipe_costs, 8, "h100"), budget(halved, recipe_costs, 16, "h100")
    for a, b in zip(on8.stages, on16.stages, strict=True):
        assert a.global_batch == b.global_batch
        if a.stage in ("train_latent", "train_motion"):
            assert b.wall_hours == pytest.approx(a.wall_hours / 2) and b.gpu_hours == pytest.approx(a.gpu_hours)
        else:  # one-process stages do not scale with --gpus
            assert b.wall_hours == pytest.approx(a.wall_hours)
    # The same per-GPU batch on twice the GPUs: twice the global batch, the same wall time, twice the GPU-hours.
    same = budget(params, recipe_costs, 16, "h100").stages[0]
    assert same.global_batch == 32 and same.wall_hours == pytest.approx(on8.stages[0].wall_hours)
    # A slower GPU: more hours, in proportion to the peak while the GPU bounds the stage.
    a100 = budget(params, recipe_costs, 8, "a100").stages[0]
    assert a100.wall_hours == pytest.approx(on8.stages[0].wall_hours * 989 / 312)


@pytest.mark.slow
def test_settings_that_cannot_fit_are_refused(recipe_costs, monkeypatch, capsys, tmp_path):
    params = load_params(PARAMS, [RECIPE])
    latent = params.train_latent
    big = params.replace(train_latent=latent.replace(train=latent.train.replace(batch_size=16)))
    refusals = budget(big, recipe_costs, 8, "h100").refusals
    assert len(refusals) == 1 and "train_latent:" in refusals[0] and "exceed the 79.2 GiB" in refusals[0]
    fits = int(refusals[0].split("train_latent.train.batch_size <= ")[1].split()[0])
    assert 2 <= fits < 16
    ok = big.replace(train_latent=big.train_latent.replace(train=big.train_latent.train.replace(batch_size=fits)))
    assert not budget(ok, recipe_costs, 8, "h100").refusals
    # A global batch the GPUs cannot split, or one the batch size does not give.
    wanted = {"train_latent": 16}
    assert "no whole batch per GPU on 6 GPU(s)" in budget(params, recipe_costs, 6, global_batch=wanted).refusals[0]
    assert "set train_latent.train.batch_size: 1" in budget(params, recipe_costs, 16, global_batch=wanted).refusals[0]
    assert not budget(params, recipe_costs, 8, global_batch={"train_latent": 16, "train_motion": 256}).refusals
    # More loader workers than the node has cores.
    many = params.replace(train_latent=params.train_latent.replace(data=params.train_latent.data.replace(workers=20)))
    assert any("train_latent.data.workers" in r and "cores" in r for r in budget(many, recipe_costs, 8).refusals)
    # Through the CLI: the budget is printed, the refusal goes to stderr, exit 2.
    monkeypatch.setattr("vasa.plan.costs.measure", lambda params: recipe_costs)
    overlay = write(tmp_path / "big.yaml", {"train_latent": {"train": {"batch_size": 16}}})
    assert main(["plan", "--params", str(PARAMS), "--overlay", str(RECIPE), "--overlay", str(overlay),
                 "--gpus", "8"]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert "REFUSED: train_latent" in captured.out and "vasa plan: refused" in captured.err
    assert main(["--overlay", str(RECIPE), "plan", "--gpus", "8", "--gpu", "v100"]) == 2
    assert "unknown --gpu 'v100'" in capsys.readouterr().err


# --- three steps of every stage with the recipe's networks ----------------------------------------------------

LONG_CLIPS = {  # 112 frames (4.48 s: whole AAC and video frames) per clip: a W = 100 window fits
    "clips_per_identity": 1, "heldout_clips_per_identity": 1, "min_seconds": 4.4, "max_seconds": 4.5, "size": 128,
}  # fmt: skip
CPU_TRAIN = {"steps": 3, "warmup_steps": 1, "precision": "auto", "log_every": 1, "image_every": 3,
             "checkpoint_every": 3}  # fmt: skip


@pytest.mark.slow
def test_three_steps_of_every_stage_with_the_recipes_networks(params, tmp_path, monkeypatch):
    """The recipe's networks (`base` stage 1, here at 256²; `base` DiT at W = 100 / K = 25; `base` judges) through
    the CLI with the recipe overlay and one more that only shortens the schedules for the CPU: train-latent,
    extract-motion, train-motion and train-judges each run 3 steps on a sample corpus of 4.5 s clips."""
    import torch
    from safetensors.torch import save_file

    from tests.fixtures_pipeline import build_sample_shards
    from vasa.losses import VGG19Features
    from vasa.models import presets

    start, cpu = time.perf_counter(), time.process_time()
    data = build_sample_shards(params, tmp_path / "data", LONG_CLIPS)
    timings = {"corpus + ingest + preprocess": (time.perf_counter() - start, time.process_time() - cpu)}
    vgg = tmp_path / "vgg19.safetensors"  # random weights: the term's cost and shapes, not its values
    save_file({f"features.{k}": v.contiguous() for k, v in VGG19Features().features.state_dict().items()}, str(vgg))
    shorter = write(tmp_path / "cpu.yaml", {
        "train_latent": {"train": CPU_TRAIN | {"batch_size": 1}, "loss": {"perceptual_weights": str(vgg)},
                         "data": {"workers": 0, "eval_pairs": 2, "shuffle_buffer": 2}},
        "extract_motion": {"batch_size": 16, "device": "cpu"},
        "train_motion": {"train": CPU_TRAIN | {"batch_size": 2}, "data": {"workers": 0, "eval_windows": 1},
                         "diffusion": {"sampling_steps": 2}},
        "judges": {"sync": {"train": CPU_TRAIN | {"batch_size": 4}}, "capp": {"train": CPU_TRAIN | {"batch_size": 4}}},
    })  # fmt: skip
    # `base` at 256² instead of 512²: the same widths and depths, a quarter of the pixels (~1.25 TFLOP a sample).
    monkeypatch.setitem(presets.LATENT_PRESETS, "base", presets.LATENT_PRESETS["base"].at_resolution(256))
    torch.manual_seed(0)
    common = ["--params", str(PARAMS), "--overlay", str(RECIPE), "--overlay", str(shorter)]
    out, shards = tmp_path / "run", str(data.shards)
    commands = {
        "train-latent": ["--shards", shards, "--out", str(out / "latent")],
        "extract-motion": ["--shards", shards, "--latent", str(out / "latent" / "model"), "--out", str(out / "motion")],
        "train-motion": ["--motion", str(out / "motion"), "--out", str(out / "motion_dit")],
        "train-judges": ["--shards", shards, "--out", str(out / "judges")],
    }
    for command, args in commands.items():
        start, cpu = time.perf_counter(), time.process_time()
        assert main([*common, command, *args, "--no-progress"]) == 0, command
        timings[command] = time.perf_counter() - start, time.process_time() - cpu
    latent = json.loads((out / "latent" / "model" / "model.json").read_text())
    assert latent["step"] == 3 and latent["task"]["preset"]["name"] == "base"
    assert latent["task"]["preset"]["resolution"] == 256 and latent["task"]["loss"]["adversarial"] == 0.1
    dit = json.loads((out / "motion_dit" / "model" / "model.json").read_text())
    assert dit["step"] == 3 and dit["task"]["preset"]["name"] == "base"
    assert (dit["task"]["window"], dit["task"]["context"]) == (100, 25)
    assert dit["task"]["motion_dim"] == 7 + presets.LATENT_PRESETS["base"].dynamics_dim
    for judge in ("sync", "capp"):
        meta = json.loads((out / "judges" / judge / "model" / "model.json").read_text())
        assert meta["step"] == 3 and meta["task"]["preset"]["name"] == "base"
    print("\n" + ", ".join(f"{k} {wall:.0f} s wall / {cpu:.0f} s CPU" for k, (wall, cpu) in timings.items()))


@pytest.mark.slow
def test_the_shard_bytes_per_frame_the_plan_assumes_match_real_shards(params, sample_shards):
    """Everything but the crop video, per frame: the plan's schema-derived figure against the sample shards."""
    import io

    import numpy as np

    from vasa.loaders.shards import open_shards, read_samples

    frames, other = 0, 0
    for path in open_shards(sample_shards.shards).train:
        for sample in read_samples(path):
            frames += len(np.load(io.BytesIO(sample["pose.npy"]), allow_pickle=False))
            other += sum(len(v) for k, v in sample.items() if k not in ("mp4", "json", "__key__"))
    assert frames > 0
    per_frame = shard_frame_bytes(params)
    expected = per_frame["arrays"] + per_frame["wav"]
    assert other / frames == pytest.approx(expected, rel=0.05)
