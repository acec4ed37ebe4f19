"""Distribution and fault tolerance of the training engine, with real processes on CPU (gloo):
2-process DDP keeps the ranks' parameters identical, 2-process DeepSpeed ZeRO-2 follows DDP's loss
curve, and a run killed with SIGKILL after a checkpoint resumes to bit-identical weights.

The training script is tests/test_training_engine.py run as a module (its ToyTask)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_training_engine import run_toy, toy_config, weights_digest
from vasa.training import checkpoint  # FIXME split module

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    # one thread per process on a 2-core machine; DeepSpeed's op builds (none used: torch AdamW) cache here
    env |= {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    return env


def _launch(tmp_path: Path, launcher: list[str], out: Path, *extra: str) -> list[dict]:
    script = ["-m", "tests.test_training_engine", "--out", str(out), "--steps", "6", *extra]
    done = subprocess.run(
        [sys.executable, "-m", *launcher, *script], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]  # both ranks really ran


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# The project's 2-process CPU config (MULTI_GPU + the engine's cpu=True; `--cpu` would run ONE process).
ACCELERATE_CPU2 = ["accelerate.commands.launch", "--config_file", str(REPO / "cluster" / "accelerate" / "cpu2.yaml")]


def _mean_curve(ranks: list[dict], term: str) -> list[float]:
    """The loss a global batch sees: the mean over ranks at each step."""
    return [sum(r["losses"][step][term] for r in ranks) / len(ranks) for step in range(len(ranks[0]["losses"]))]


def test_two_process_ddp_and_deepspeed_zero2(tmp_path):
    ddp = _launch(tmp_path, ACCELERATE_CPU2, tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [6, 6]
    # Each rank sees different data (seeded seed*world+rank), so equal parameters prove the all-reduce.
    assert ddp[0]["losses"] != ddp[1]["losses"]
    assert ddp[0]["digests"] == ddp[1]["digests"]
    single = run_toy(tmp_path / "single", toy_config())
    assert single.parameter_digests["generator"] != ddp[0]["digests"]["generator"]  # it did train on 2 ranks' data

    zero2_json = str(REPO / "cluster" / "deepspeed" / "zero2.json")
    zero2 = _launch(tmp_path, TORCHRUN, tmp_path / "zero2", "--deepspeed", zero2_json)
    assert [r["step"] for r in zero2] == [6, 6]
    assert zero2[0]["digests"]["generator"] == zero2[1]["digests"]["generator"]
    for term in ("loss/generator/l1", "loss/generator/adversarial", "loss/discriminator/hinge"):
        assert _mean_curve(zero2, term) == pytest.approx(_mean_curve(ddp, term), rel=1e-4, abs=1e-5), term
    assert (tmp_path / "zero2" / "model" / "generator.safetensors").is_file()


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    steps, every = 9, 3
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "tests.test_training_engine", "--out", str(out), "--steps", str(steps),
        "--checkpoint-every", str(every), "--step-delay", "0.4",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
    first_state = checkpoint.state_dir(out / "checkpoints", every) / checkpoint.ENGINE_JSON
    deadline = time.monotonic() + 120
    while not first_state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_state.is_file(), process.stderr.read() if process.poll() is not None else "no checkpoint in time"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    killed_at = checkpoint.latest_state(out / "checkpoints")[0]
    assert killed_at < steps and not (out / "model").exists(), "the run finished before it was killed"

    resumed = subprocess.run([*command[:-2], "--resume"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    uninterrupted = tmp_path / "uninterrupted"
    run_toy(uninterrupted, toy_config(steps=steps, checkpoint_every=every, log_every=1, image_every=steps))
    assert weights_digest(out / "model") == weights_digest(uninterrupted / "model")
    assert json.loads((out / "rank0.json").read_text())["step"] == steps
