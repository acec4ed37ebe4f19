"""The shared training engine (vasa/training) on a ToyTask: a tiny conv autoencoder + a tiny patch
discriminator over synthetic batches, so the engine is tested apart from the real networks.

Run as a module (`python -m tests.test_training_engine --out DIR --steps N ...`) it is also the
training script that test_distributed.py launches under torchrun / accelerate and kills mid-run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from vasa.core.config import TrainConfig
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.weights import load_weights, write_weights
from vasa.training import checkpoint  # FIXME split module
from vasa.training.ema import EMA
from vasa.training.engine import TrainTask, train
from vasa.training.schedule import lr_factor
from vasa.training.steps import LossLog

SIZE = 16  # synthetic image side


class ToyTask:
    """A 2-module GAN-shaped task: autoencoder "generator" (L1 + adversarial) and "discriminator" (hinge)."""

    def __init__(self, adversarial: float = 0.1, width: int = 8):
        self.adversarial = adversarial
        self.width = width

    def build(self) -> dict[str, nn.Module]:
        w = self.width
        generator = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(w, 3, 3, padding=1), nn.Tanh(),
        )  # fmt: skip
        discriminator = nn.Sequential(nn.Conv2d(3, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(w, 1, 3))
        return {"generator": generator, "discriminator": discriminator}

    def update_order(self) -> list[str]:
        return ["generator", "discriminator"]

    def ema_modules(self) -> list[str]:
        return ["generator"]

    def loss(self, name, models, batch, scratch):
        if name == "generator":
            fake = models["generator"](batch["source"])
            scratch["fake"] = fake.detach()
            l1 = F.l1_loss(fake, batch["driver"])
            adv = -models["discriminator"](fake).mean()
            total = l1 + self.adversarial * adv
            return total, {"l1": l1.detach(), "adversarial": adv.detach()}
        real, fake = models["discriminator"](batch["driver"]), models["discriminator"](scratch["fake"])
        hinge = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return hinge, {"hinge": hinge.detach()}

    def images(self, models, batch):
        fake = models["generator"](batch["source"][:2])
        rows = torch.cat([batch["source"][:2], batch["driver"][:2], fake], dim=3)  # (2, 3, S, 3S)
        grid = torch.cat(list(rows), dim=1)  # (3, 2S, 3S)
        return ((grid.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    def reconstruct(self, models, batch):
        return models["generator"](batch["source"])

    def describe(self) -> dict:
        return {"task": "toy", "adversarial": self.adversarial, "width": self.width}


def toy_batches(batch_size: int, seed: int):
    """Batch source: a pure function of (seed, epoch, rank), so a resumed run sees the same data."""

    def source(epoch: int, rank: int, world: int):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
        while True:
            base = torch.rand(batch_size, 3, 1, 1, generator=generator) * 2 - 1
            ramp = torch.linspace(-0.5, 0.5, SIZE)
            source = (base + ramp.view(1, 1, 1, SIZE) + 0.5 * ramp.view(1, 1, SIZE, 1)).clamp(-1, 1)
            yield {"source": source, "driver": -source}  # a colour inversion: learnable by the toy

    return source


def toy_config(**changes) -> TrainConfig:
    values = {
        "steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 3e-3, "betas": [0.5, 0.999], "weight_decay": 0.0,
        "warmup_steps": 2, "min_lr_ratio": 0.1, "clip_norm": 1.0, "ema_decay": 0.9, "precision": "fp32",
        "seed": 0, "log_every": 2, "image_every": 3, "checkpoint_every": 3, "keep_checkpoints": 2,
        "activation_checkpointing": False, "compile": False,
    }  # fmt: skip
    return TrainConfig.from_data(values | changes)


def toy_evaluation(cfg: TrainConfig):
    """The final evaluation of a toy run: the trained generator's L1 and the discriminator's mean score on a
    batch of another seed (one module with EMA weights, one with its live weights)."""
    batch = next(iter(toy_batches(cfg.batch_size, cfg.seed + 1)(0, 0, 1)))

    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        with torch.no_grad():
            fake = models["generator"](batch["source"])
            return {
                "heldout_l1": F.l1_loss(fake, batch["driver"]).item(),
                "d_fake": models["discriminator"](fake).mean().item(),
            }

    return evaluate


def weights_digest(folder: Path) -> str:
    """sha256 over the EMA output tensors (names and raw bytes)."""
    weights, _ = load_weights(folder)
    digest = hashlib.sha256()
    for module in sorted(weights):
        for key, tensor in sorted(weights[module].items()):
            digest.update(f"{module}/{key}".encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def run_toy(out: Path, cfg: TrainConfig, resume: bool = False, deepspeed: dict | None = None):
    torch.set_num_threads(1)
    return train(
        ToyTask(),
        cfg,
        toy_batches(cfg.batch_size, cfg.seed),
        out,
        meta={"params": {"toy": True}, "lineage": {"index_sha256": "0" * 64}},
        resume=resume,
        deepspeed=deepspeed,
        progress=False,
    )


# ---------------------------------------------------------------- unit tests of the pieces


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    with pytest.raises(ValueError):
        lr_factor(0, 0, 0, 0.1)


def test_ema_blends_and_round_trips():
    module = nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.5))
    other = EMA(nn.Linear(2, 1), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError):
        other.load_state_dict({"weight": torch.zeros(1, 2)})


def test_weights_round_trip_without_pickle_and_detect_tampering(tmp_path):
    state = {"generator": {"w": torch.arange(6.0).view(2, 3)}}
    write_weights(tmp_path, state, {"task": {"name": "x"}, "step": 3})
    weights, meta = load_weights(tmp_path)
    assert torch.equal(weights["generator"]["w"], state["generator"]["w"]) and meta["step"] == 3
    first = (tmp_path / "generator.safetensors").read_bytes()
    write_weights(tmp_path, state, {"task": {"name": "x"}, "step": 3})
    assert (tmp_path / "generator.safetensors").read_bytes() == first  # same tensors -> same bytes
    (tmp_path / "generator.safetensors").write_bytes(first[:-1] + bytes([first[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load_weights(tmp_path)


# The tasks the stages hand to the engine (train_latent, train_motion, train_judges). The ToyTask is not among
# them: every loop test below drives it through `train`.
REAL_TASKS = [
    ("vasa.training.latent_task", "LatentTask"),
    ("vasa.training.motion_task", "MotionTask"),
    ("vasa.evaluation.sync", "SyncTask"),
    ("vasa.evaluation.capp", "CappTask"),
]
# TrainTask's methods (the protocol's own), and the optional extras the engine looks up with getattr.
PROTOCOL = [name for name, value in vars(TrainTask).items() if inspect.isfunction(value) and name[0] != "_"]
OPTIONAL = {"lr_scale": 1, "reconstruct": 2}  # positional arguments besides self


@pytest.mark.parametrize(("module", "name"), REAL_TASKS)
def test_every_real_task_is_a_train_task_the_engine_can_call(module, name):
    """Each stage's task has every protocol method, taking the arguments the protocol declares (runtime_checkable
    only looks for the names), and the optional extras it has take what the engine passes."""
    task = getattr(importlib.import_module(module), name)
    assert set(PROTOCOL) == {"build", "update_order", "ema_modules", "loss", "images", "describe"}
    assert issubclass(task, TrainTask)
    for method in PROTOCOL:
        arguments = len(inspect.signature(getattr(TrainTask, method)).parameters)  # self included
        try:
            inspect.signature(getattr(task, method)).bind(*[None] * arguments)
        except TypeError as err:
            pytest.fail(f"{name}.{method} cannot be called as TrainTask.{method}: {err}")
    for method, arguments in OPTIONAL.items():
        if hasattr(task, method):
            inspect.signature(getattr(task, method)).bind(*[None] * (1 + arguments))
    # The check can fail: the same class without `images` is no TrainTask.
    partial = type("Partial", (), {m: getattr(task, m) for m in PROTOCOL if m != "images"})
    assert not issubclass(partial, TrainTask)


# ---------------------------------------------------------------- the loop


def test_training_writes_ema_weights_metrics_grids_and_states(tmp_path):
    result = run_toy(tmp_path, toy_config())
    assert result.step == 6
    weights, meta = load_weights(tmp_path / "model")
    assert set(weights) == {"generator"} and meta["step"] == 6 and meta["task"]["task"] == "toy"
    assert meta["lineage"]["index_sha256"] == "0" * 64
    ema_generator = ToyTask().build()["generator"]
    ema_generator.load_state_dict(weights["generator"])  # loads into a freshly built module
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"loss", "lr", "grad_norm"} <= set(metrics) and "l1" in metrics["loss"]["generator"]
    assert metrics["step"] == 6
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    assert [step for step, _ in checkpoint.complete_states(tmp_path / "checkpoints")] == [3, 6]


def test_loss_falls_on_a_learnable_toy_problem(tmp_path):
    # A metrics row is the mean over the steps since the last one: the last row, over steps 51-60.
    cfg = toy_config(steps=60, log_every=10, image_every=60, checkpoint_every=60)
    result = run_toy(tmp_path, cfg)
    rows = (tmp_path / "live" / "plots" / "metrics" / "loss" / "generator" / "l1.tsv").read_text().splitlines()
    final = float(rows[-1].split("\t")[-1])
    initial = toy_initial_l1(cfg)
    assert final < 0.5 * initial, (initial, final, result.last_terms)


def toy_initial_l1(cfg: TrainConfig) -> float:
    torch.manual_seed(cfg.seed)
    generator = ToyTask().build()["generator"]
    batch = next(iter(toy_batches(cfg.batch_size, cfg.seed)(0, 0, 1)))
    with torch.no_grad():
        return F.l1_loss(generator(batch["source"]), batch["driver"]).item()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    cfg = toy_config()
    run_toy(tmp_path / "a", cfg)
    run_toy(tmp_path / "b", cfg)
    run_toy(tmp_path / "c", toy_config(seed=1))
    assert weights_digest(tmp_path / "a" / "model") == weights_digest(tmp_path / "b" / "model")
    assert weights_digest(tmp_path / "a" / "model") != weights_digest(tmp_path / "c" / "model")
    first = (tmp_path / "a" / "model" / "model.json").read_bytes()
    assert first == (tmp_path / "b" / "model" / "model.json").read_bytes()


def test_resume_continues_from_the_latest_state_to_the_same_weights(tmp_path):
    run_toy(tmp_path / "full", toy_config())
    # Interrupted after the step-3 state: drop what a run killed at step 4 or 5 would not have.
    partial = tmp_path / "cut"
    run_toy(partial, toy_config())
    import shutil

    shutil.rmtree(checkpoint.state_dir(partial / "checkpoints", 6))
    shutil.rmtree(partial / "model")
    run_toy(partial, toy_config(), resume=True)
    assert weights_digest(partial / "model") == weights_digest(tmp_path / "full" / "model")


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path):
    run_toy(tmp_path, toy_config(steps=3, warmup_steps=1))
    with pytest.raises(InputError, match="--resume"):
        run_toy(tmp_path, toy_config(steps=3, warmup_steps=1))


def test_resume_refuses_a_checkpoint_of_another_task(tmp_path):
    run_toy(tmp_path, toy_config(steps=3, warmup_steps=1))
    with pytest.raises(InputError, match="different task"):
        torch.set_num_threads(1)
        train(
            ToyTask(width=4),
            toy_config(steps=6),
            toy_batches(4, 0),
            tmp_path,
            meta={},
            resume=True,
            progress=False,
        )


def test_the_loss_log_reads_back_only_when_flushed_and_means_over_steps_and_processes():
    """Terms stay tensors until a flush; a row is each term's mean over the steps since the last row and over
    the processes that logged it (another process, simulated by the gather, logged a term this one did not)."""
    other = {"loss/g/l1": [1.0, 1], "loss/g/bucket": [4.0, 2]}
    log = LossLog(torch.device("cpu"), lambda mine: mine + [(None, other)])
    log.add(0, {"loss/g/l1": torch.tensor(0.5), "grad_norm/g": 2.0}, [("g", torch.tensor(0.5))])
    assert log.curve == [] and len(log.pending) == 1  # nothing read back yet
    assert log.flush(row=False) is None and log.curve == [{"loss/g/l1": 0.5}]
    log.add(1, {"loss/g/l1": torch.tensor(0.25), "grad_norm/g": 4.0}, [("g", torch.tensor(0.25))])
    row = log.flush(row=True)
    assert row == {"loss/g/l1": pytest.approx((0.5 + 0.25 + 1.0) / 3), "grad_norm/g": 3.0, "loss/g/bucket": 2.0}
    assert log.last == {"loss/g/l1": 0.25, "grad_norm/g": 4.0} and log.window == {}


def test_a_non_finite_loss_on_any_process_stops_every_process_at_the_flush():
    mine = LossLog(torch.device("cpu"), lambda payload: payload + [((1, "discriminator", float("inf")), None)])
    mine.add(0, {}, [("generator", torch.tensor(1.0))])
    mine.add(1, {}, [("generator", torch.tensor(float("nan"))), ("discriminator", torch.tensor(2.0))])
    mine.add(2, {}, [("generator", torch.tensor(float("nan")))])
    # The earliest step first; at the same step, the lower process (this one, rank 0).
    with pytest.raises(FloatingPointError, match=r"^step 1: non-finite generator loss nan$"):
        mine.flush(row=False)
    theirs = LossLog(torch.device("cpu"), lambda payload: payload + [((1, "discriminator", float("inf")), None)])
    theirs.add(0, {}, [("generator", torch.tensor(1.0))])
    with pytest.raises(FloatingPointError, match=r"^step 1: non-finite discriminator loss inf$"):
        theirs.flush(row=True)  # finite here, yet it stops with the process that found one


def test_a_nan_loss_between_logging_steps_stops_training_before_the_next_state(tmp_path):
    """Losses are checked when read back (metrics rows and states), not at every step: a NaN at the fifth step
    (the engine's step 4) of a run logging every 6 steps stops it at step 6, before that state is written."""
    source = toy_batches(4, 0)

    def poisoned(epoch: int, rank: int, world: int):
        for index, batch in enumerate(source(epoch, rank, world)):
            yield {k: v.fill_(float("nan")) for k, v in batch.items()} if (epoch, index) == (1, 1) else batch

    torch.set_num_threads(1)
    with pytest.raises(FloatingPointError, match=r"^step 4: non-finite generator loss nan$"):
        train(ToyTask(), toy_config(log_every=6), poisoned, tmp_path, meta={}, resume=False, progress=False)
    assert [step for step, _ in checkpoint.step_folders(tmp_path / "checkpoints")] == [3]
    assert not (tmp_path / "model").exists()


def test_activation_checkpointing_needs_a_task_that_names_its_blocks(tmp_path):
    with pytest.raises(InputError, match="ToyTask has no blocks to checkpoint"):
        run_toy(tmp_path, toy_config(activation_checkpointing=True))


class Chain(nn.Sequential):
    """nn.Sequential with its forward written here: dynamo skips torch's own module code, so an in-place
    compiled nn.Sequential runs uncompiled, and this one does not (the stages' networks are the project's own)."""

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


def test_compile_routes_every_module_through_torch_compile(tmp_path, monkeypatch):
    """Params `train.compile`: every module's forward goes through torch.compile (here with a counting backend
    that runs the captured graphs as they are, so the weights match an eager run bit for bit)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile_(*args, **kwargs | {"backend": counter}))

    class Compilable(ToyTask):
        def build(self):
            return {name: Chain(*module) for name, module in super().build().items()}

    cfg = toy_config(steps=3, warmup_steps=1)
    for name, flag in (("eager", False), ("compiled", True)):
        torch.set_num_threads(1)
        train(Compilable(), cfg.replace(compile=flag), toy_batches(4, 0), tmp_path / name, meta={}, resume=False,
              progress=False)  # fmt: skip
        assert (counter.frame_count > 0) == flag
    assert weights_digest(tmp_path / "compiled" / "model") == weights_digest(tmp_path / "eager" / "model")


# ---------------------------------------------------------------- stage 1 through the engine


@pytest.mark.slow  # ~10 s on an idle 2-core machine (the tiny networks build and run twice)
def test_train_latent_main_runs_stage1_end_to_end_on_synthetic_shards(tmp_path, params):
    """`vasa train-latent` (vasa.cli.main) with the real LatentTask (tiny preset) on shards written here."""
    from tests.test_data_loader import write_synthetic_shards
    from vasa.cli import main as cli_main

    shards = write_synthetic_shards(
        tmp_path / "shards", {"train": [[(0, 0), (1, 1)], [(2, 0), (3, 1)]], "test": [[(4, 2)]]}, {"crop_size": 32}
    )
    section = params.train_latent.model_dump(mode="json")
    section["train"] |= {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "image_every": 2}
    section["data"] |= {"eval_pairs": 4, "workers": 0, "shuffle_buffer": 4}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json") | {"train_latent": section}))
    out = tmp_path / "run"
    torch.set_num_threads(1)
    argv = ["--params", str(params_file), "train-latent", "--shards", str(shards), "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    weights, meta = load_weights(out / "model")
    assert set(weights) == {"generator"} and meta["step"] == 2 and meta["task"]["preset"]["name"] == "tiny"
    assert meta["lineage"]["index_sha256"] == sha256_file(shards / "index.json")
    assert meta["speakers"] == ["spk0", "spk1"] and meta["params"]["train_latent"]["train"]["steps"] == 2
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    for group in ("heldout_frames", "heldout_speakers"):
        assert {"psnr_model_db", "psnr_copy_source_db", "margin_db"} <= set(metrics[group]), metrics
    grid = (out / "images" / "step_0000002.png").read_bytes()
    assert grid.startswith(b"\x89PNG")
    assert cli_main([*argv, "--resume"]) == 0  # already done: resumes at the end, rewrites outputs


# ---------------------------------------------------------------- entry point for subprocess tests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the ToyTask (used by tests/test_distributed.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--deepspeed", type=Path, help="DeepSpeed JSON (cluster/deepspeed/...)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds of sleep per step (kill tests)")
    args = parser.parse_args(argv)
    cfg = toy_config(steps=args.steps, checkpoint_every=args.checkpoint_every, log_every=1, image_every=args.steps)
    deepspeed = json.loads(args.deepspeed.read_text()) if args.deepspeed else None
    if deepspeed is not None:
        from deepspeed import ops

        # DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on first use (minutes on 2
        # cores): a speed-up only. Without it DeepSpeed all-reduces through torch.distributed (gloo).
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    batches = toy_batches(cfg.batch_size, cfg.seed)
    if args.step_delay:
        import time

        def slow(epoch, rank, world):
            for batch in batches(epoch, rank, world):
                time.sleep(args.step_delay)
                yield batch

        source = slow
    else:
        source = batches
    torch.set_num_threads(1)
    result = train(
        ToyTask(), cfg, source, args.out, meta={}, resume=args.resume, deepspeed=deepspeed,
        evaluate=toy_evaluation(cfg), progress=False,
    )  # fmt: skip
    # Every rank writes the digests of its parameters, its loss curve and the evaluation (the main process's):
    # the ranks must agree.
    summary = {"step": result.step, "digests": result.parameter_digests, "losses": result.loss_curve}
    (args.out / f"rank{result.rank}.json").write_text(json.dumps(summary | {"evaluation": result.evaluation}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_deepspeed_half_precision_runs_the_loss_under_autocast():
    """DeepSpeed's bf16 modules hold bf16 weights and Accelerate does not autocast them: the engine does, so
    an fp32 batch meets them without a dtype error. Elsewhere (DDP, CPU fp32) the engine adds nothing."""
    from vasa.training.placement import loss_autocast

    conv = torch.nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    batch = torch.rand(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="type"):
        conv(batch)
    with loss_autocast("bf16", torch.device("cpu"), deepspeed=True):
        assert conv(batch).dtype == torch.bfloat16
    for mixed, deepspeed in (("bf16", False), ("no", True), ("no", False)):
        with loss_autocast(mixed, torch.device("cpu"), deepspeed=deepspeed):
            assert not torch.is_autocast_enabled("cpu")
