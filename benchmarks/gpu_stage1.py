"""Stage-1 training steps of benchmarks/gpu_check.py, each mode (plain, ZeRO-2, ZeRO-3) timed in a child process
of its own: a clean CUDA memory peak and DeepSpeed state per mode, and a crash or a hang costs that mode only.

    python benchmarks/gpu_stage1.py SPEC.json     (what `run_child` starts; SPEC names the result file)

The child builds the engine's run (vasa/training/engine.py `_Run`: Accelerate, DeepSpeed from
cluster/deepspeed/<mode>.json with a world of one process) and times `train_step` on one synthetic batch made on
the device; it writes {"status": "ok", figures} or {"status": "error", "error", "out_of_memory", "where"}.
The step timer and the memory peak here serve every part of gpu_check.py.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from train_latent_throughput import VOXCELEB2_SPEAKERS, synthetic_batch

from vasa.core.config import LatentLossConfig, TrainConfig
from vasa.models.presets import get_preset
from vasa.training.engine import RunLayout, _Run
from vasa.training.latent_task import LatentTask

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_DIR = ROOT / "cluster" / "deepspeed"
KILL_GRACE_S = 20.0  # a child past its part's budget by this much is killed
PRECISION = {"no": "fp32"}  # Accelerate's names -> ours


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], object], warmup: int, steps: int, deadline: float, device: torch.device) -> dict:
    """`warmup` untimed calls, then timed calls: at least one, at most `steps`, none expected to end after
    `deadline` (time.time()). Mean and best wall seconds per timed call."""
    for _ in range(warmup):
        step()
    sync(device)
    times: list[float] = []
    while len(times) < steps and (not times or time.time() + sum(times) / len(times) < deadline):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"steps_timed": len(times), "step_s": sum(times) / len(times), "step_best_s": min(times)}


def peak_memory(device: torch.device, child: bool) -> dict:
    """Peak CUDA memory allocated since the last reset; on CPU the peak RSS, meaningful for a child process only."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "memory": "cuda allocated"}
    if child:
        return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory": "peak RSS"}
    return {}


def stage1_child(spec: dict) -> dict:
    """One stage-1 mode measured in this process (the child): the engine's step on a synthetic batch."""
    device = torch.device(spec["device"])
    deepspeed = None
    if spec["mode"] != "plain":
        deepspeed = json.loads((DEEPSPEED_DIR / f"{spec['mode']}.json").read_text())
        if device.type == "cpu":
            from deepspeed import ops

            # As tests/test_training_engine.py: the CPU shared-memory all-reduce is a C++ op compiled for minutes.
            ops.__compatible_ops__["deepspeed_shm_comm"] = False
    loss, cfg = LatentLossConfig.from_data(spec["loss"]), TrainConfig.from_data(spec["train"])
    preset = get_preset(spec["latent"], spec["resolution"])
    task = LatentTask(loss, preset, VOXCELEB2_SPEAKERS, crop_size=spec["resolution"])
    with tempfile.TemporaryDirectory() as tmp:
        run = _Run(task, cfg, RunLayout(Path(tmp)), deepspeed)
        torch.set_num_threads(spec["threads"])  # Accelerate sets its own count on a CPU
        batch = synthetic_batch(cfg.batch_size, preset.resolution, run.accelerator.device)
        timing = timed_steps(lambda: run.train_step([batch]), spec["warmup"], spec["steps"], spec["deadline"], device)
    precision = PRECISION.get(run.accelerator.mixed_precision, run.accelerator.mixed_precision)
    return {"batch": cfg.batch_size, "precision": precision, **timing,
            **peak_memory(device, child=True)}  # fmt: skip


def project_frames(err: BaseException, depth: int = 4) -> str:
    """The innermost `depth` traceback frames in the library, outermost first ("vasa/models/face_latent.py:107
    judge_identity > ... > vasa/models/layers.py:83 forward"), or ""."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(str(ROOT / "vasa"))]
    return " > ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in frames[-depth:])


def child_env(device: torch.device, mode: str, threads: int) -> dict[str, str]:
    """The child's environment: one thread count; for DeepSpeed a world of one process on a free local port."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed then picks its CPU accelerator
    if mode != "plain":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
    return env


def run_child(spec: dict, device: torch.device) -> dict:
    """stage1_child in a fresh interpreter; its JSON, or the error of a child that died or ran out of time."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec | {"out": str(out)}))
        timeout = max(1.0, spec["deadline"] - time.time()) + KILL_GRACE_S
        command = [sys.executable, str(Path(__file__).resolve()), str(spec_path)]
        try:
            done = subprocess.run(command, env=child_env(device, spec["mode"], spec["threads"]), capture_output=True,
                                  text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"killed after {timeout:.0f} s (over the part's budget)"}
        if out.is_file():
            return json.loads(out.read_text())
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"status": "error", "error": f"child exited with {done.returncode}: {tail[0][-500:]}"}


def main(argv: list[str] | None = None) -> None:
    """The child: measure the mode of the spec file, write the figures or the error where the spec says."""
    spec = json.loads(Path((argv if argv is not None else sys.argv[1:])[0]).read_text())
    try:
        result = {"status": "ok", **stage1_child(spec)}
    except Exception as err:  # noqa: BLE001 - the parent records it; the one GPU run still yields the rest
        oom = isinstance(err, torch.cuda.OutOfMemoryError)
        result = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000], "out_of_memory": oom,
                  "where": project_frames(err)}  # fmt: skip
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
