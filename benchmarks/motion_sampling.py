"""Stage-2 sampling speed: seconds of compute per second of audio for the motion DiT (`tiny`, `base`) at 10
and 50 DDIM steps, with and without classifier-free guidance. This is the budget of the real-time path.

    python benchmarks/motion_sampling.py [--presets tiny base] [--steps 10 50] [--seconds 8] [--threads 2]
        [--window 100] [--context 25] [--dynamics-dim 256] [--audio-dim 320] [--emotion-dim 8] [--device cpu]

Generation runs exactly as in use (vasa.diffusion.generate: window by window, each window conditioned on the
last K generated frames), from freshly initialised weights (the cost does not depend on their values) with
M = 7 pose columns + --dynamics-dim, A = --audio-dim (4 x 80 log-mel) per video frame at 25 fps. Guidance
"on" uses the paper's two guided conditions (audio, gaze): each DDIM step is one batched forward call of
3 sequences instead of 1. Each configuration runs once untimed (warm-up), then --repeats times; the best wall
time is reported with the process CPU time of that run (wall time on a shared machine depends on the other
load). Figures: s compute / s audio, and x real time = audio seconds / wall seconds (> 1: faster than 25 fps
playback); the ratio column compares with the same preset at the largest step count without guidance,
measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from vasa.core.config import DiffusionConfig
from vasa.diffusion import NoiseSchedule, generate
from vasa.models.motion_dit import MotionDiT, count_parameters
from vasa.models.presets import get_motion_preset

FPS = 25
POSE_DIM = 7


def time_generation(model: MotionDiT, schedule: NoiseSchedule, seconds: float, steps: int, guided: bool,
                    repeats: int, device: torch.device) -> tuple[float, float]:  # fmt: skip
    """Best wall seconds and that run's process CPU seconds to generate `seconds` of motion."""
    frames = round(seconds * FPS)
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(1, frames, model.audio_dim, generator=g).to(device)
    gaze, distance, emotion = torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, model.emotion_dim)
    scales = {"audio": 0.5, "gaze": 1.0} if guided else None
    best = (float("inf"), 0.0)
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        out = generate(model, schedule, audio, gaze, distance, emotion, steps=steps, eta=0.0, scales=scales, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert out.shape[1] == frames
        if attempt > 0 and wall < best[0]:  # attempt 0 warms up (allocator, kernels)
            best = (wall, cpu)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--seconds", type=float, default=8.0, help="audio length generated per run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--context", type=int, default=25)
    parser.add_argument("--dynamics-dim", type=int, default=256)
    parser.add_argument("--audio-dim", type=int, default=320)
    parser.add_argument("--emotion-dim", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"# device {device} ({name}), torch {torch.__version__}, {args.threads} CPU threads")
    print(f"# W={args.window} K={args.context} M={POSE_DIM + args.dynamics_dim} A={args.audio_dim} "
          f"E={args.emotion_dim}, {args.seconds:g} s of audio per run, fp32")  # fmt: skip
    schedule = NoiseSchedule(
        DiffusionConfig.from_data({"train_steps": 1000, "schedule": "cosine", "sampling_steps": 1, "eta": 0.0})
    )
    header = f"{'preset':6} {'params':>8} {'steps':>5} {'cfg':>3} {'wall_s':>8} {'cpu_s':>8} {'s/s_audio':>9} "
    print(header + f"{'x_realtime':>10} {'vs_ref':>7}")
    for preset_name in args.presets:
        torch.manual_seed(0)
        model = MotionDiT(
            get_motion_preset(preset_name), POSE_DIM + args.dynamics_dim, args.audio_dim, args.emotion_dim,
            args.window, args.context,
        ).to(device).eval()  # fmt: skip
        results = {}
        for steps in sorted(args.steps, reverse=True):
            for guided in (False, True):
                results[steps, guided] = time_generation(
                    model, schedule, args.seconds, steps, guided, args.repeats, device
                )
        reference = results[max(args.steps), False][0]
        for (steps, guided), (wall, cpu) in sorted(results.items()):
            print(
                f"{preset_name:6} {count_parameters(model) / 1e6:7.2f}M {steps:5d} {'on' if guided else 'off':>3} "
                f"{wall:8.3f} {cpu:8.3f} {wall / args.seconds:9.4f} {args.seconds / wall:10.2f} "
                f"{reference / wall:6.2f}x"
            )


if __name__ == "__main__":
    main()
