"""The lent-GPU check: stage-1 training (plain, ZeRO-2, ZeRO-3), the stage-2 step and sampling, and generation,
in one command that fits 8 minutes on one H100, written as JSON and as a Markdown table.

    python benchmarks/gpu_check.py --json gpu_check.json --markdown gpu_check.md [--device cuda|cpu] [--quick]
        [--budget-s 420] [--stage1-batch N] [--stage2-batch N] [--threads N] [--params params.yaml]

On CUDA: `base` presets, stage 1 at 512² (the paper's size). On CPU (`--device cpu`, or no CUDA): `tiny` at 64²,
the same code paths, DeepSpeed over gloo for the ZeRO parts (a world of one process runs on the CPU in seconds).
Parts, in order, with their budgets in seconds (a part stops timing steps when its budget is spent; a part that
would start after --budget-s is recorded as skipped; --quick: fewer steps, 10 DDIM steps, shorter audio):

  stage1_plain, stage1_zero2, stage1_zero3  (80 each) the engine's own step (vasa/training/engine.py `_Run`:
      generator loss -> backward -> AdamW, discriminator, EMA) on one synthetic batch made on the device (no
      loader, no host-to-device copy), every term of params `train_latent.loss` with the VGG19 perceptual term on
      (random weights), at the engine's precision (bf16 autocast on a GPU that has it; DeepSpeed's bf16 under
      ZeRO). Each mode runs in a child process of its own (benchmarks/gpu_stage1.py: a clean CUDA peak and
      DeepSpeed state; a crash or a hang costs that mode only), ZeRO with a world of one (MASTER_ADDR/PORT, RANK,
      WORLD_SIZE set for the child) and cluster/deepspeed/zero{2,3}.json; a CUDA out-of-memory error halves the
      batch and tries again. Figures: images/s = batch x timed steps / their wall time (after 2 untimed warm-up
      steps, 1 on CPU or with --quick), counted TFLOP/image (train_latent_throughput.count_flops: FlopCounterMode
      on the meta device, convolutions and matmuls only, a lower bound), MFU = counted FLOP/s / the GPU's dense
      bf16 peak (PEAK_TFLOPS by device name; omitted for other devices), peak memory
      (torch.cuda.max_memory_allocated; peak RSS of the child on CPU).
  stage2_step  (40) the motion DiT's engine step, W = 100 / K = 25 (the paper's window), windows/s, TFLOP per
      window (the DiT's forward + backward, counted), MFU, peak memory.
  stage2_sampling  (40) motion_sampling.time_generation: guided DDIM (audio 0.5, gaze 1.0) at 50 steps over
      W = 100 / K = 25 windows, bf16 autocast on a GPU as `vasa generate`: x real time.
  generation  (80) generate_throughput's bundle (built in memory, fresh weights, W = 25 / K = 5 as params), a
      synthetic 512² portrait: `stream` offline (frames per wall second, pasted back and crop only) after one
      untimed window, and the first-frame latency with audio arriving at real time (audio wait + compute).

A part that fails records its error string and the run goes on; the JSON and the Markdown are written at the
end whatever happened. Machine information (device, torch, CUDA, CPUs) goes into both.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from generate_throughput import (
    AUDIO_DIM,
    EMOTION_DIM,
    FPS,
    POSE_DIM,
    build_bundle,
    first_frame_latency,
    run_stream,
    speech_like,
    synthetic_portrait,
)
from gpu_stage1 import PRECISION, peak_memory, run_child, timed_steps
from motion_sampling import time_generation
from train_latent_throughput import VOXCELEB2_SPEAKERS, count_flops, with_random_perceptual

from vasa.core.config import LatentLossConfig, Params, TrainConfig, load_params
from vasa.core.files import write_json
from vasa.diffusion import NoiseSchedule
from vasa.inference.generate import autocast, open_session
from vasa.models.presets import get_motion_preset, get_preset
from vasa.training.cost import dit_flop_per_window
from vasa.training.cost import motion_windows as synthetic_windows
from vasa.training.engine import RunLayout, _Run
from vasa.training.latent_task import LatentTask
from vasa.training.motion_task import DIT, MotionTask

# Dense (no sparsity) bf16 peaks in TFLOP/s from NVIDIA's data sheets, matched in this order against
# torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
               ("A100", 312.0))  # fmt: skip
STAGE1_MODES = ("plain", "zero2", "zero3")
MIN_PART_S = 15.0  # a part with less time left than this is skipped (a child takes ~10 s to start)


@dataclass(frozen=True)
class Plan:
    """Presets, sizes and step counts of one run."""

    latent: str
    resolution: int
    stage1_batch: int
    motion: str
    stage2_batch: int
    warmup: int  # untimed steps before the timed ones
    steps: int  # timed steps at most (at least one is always timed)
    sampling_seconds: float  # audio of the stage-2 sampling run
    stream_seconds: float  # audio of each offline stream
    ddim_steps: int
    window: int = 100  # stage 2: W and K as in the VASA-1 paper
    context: int = 25


BUDGETS = {"stage1": 80.0, "stage2_step": 40.0, "stage2_sampling": 40.0, "generation": 80.0}
PLANS = {
    # stage-1 batch 4: ~11.6 GiB of saved activations per image in fp32 (counted on the meta device), about half
    # under bf16 autocast, so 4 fits 80 GB and 8 may not (an out-of-memory error halves it anyway)
    "cuda": Plan("base", 512, 4, "base", 64, warmup=2, steps=10, sampling_seconds=20.0, stream_seconds=8.0,
                 ddim_steps=50),
    "cpu": Plan("tiny", 64, 2, "tiny", 4, warmup=1, steps=3, sampling_seconds=4.0, stream_seconds=2.0, ddim_steps=50),
}  # fmt: skip
QUICK = {"warmup": 1, "steps": 2, "sampling_seconds": 4.0, "stream_seconds": 1.0, "ddim_steps": 10}


# --- measuring ------------------------------------------------------------------------------------------


def mfu(flop_per_s: float, peak_tflops: float | None) -> dict:
    return {"achieved_tflops": flop_per_s / 1e12} | ({"mfu": flop_per_s / (peak_tflops * 1e12)} if peak_tflops else {})


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accelerate": version("accelerate"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "peak_bf16_tflops": peak_tflops(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device_name": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                 "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    else:
        info["device_name"] = f"CPU ({info['cpu']}, {os.cpu_count()} cores)"
    return info


# --- stage 1: one child process per mode (benchmarks/gpu_stage1.py) -------------------------------------


def stage1(mode: str, plan: Plan, loss: LatentLossConfig, train: TrainConfig, flop_per_image: float | None,
           args: argparse.Namespace, deadline: float) -> dict:  # fmt: skip
    """One stage-1 mode, in a child process; a CUDA out-of-memory error halves the batch while time is left."""
    batch = args.stage1_batch or plan.stage1_batch
    while True:
        spec = {
            "mode": mode, "device": args.device, "latent": plan.latent, "resolution": plan.resolution,
            "loss": loss.model_dump(mode="json"), "train": train.replace(batch_size=batch).model_dump(mode="json"),
            "warmup": plan.warmup, "steps": plan.steps, "deadline": deadline, "threads": args.threads,
        }  # fmt: skip
        result = run_child(spec, torch.device(args.device))
        if not (result.get("out_of_memory") and batch > 1 and time.time() < deadline - 10):
            break
        print(f"#   {mode}: out of memory at batch {batch}, trying {batch // 2}", flush=True)
        batch //= 2
    if result.get("status", "ok") != "ok":
        return result
    images_per_s = result["batch"] / result["step_s"]
    counted = {} if flop_per_image is None else {
        "tflop_per_image": flop_per_image / 1e12,
        **mfu(images_per_s * flop_per_image, peak_tflops(torch.device(args.device))),
    }  # fmt: skip
    return {**result, "preset": plan.latent, "resolution": plan.resolution, "images_per_s": images_per_s, **counted}


# --- stage 2 --------------------------------------------------------------------------------------------


def motion_task(plan: Plan, params: Params) -> MotionTask:
    cfg = params.train_motion
    return MotionTask(
        get_motion_preset(plan.motion), motion_dim=POSE_DIM + get_preset(plan.latent).dynamics_dim,
        audio_dim=AUDIO_DIM, emotion_dim=EMOTION_DIM, window=plan.window, context=plan.context,
        diffusion=cfg.diffusion, guidance=cfg.guidance, loss=cfg.loss,
    )  # fmt: skip


def stage2_step(plan: Plan, params: Params, args: argparse.Namespace, deadline: float) -> dict[str, dict]:
    device = torch.device(args.device)
    task = motion_task(plan, params)
    train = params.train_motion.train.replace(batch_size=args.stage2_batch or plan.stage2_batch)
    with tempfile.TemporaryDirectory() as tmp:
        run = _Run(task, train, RunLayout(Path(tmp)), None)
        torch.set_num_threads(args.threads)
        batch = synthetic_windows(task, train.batch_size, run.accelerator.device)
        timing = timed_steps(lambda: run.train_step([batch]), plan.warmup, plan.steps, deadline, device)
    flop = dit_flop_per_window(task)
    windows_per_s = train.batch_size / timing["step_s"]
    return {"stage2_step": {
        "preset": plan.motion, "window": plan.window, "context": plan.context, "batch": train.batch_size,
        "precision": PRECISION.get(run.accelerator.mixed_precision, run.accelerator.mixed_precision), **timing,
        "windows_per_s": windows_per_s,
        "tflop_per_window": flop / 1e12, **mfu(windows_per_s * flop, peak_tflops(device)),
        **peak_memory(device, child=False),
    }}  # fmt: skip


def stage2_sampling(plan: Plan, params: Params, args: argparse.Namespace, deadline: float) -> dict[str, dict]:
    device = torch.device(args.device)
    task = motion_task(plan, params)
    torch.manual_seed(0)
    dit = task.build()[DIT].to(device).eval()
    schedule = NoiseSchedule(params.train_motion.diffusion)
    with autocast(device):
        wall, cpu = time_generation(dit, schedule, plan.sampling_seconds, plan.ddim_steps, True, 1, device)
    return {"stage2_sampling": {
        "preset": plan.motion, "window": plan.window, "context": plan.context, "ddim_steps": plan.ddim_steps,
        "guided": True, "audio_s": plan.sampling_seconds, "wall_s": wall, "cpu_s": cpu,
        "s_per_s_audio": wall / plan.sampling_seconds, "x_realtime": plan.sampling_seconds / wall,
        **peak_memory(device, child=False),
    }}  # fmt: skip


# --- generation -----------------------------------------------------------------------------------------


def generation(plan: Plan, params: Params, args: argparse.Namespace, deadline: float) -> dict[str, dict]:
    device, rate = torch.device(args.device), params.preprocess.sample_rate
    bundle = build_bundle(params, plan.latent, plan.resolution, crop_size=plan.resolution)
    bundle = dataclasses.replace(bundle, face=bundle.face.to(device), dit=bundle.dit.to(device), device=device)
    window_s = bundle.dit.window / FPS
    setup = {"preset": plan.latent, "resolution": plan.resolution, "dit_preset": plan.latent,
             "window": bundle.dit.window, "context": bundle.dit.context, "ddim_steps": plan.ddim_steps}  # fmt: skip
    with torch.no_grad():
        session = open_session(bundle, synthetic_portrait(plan.resolution, plan.resolution))
        run_stream(session, speech_like(window_s, rate), rate, plan.ddim_steps, crop_only=False)  # warm-up
        offline = {}
        for crop_only, key in ((False, "pasted"), (True, "crop_only")):
            wall, _, frames = run_stream(session, speech_like(plan.stream_seconds, rate), rate, plan.ddim_steps,
                                         crop_only)  # fmt: skip
            offline |= {f"fps_{key}": frames / wall, f"frames_{key}": frames}
        wait, compute, _ = first_frame_latency(session, speech_like(window_s + 0.5, rate), rate, plan.ddim_steps)
    return {
        "generation_offline": {**setup, "audio_s": plan.stream_seconds, **offline, **peak_memory(device, False)},
        "generation_streaming": {**setup, "audio_wait_s": wait, "compute_s": compute, "first_frame_s": wait + compute},
    }


# --- report ---------------------------------------------------------------------------------------------


def _cell(part: dict, key: str, form: str) -> str:
    value = part.get(key)
    return "—" if value is None else f"{value:{form}}"


def _memory(part: dict) -> str:
    return f"{part['peak_memory_gib']:.2f} GiB ({part['memory']})" if "peak_memory_gib" in part else "—"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# GPU check: {m['device_name']}", "",
        f"torch {m['torch']}, CUDA {m['cuda']}, {m['cpu_count']} CPUs, DeepSpeed {m['deepspeed']}, {m['date']}; "
        f"dense bf16 peak {m['peak_bf16_tflops'] or 'unknown (no MFU)'}; {'quick; ' if report['quick'] else ''}"
        f"{report['total_s']:.0f} s in all.", "",
        "| measurement | setup | throughput | TFLOP per item | MFU | peak memory | status |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, part in report["parts"].items():
        status = part["status"] if part["status"] == "ok" else f"{part['status']}: {part.get('error', '')}"
        status += f" (at {part['where']})" if part.get("where") else ""
        status = status.replace("|", "/").replace("\n", " ")[:300]
        setup = throughput = flop = "—"
        if part["status"] == "ok":
            setup, throughput, flop = FORMATS[name](part)
        lines.append(f"| {name} | {setup} | {throughput} | {flop} | {_cell(part, 'mfu', '.1%')} | {_memory(part)} "
                     f"| {status} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _stage1_row(p: dict) -> tuple[str, str, str]:
    return (f"{p['preset']} @ {p['resolution']}², batch {p['batch']}, {p['precision']}, {p['steps_timed']} timed steps",
            f"{p['images_per_s']:.3g} images/s", f"{_cell(p, 'tflop_per_image', '.3g')} /image")  # fmt: skip


FORMATS: dict[str, Callable[[dict], tuple[str, str, str]]] = {
    **{f"stage1_{mode}": _stage1_row for mode in STAGE1_MODES},
    "stage2_step": lambda p: (
        f"{p['preset']}, W {p['window']} / K {p['context']}, batch {p['batch']}, {p['precision']}",
        f"{p['windows_per_s']:.3g} windows/s", f"{p['tflop_per_window']:.3g} /window"),
    "stage2_sampling": lambda p: (
        f"{p['preset']}, W {p['window']} / K {p['context']}, {p['ddim_steps']} DDIM steps, guided, {p['audio_s']:g} s",
        f"{p['x_realtime']:.3g}x real time ({p['s_per_s_audio']:.3g} s per s of audio)", "—"),
    "generation_offline": lambda p: (
        f"{p['preset']} @ {p['resolution']}², W {p['window']} / K {p['context']}, {p['ddim_steps']} steps",
        f"{p['fps_pasted']:.3g} fps pasted back, {p['fps_crop_only']:.3g} crop only", "—"),
    "generation_streaming": lambda p: (
        f"{p['preset']} @ {p['resolution']}², W {p['window']} / K {p['context']}, {p['ddim_steps']} steps",
        f"first frame {p['first_frame_s']:.3g} s (audio wait {p['audio_wait_s']:.3g} + compute {p['compute_s']:.3g})",
        "—"),
}  # fmt: skip


# --- the run --------------------------------------------------------------------------------------------


def run_part(parts: dict, names: list[str], budget: float, end: float, measure: Callable[[float], dict]) -> None:
    """Measure `names` within `budget` seconds (and before `end`); a failure is recorded under every name."""
    start = time.time()
    deadline = min(start + budget, end)
    if deadline - start < MIN_PART_S:
        parts.update({name: {"status": "skipped", "error": "the run's time budget is spent"} for name in names})
    else:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            results = measure(deadline)
        except Exception as err:  # noqa: BLE001 - a failed part is a recorded status: the other parts still run
            results = {name: {"status": "error", "error": f"{type(err).__name__}: {err}"} for name in names}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for name in names:
            parts[name] = {"status": "ok", **results[name], "part_s": time.time() - start}
    for name in names:
        part = parts[name]
        figures = ", ".join(f"{k} {v:.4g}" for k, v in part.items() if isinstance(v, float) and k != "part_s")
        print(f"# {name}: {part['status']} in {time.time() - start:.0f} s; {part.get('error') or figures}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="the figures (JSON)")
    parser.add_argument("--markdown", type=Path, help="the table (Markdown)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps, shorter audio (the CPU test)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this (seconds)")
    parser.add_argument("--stage1-batch", type=int, help="stage-1 batch (default: 4 on CUDA, 2 on CPU)")
    parser.add_argument("--stage2-batch", type=int, help="stage-2 windows per step (default: 64 on CUDA, 4 on CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's count on CUDA)")
    args = parser.parse_args(argv)
    if args.json is None or args.markdown is None:
        parser.error("--json and --markdown are required")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    start = time.time()
    device = torch.device(args.device)
    args.threads = args.threads or (torch.get_num_threads() if device.type == "cuda" else 1)
    torch.set_num_threads(args.threads)
    plan = PLANS[device.type]
    plan = dataclasses.replace(plan, **QUICK) if args.quick else plan
    params = load_params(args.params)
    report = {"machine": machine_info(device), "plan": dataclasses.asdict(plan), "budgets_s": BUDGETS,
              "quick": args.quick, "parts": {}}  # fmt: skip
    print(f"# {report['machine']['device_name']}, torch {torch.__version__}, plan {report['plan']}", flush=True)
    end, parts = start + args.budget_s, report["parts"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loss = with_random_perceptual(params.train_latent.loss, Path(tmp))
            count_task = LatentTask(loss, get_preset(plan.latent, plan.resolution), VOXCELEB2_SPEAKERS,
                                    crop_size=plan.resolution)  # fmt: skip
            try:
                flop_per_image: float | None = float(count_flops(count_task, 1))
            except Exception as err:  # noqa: BLE001 - the steps are still timed, without FLOPs and MFU
                flop_per_image, report["flop_count_error"] = None, f"{type(err).__name__}: {err}"
            for mode in STAGE1_MODES:
                run_part(parts, [f"stage1_{mode}"], BUDGETS["stage1"], end,
                         lambda deadline, mode=mode: {f"stage1_{mode}": stage1(
                             mode, plan, loss, params.train_latent.train, flop_per_image, args, deadline)})  # fmt: skip
        run_part(parts, ["stage2_step"], BUDGETS["stage2_step"], end,
                 lambda deadline: stage2_step(plan, params, args, deadline))  # fmt: skip
        run_part(parts, ["stage2_sampling"], BUDGETS["stage2_sampling"], end,
                 lambda deadline: stage2_sampling(plan, params, args, deadline))  # fmt: skip
        run_part(parts, ["generation_offline", "generation_streaming"], BUDGETS["generation"], end,
                 lambda deadline: generation(plan, params, args, deadline))  # fmt: skip
    finally:
        report["total_s"] = time.time() - start
        write_json(args.json, report)
        args.markdown.write_text(markdown(report))
        print(f"# wrote {args.json} and {args.markdown} ({report['total_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
