"""Stage-1 training throughput: images/s, FLOPs per image and parameter counts of `tiny` and `base`.

    python benchmarks/train_latent_throughput.py [--configs tiny:64:8 tiny:256:4 base:512:1] [--steps 2]
        [--threads 2] [--peak-tflops 989] [--mfu 0.3] [--clips 1.1e6] [--samples-per-clip 1]
        [--activation-checkpointing] [--compile]

One training step = what the engine does per iteration (vasa/training/engine.py): the generator's loss
(all terms of params `train_latent.loss`, the perceptual VGG19 included with random weights unless
--no-perceptual) backward + AdamW step, then the discriminator's. An "image" is one training sample
(a source/driver/other triple whose driver frame is reconstructed). FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode on the meta device (vasa/training/cost.py, as `vasa plan` counts
them: convolutions, matmuls; grid_sample and elementwise ops are not counted, so the figure is a lower
bound); images/s is the best of the timed steps after the first (the first alone when --steps 1); the
process CPU time of that step is printed too, since wall time on a shared machine depends on the other
load. MFU = counted FLOP/s / --peak-tflops where a peak is given (a GPU's dense bf16 peak). The
projection gives GPU-hours for one VoxCeleb2 epoch at an assumed peak and MFU: clips x samples-per-clip
x FLOPs/image / (peak x MFU).

--activation-checkpointing and --compile switch on what params `train.activation_checkpointing` and
`train.compile` switch on in the engine (the generator's warping and decoder blocks recompute in backward;
every module through torch.compile: its first step includes the compilation). "activations" is what
autograd keeps for the generator loss's backward: the distinct tensors saved for it (parameters excluded)
plus the inputs the recomputing blocks keep, measured once before the timed steps.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vasa.core.config import LatentLossConfig, load_params
from vasa.losses import VGG19Features
from vasa.models.layers import Recomputed
from vasa.models.presets import get_preset
from vasa.training.cost import count_flops
from vasa.training.cost import latent_batch as synthetic_batch
from vasa.training.latent_task import LatentTask

VOXCELEB2_SPEAKERS = 5994  # dev identities: the CosFace head's size at scale


def with_random_perceptual(cfg: LatentLossConfig, folder: Path) -> LatentLossConfig:
    """`cfg` with the VGG19 perceptual term on, its weights random and saved into `folder` (the term's cost does
    not depend on the weights, and nothing is downloaded)."""
    weights = folder / "vgg19.safetensors"
    state = {f"features.{k}": v.contiguous() for k, v in VGG19Features().features.state_dict().items()}
    save_file(state, str(weights))
    return cfg.replace(perceptual=max(cfg.perceptual, 1.0), perceptual_weights=str(weights))


def train_step(task: LatentTask, models: dict, optims: dict, batch: dict) -> None:
    """Generator then discriminator, each loss -> backward -> AdamW step (the engine's order)."""
    scratch: dict = {}
    for name in task.update_order():
        optims[name].zero_grad(set_to_none=True)
        loss, _ = task.loss(name, models, batch, scratch)
        loss.backward()
        optims[name].step()


def activation_bytes(task: LatentTask, models: dict, batch: dict) -> int:
    """Bytes autograd keeps for the generator loss's backward: the distinct storages saved for it (parameters
    excluded) and, with activation checkpointing, the inputs its recomputing blocks hold instead."""
    params = {p.untyped_storage().data_ptr() for m in models.values() for p in m.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def keep_input(_block: torch.nn.Module, args: tuple) -> None:
        keep(args[0])

    blocks = [m for m in models["generator"].modules() if isinstance(m, Recomputed) and m.recompute]
    hooks = [block.register_forward_pre_hook(keep_input) for block in blocks]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss, _ = task.loss("generator", models, batch, {})
    for hook in hooks:
        hook.remove()
    loss.backward()
    for module in models.values():
        module.zero_grad(set_to_none=True)
    return sum(kept.values())


def measure(
    task: LatentTask,
    batch_size: int,
    steps: int,
    device: torch.device,
    checkpointing: bool = False,
    compile_: bool = False,
) -> dict:
    """Parameter counts, activation memory and step times (wall and process CPU) of one preset/resolution/batch."""
    torch.manual_seed(0)
    models = {name: m.to(device) for name, m in task.build().items()}
    if checkpointing:
        task.checkpoint_activations(models)
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.5, 0.999)) for name, m in models.items()}
    batch = synthetic_batch(batch_size, task.preset.resolution, device)
    activations = activation_bytes(task, models, batch)
    if compile_:
        for module in models.values():
            module.compile()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(task, models, optims, batch)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    best = 1 + min(range(steps - 1), key=lambda i: times[1 + i]) if steps > 1 else 0
    params = {f"G.{n}": sum(p.numel() for p in m.parameters()) for n, m in models["generator"].named_children()}
    params["G"] = sum(p.numel() for p in models["generator"].parameters())
    params["D"] = sum(p.numel() for p in models["discriminator"].parameters())
    return {
        "step_s": times[best],
        "step_cpu_s": cpu_times[best],
        "first_step_s": times[0],
        "images_per_s": batch_size / times[best],
        "activation_mib": activations / 2**20,
        "params": params,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--configs",
        nargs="*",
        default=["tiny:64:8", "tiny:256:2", "base:256:1"],
        help="preset:resolution:batch entries",
    )
    parser.add_argument(
        "--count-only",
        nargs="*",
        default=["tiny:512:1", "base:256:1", "base:512:1"],
        help="preset:resolution:batch entries whose FLOPs and parameters are counted without running them",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per config (the first counts FLOPs)")
    parser.add_argument("--base-steps", type=int, default=1, help="steps for `base` configs (slow on a CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-perceptual", action="store_true", help="leave the VGG19 perceptual term out")
    parser.add_argument("--peak-tflops", type=float, help="peak of this device (for MFU), e.g. 989 for H100 bf16")
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="projection: GPU dense bf16 peak")
    parser.add_argument("--mfu", type=float, default=0.3, help="projection: assumed model FLOPs utilisation")
    parser.add_argument("--clips", type=float, default=1.1e6, help="projection: VoxCeleb2 clips")
    parser.add_argument("--samples-per-clip", type=float, default=1.0, help="projection: training samples per clip")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="as params train.activation_checkpointing"
    )
    parser.add_argument("--compile", action="store_true", help="as params train.compile (torch.compile every module)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_params(args.params).train_latent.loss
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {device}, torch {torch.__version__}; perceptual {'off' if args.no_perceptual else 'on'}; "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, "
        f"compile {'on' if args.compile else 'off'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_perceptual:
            cfg = with_random_perceptual(cfg, Path(tmp))
        rows = []
        for entry in args.configs + args.count_only:
            name, resolution, batch = entry.split(":")
            preset = get_preset(name, int(resolution))
            task = LatentTask(cfg, preset, VOXCELEB2_SPEAKERS, crop_size=int(resolution))
            flops = count_flops(task, int(batch))
            if entry in args.configs:
                steps = args.base_steps if name == "base" else args.steps
                result = measure(
                    LatentTask(cfg, preset, VOXCELEB2_SPEAKERS, crop_size=int(resolution)), int(batch), steps, device,
                    args.activation_checkpointing, args.compile,
                )  # fmt: skip
            else:
                with torch.device("meta"):
                    models = task.build()
                result = {
                    "params": {
                        "G": sum(p.numel() for p in models["generator"].parameters()),
                        "D": sum(p.numel() for p in models["discriminator"].parameters()),
                    }
                }
            result["flops_per_step"] = flops
            rows.append((entry, result))
            _report(entry, preset.volume_shape, int(batch), result, args)
    print("\nparameters (millions):")
    for entry, result in rows:
        print(f"  {entry:12s} " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in result["params"].items()))


def _report(entry: str, volume: tuple, batch: int, result: dict, args: argparse.Namespace) -> None:
    per_image = result["flops_per_step"] / batch
    images = args.clips * args.samples_per_clip
    gpu_hours = images * per_image / (args.gpu_peak_tflops * 1e12 * args.mfu) / 3600
    line = f"{entry:12s} volume {'x'.join(map(str, volume))}: {per_image / 1e9:.1f} GFLOP/image"
    if "step_s" in result:
        achieved = result["flops_per_step"] / result["step_s"]
        mfu = f", MFU {achieved / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
        line += (
            f", {result['images_per_s']:.3f} images/s (step {result['step_s']:.2f} s wall, "
            f"{result['step_cpu_s']:.2f} s CPU; first {result['first_step_s']:.2f} s), "
            f"{achieved / 1e9:.1f} GFLOP/s{mfu}, activations {result['activation_mib']:.1f} MiB"
        )
    else:
        line += " (counted, not run)"
    print(
        f"{line}; epoch of {images:.3g} samples = {gpu_hours:.2f} GPU-h at {args.gpu_peak_tflops:g} TFLOP/s "
        f"x MFU {args.mfu}"
    )


if __name__ == "__main__":
    main()
