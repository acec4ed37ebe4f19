"""Generation throughput: the real-time budget of `vasa generate`, part by part, counted and measured.

    python benchmarks/generate_throughput.py [--configs tiny:256 tiny:512 base:256 base:512]
        [--stream-configs tiny:256 tiny:512] [--seconds 2] [--render-frames 10] [--base-frames 2] [--threads 1]
        [--gpu-tflops 989] [--utilisation 0.3] [--quick]

Each config is a face preset at an image side; the motion DiT preset has the same name (tiny with tiny,
base with base), W = 25 frames, K = 5 context, A = 320 (4 x 80 log-mel), E = 2 emotion columns, as the
bundle of tests/test_generate.py, built in memory from freshly initialised weights (the cost does not
depend on their values; the DiT's zero-initialised output head gets N(0, 0.02) weights so the motion
moves). fp32 on the CPU.

Counted (torch.utils.flop_counter.FlopCounterMode on the meta device: convolutions, matmuls, attention;
grid_sample, norms and elementwise ops are not counted, so every figure is a lower bound):
  encode     once per portrait: face.encode + face.canonical
  DiT        one guided denoiser call ((1 + 2 guided conditions) sequences of K + W tokens) x steps, per
             window of W frames; also at W = 100 / K = 25
  render     face.render, per frame
The projection divides the per-frame FLOPs (DiT window / W + render) into an assumed GPU throughput
(--gpu-tflops x --utilisation): frames per second if the GPU did only these FLOPs, and the first-frame
compute of `stream` (one DiT window + the window's W renderings) at that throughput. Small batches do not
reach that utilisation: the ATen operators that compute (views excluded) are counted too, one eager GPU
kernel launch each, and the first window's 50 DiT calls + ceil(W / --render-batch) renderer calls at
--launch-us per launch give a floor that FLOPs do not show (CUDA graphs or compilation lower it).

Measured on this CPU (--threads torch and OpenCV threads; best of the timed runs, process CPU time beside;
--repeats timed runs, 1 for --slow-presets):
  encode      `open_session` on a synthetic portrait (its timings["encode_s"]), once
  DiT         `sliding_windows` over --dit-seconds of audio, guided (λ_audio 0.5, λ_gaze 1.0), 10 and 50 steps
  render      `generate.render` (uint8 crops): --render-frames frames in one batch after a 1-frame warm-up;
              --slow-presets (`base`: seconds per frame on a CPU) --base-frames single frames, no warm-up
  paste-back  `generate.paste_back` of 25 crops into a 512² portrait (crop side --crop-size)
  stream      `stream` over --seconds of speech-like audio (white noise under a 4 Hz syllable envelope) in
              100 ms chunks, crop_only and pasted back, for --stream-configs; frames per wall second, once each
              (after one untimed log-mel call: librosa's first call in a process compiles, timed and printed)
  latency     the same audio arriving at real time in 100 ms chunks: from the first chunk's arrival to the
              first yielded frame chunk, split into the audio wait (the chunk that completes the first
              window: W / 25 s plus the STFT's half window, inherent to the windowed design) and compute
  components  1 / (DiT s per frame at the stream's steps + render + paste-back): the stream's fps predicted
              from the parts, for configs whose stream is not run
Ratios printed: each renderer against the 25 fps budget (40 ms per frame), and each config against the
first config measured in the same run. --quick measures tiny:256 alone (1 s streams) and counts the rest.

Real-time figures (issue 22; printed, and written to --json OUT with the machine's load):
  audio_lookahead_ms  the most audio `stream` has read past the end of a frame when it yields that frame, over
                      every frame chunk yielded before the audio ends (20 ms chunks, counted in samples, not
                      timed): the floor of any latency, whatever the hardware
  first_frame_ms      the tests' tiny bundle (`tiny` at its own side, crop side params preprocess.crop_size, the
                      low-latency stream's params generate.stream_hop / stream_lookahead / stream_steps) on this
                      CPU, a synthetic 512² portrait, audio arriving at real time in 20 ms chunks: from the first
                      chunk's arrival to the first pasted-back frame (= the wait for the chunk that completes the
                      first window + compute; *_compute_cpu_ms: that compute in process CPU time). offline_*: the
                      same for whole windows at --stream-steps. first_frame_ms_crop512: a face crop of --crop-size
  post_ms_per_frame_512 / _1024   CPU-ms per frame of everything after the renderer (paste-back, watermark,
                      RGB -> I420, libx264 and 48 kHz stereo AAC, pipelined as `vasa generate` runs them) into a 512² /
                      1024² portrait over 100 frames (a 4 s clip, --quick too): benchmarks/generate_post.py, which
                      also breaks it down by stage
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from generate_post import load_average, measure_post  # benchmarks/generate_post.py, beside this script
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from preprocessing.audio import log_mel
from vasa.core.config import DiffusionConfig, Params, load_params
from vasa.diffusion import NoiseSchedule, guided_denoiser, sliding_windows
from vasa.inference.bundle import Bundle, bundle_meta
from vasa.inference.generate import Conditions, limit_threads, open_session, render, stream
from vasa.inference.portrait import Portrait, paste_back
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_dit import MotionDiT
from vasa.models.motion_encoder import EXPRESSION_DIMS
from vasa.models.presets import get_motion_preset, get_preset

FPS = 25
POSE_DIM = 7
AUDIO_DIM = 4 * 80  # 4 log-mel frames x 80 mels per video frame
EMOTION_DIM = 2
SCALES = {"audio": 0.5, "gaze": 1.0}  # VASA-1's guidance: 1 + 2 sequences per denoiser call
BUDGET_MS = 1000 / FPS  # one frame of 25 fps playback
PORTRAIT_SIDE = 512
CHUNK_S = 0.1  # a microphone's chunk
LIVE_CHUNK_S = 0.02  # the real-time figures' chunk (a WebSocket client's or an audio callback's)
GOALS = {"audio_lookahead_ms": 200, "first_frame_ms": 400, "post_ms_per_frame_512": 5, "post_ms_per_frame_1024": 15}
WINDOW, CONTEXT = 25, 5  # the bundle's (params train_motion); (100, 25) is counted too


@dataclass
class Row:
    config: str
    params_m: tuple[float, float] = (0.0, 0.0)  # face, DiT (millions)
    gflop: dict[str, float] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)  # computing ATen operators per call
    measured: dict[str, float] = field(default_factory=dict)


# --- building blocks ---------------------------------------------------------------------------------


def build_networks(name: str, resolution: int, window: int, context: int) -> tuple[FaceLatent, MotionDiT]:
    """Freshly initialised face latent model and motion DiT of one preset name (on the current device)."""
    face = FaceLatent(get_preset(name, resolution), n_speakers=2)
    dit = MotionDiT(get_motion_preset(name), POSE_DIM + face.preset.dynamics_dim, AUDIO_DIM, EMOTION_DIM,
                    window, context)  # fmt: skip
    return face, dit


def build_bundle(params: Params, name: str, resolution: int, crop_size: int) -> Bundle:
    """The bundle tests/test_generate.py writes, built in memory (loading is not part of the per-frame cost)."""
    torch.manual_seed(0)
    window, context = WINDOW, CONTEXT
    face, dit = build_networks(name, resolution, window, context)
    torch.nn.init.normal_(dit.out.weight, std=0.02)  # zero-initialised head: make the motion move
    motion_dim = dit.motion_dim
    task = {
        "preset": dit.preset.describe(), "motion_dim": motion_dim, "audio_dim": AUDIO_DIM, "emotion_dim": EMOTION_DIM,
        "window": window, "context": context, "diffusion": params.train_motion.diffusion.model_dump(),
        "guidance": params.train_motion.guidance.model_dump(),
    }  # fmt: skip
    normalisation = {
        "motion": {"mean": [0.0] * motion_dim, "std": [0.3] * 3 + [0.02] * 4 + [0.5] * (motion_dim - POSE_DIM)},
        "audio": {"mean": [-8.0] * AUDIO_DIM, "std": [3.0] * AUDIO_DIM},
    }
    meta = bundle_meta(params, face, 2, task, normalisation, {"benchmark": True})
    meta["crop"]["crop_size"] = crop_size  # real data's crop side (the sample corpus uses 128)
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return Bundle(face.eval(), dit.eval(), meta, digest, torch.device("cpu"))


def synthetic_portrait(resolution: int, crop_size: int, side: int = PORTRAIT_SIDE) -> Portrait:
    """A smooth random (side, side) RGB frame whose central 70 % box is the face crop."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    frame = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    box = 0.7 * side
    x0 = y0 = (side - box) / 2
    scale = crop_size / box
    transform = np.array([[scale, 0, -scale * x0], [0, scale, -scale * y0]], np.float64)
    crop = cv2.warpAffine(frame, transform, (crop_size, crop_size), flags=cv2.INTER_LINEAR)
    crop = cv2.resize(crop, (resolution, resolution), interpolation=cv2.INTER_AREA)
    full = cv2.warpAffine(frame, transform, (crop_size, crop_size), flags=cv2.INTER_LINEAR)
    return Portrait(
        frame=frame,
        transform=transform,
        crop=np.ascontiguousarray(crop),
        crop_full=full,
        full_transform=transform,
        gaze=np.zeros(2, np.float32),
        distance=0.0,
        emotion=np.zeros(EMOTION_DIM, np.float32),
        faces=1,
        expression=np.full(EXPRESSION_DIMS, np.nan, np.float32),
    )  # fmt: skip (NaN: the encoder's estimate)


def speech_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """(N,) float32 white noise under a 4 Hz syllable envelope, peak ~0.3."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.sin(np.pi * 4 * t) ** 2 * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t) ** 2)
    noise = np.random.default_rng(seed).normal(0, 0.1, len(t))
    return (noise * envelope).astype(np.float32)


def conditions(steps: int) -> Conditions:
    zeros = np.zeros(2, np.float32)
    return Conditions(gaze=zeros, distance=0.0, emotion=np.zeros(EMOTION_DIM, np.float32), cfg_audio=SCALES["audio"],
                      cfg_gaze=SCALES["gaze"], steps=steps, seed=0)  # fmt: skip


def schedule_for(bundle: Bundle, steps: int) -> NoiseSchedule:
    sampling = bundle.meta["sampling"]
    return NoiseSchedule(DiffusionConfig(train_steps=sampling["train_steps"], schedule=sampling["schedule"],
                                         sampling_steps=steps, eta=sampling["eta"]))  # fmt: skip


# --- counted -----------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators that compute (views excluded): about one GPU kernel launch each in eager mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def count_flops(name: str, resolution: int, windows: list[tuple[int, int]]) -> dict[str, float]:
    """FLOPs (meta device): encode + canonical per portrait, render per frame, one guided denoiser call
    per (W, K)."""
    out = {}
    with torch.device("meta"):
        face, _ = build_networks(name, resolution, *windows[0])
        image = torch.zeros(1, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter:
            code = face.encode(image)
            canonical = face.canonical(code, image)
        out["encode"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter, OpCounter() as ops:
            face.render(canonical, code.z_id, code.pose, code.dyn)
        out["render"] = counter.get_total_flops()
        out["render_ops"] = ops.ops
        for window, context in windows:
            dit = MotionDiT(get_motion_preset(name), POSE_DIM + face.preset.dynamics_dim, AUDIO_DIM, EMOTION_DIM,
                            window, context)  # fmt: skip
            m = dit.motion_dim
            cond = {
                "motion_pre": torch.zeros(1, context, m), "audio_pre": torch.zeros(1, context, AUDIO_DIM),
                "audio": torch.zeros(1, window, AUDIO_DIM), "has_pre": torch.ones(1, dtype=torch.bool),
                "gaze": torch.zeros(1, 2), "distance": torch.zeros(1, 1), "emotion": torch.zeros(1, EMOTION_DIM),
            }  # fmt: skip
            denoise = guided_denoiser(dit, cond, SCALES)
            with FlopCounterMode(display=False) as counter, OpCounter() as ops:
                denoise(torch.zeros(1, window, m), torch.zeros(1, dtype=torch.long))
            out[f"dit_call_w{window}"] = counter.get_total_flops()
            out[f"dit_ops_w{window}"] = ops.ops
    return out


# --- measured ----------------------------------------------------------------------------------------


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Best wall seconds of `repeats` calls (after one untimed call if `warmup`) and that call's CPU seconds."""
    if warmup:
        fn()
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best, (wall, cpu))
    return best


def time_dit(bundle: Bundle, seconds: float, steps: int, repeats: int) -> tuple[float, float]:
    """Wall and CPU seconds per second of audio of guided sliding-window sampling."""
    frames = round(seconds * FPS)
    audio = torch.randn(1, frames, AUDIO_DIM, generator=torch.Generator().manual_seed(0))
    schedule = schedule_for(bundle, steps)
    zeros = torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, EMOTION_DIM)

    def run() -> None:
        for _ in sliding_windows(bundle.dit, schedule, audio, *zeros, steps=steps, eta=0.0, scales=SCALES, seed=0):
            pass

    wall, cpu = timed(run, repeats, warmup=steps <= 10)  # the 10-step run warms the 50-step one up
    return wall / seconds, cpu / seconds


def session_motion(session, frames: int) -> torch.Tensor:
    """(frames, 7 + Z) model-unit motion around the portrait's own: small changes of pose and dynamics."""
    noise = torch.randn(frames, session.own_motion.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    return session.own_motion.expand(frames, -1) + noise


def time_render(session, frames: int, batch: int, repeats: int, warmup: bool) -> tuple[float, float, np.ndarray]:
    """Wall and CPU ms per frame of `render` (`frames` frames in batches of `batch`) and the crops."""
    motion = session_motion(session, frames)
    crops: list[np.ndarray] = []

    def run() -> None:
        crops[:] = [render(session, motion, batch)]

    wall, cpu = timed(run, repeats, warmup)
    return 1000 * wall / frames, 1000 * cpu / frames, crops[0]


def run_stream(session, audio: np.ndarray, rate: int, steps: int, crop_only: bool) -> tuple[float, float, int]:
    """Wall and CPU seconds of `stream` over the whole audio (100 ms chunks, offline) and the frames it made."""
    wall, cpu = time.perf_counter(), time.process_time()
    frames = sum(len(c) for c in stream(session, _chunks(audio, rate), conditions(steps), crop_only=crop_only))
    return time.perf_counter() - wall, time.process_time() - cpu, frames


def first_frame_latency(
    session,
    audio: np.ndarray,
    rate: int,
    steps: int,
    chunk_s: float = CHUNK_S,
    render_batch: int = 25,
    hop: int | None = None,
    lookahead: int = 0,
) -> tuple[float, float, float]:
    """Audio arriving at real time in `chunk_s` chunks (pasted-back frames): seconds from the first chunk's
    arrival to the arrival of the chunk that completed the first window (audio wait), from there to the
    first yielded frame chunk (compute), and the process CPU seconds of that compute (what load on other
    cores does not inflate)."""
    arrivals: list[float] = []
    cpu: list[float] = []

    def microphone() -> Iterator[np.ndarray]:
        start = time.perf_counter()
        for index, piece in enumerate(_chunks(audio, rate, chunk_s)):
            ready = start + (index + 1) * chunk_s  # chunk i holds audio up to (i + 1) x chunk_s
            time.sleep(max(0.0, ready - time.perf_counter()))
            arrivals.append(time.perf_counter())
            cpu.append(time.process_time())
            yield piece

    frames = stream(session, microphone(), conditions(steps), render_batch=render_batch, hop=hop, lookahead=lookahead)
    next(frames)
    first, first_cpu = time.perf_counter(), time.process_time()
    frames.close()
    return arrivals[-1] - arrivals[0], first - arrivals[-1], first_cpu - cpu[-1]


def audio_lookahead(
    session,
    audio: np.ndarray,
    rate: int,
    steps: int,
    chunk_s: float = LIVE_CHUNK_S,
    hop: int | None = None,
    lookahead: int = 0,
) -> float:
    """Seconds of audio `stream` has read past the end of a frame when it yields it, the most over the frame
    chunks yielded before the audio ends (the end of the audio releases the rest early)."""
    pulled, ended = [0], [False]

    def source() -> Iterator[np.ndarray]:
        for piece in _chunks(audio, rate, chunk_s):
            pulled[0] += len(piece)
            yield piece
        ended[0] = True

    worst, done = 0.0, 0
    for frames in stream(session, source(), conditions(steps), crop_only=True, hop=hop, lookahead=lookahead):
        if not ended[0]:
            worst = max(worst, pulled[0] / rate - (done + 1) / FPS)
        done += len(frames)
    return worst


def _chunks(audio: np.ndarray, rate: int, chunk_s: float = CHUNK_S) -> Iterator[np.ndarray]:
    size = int(round(rate * chunk_s))
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


def real_time_figures(params: Params, args: argparse.Namespace) -> dict:
    """The --json figures of the module docstring."""
    rate, name = params.preprocess.sample_rate, "tiny"
    bundle = build_bundle(params, name, get_preset(name).resolution, params.preprocess.crop_size)
    session = open_session(bundle, synthetic_portrait(bundle.resolution, params.preprocess.crop_size))
    seconds = 2 * bundle.dit.window / FPS + 0.5
    gen = params.generate
    out: dict = {}
    # Low latency (`vasa serve`: params generate.stream_hop / stream_lookahead) and offline (`vasa generate`).
    # The low-latency stream draws its windows in generate.stream_steps DDIM steps (when set), offline --stream-steps.
    live_steps = gen.stream_steps or args.stream_steps
    for prefix, hop, ahead, steps in (("", gen.stream_hop, gen.stream_lookahead, live_steps),
                                      ("offline_", None, 0, args.stream_steps)):  # fmt: skip
        lookahead = audio_lookahead(session, speech_like(seconds, rate), rate, steps, hop=hop, lookahead=ahead)
        audio = speech_like(bundle.dit.window / FPS + 0.5, rate)
        wait, compute, compute_cpu = first_frame_latency(session, audio, rate, steps, LIVE_CHUNK_S, gen.render_batch,
                                                         hop, ahead)  # fmt: skip
        out[f"{prefix}audio_lookahead_ms"] = 1000 * lookahead
        out[f"{prefix}first_frame_ms"] = 1000 * (wait + compute)
        out[f"{prefix}first_frame_wait_ms"], out[f"{prefix}first_frame_compute_ms"] = 1000 * wait, 1000 * compute
        out[f"{prefix}first_frame_compute_cpu_ms"] = 1000 * compute_cpu
    # The same low-latency first frame from a portrait whose face crop is --crop-size (real data's 512, not the
    # sample corpus's): the renderer then composes at that side.
    real = build_bundle(params, name, get_preset(name).resolution, args.crop_size)
    big = open_session(real, synthetic_portrait(real.resolution, args.crop_size))
    wait, compute, compute_cpu = first_frame_latency(big, speech_like(real.dit.window / FPS + 0.5, rate), rate,
                                                     live_steps, LIVE_CHUNK_S, gen.render_batch, gen.stream_hop,
                                                     gen.stream_lookahead)  # fmt: skip
    out[f"first_frame_ms_crop{args.crop_size}"] = 1000 * (wait + compute)
    out[f"first_frame_compute_cpu_ms_crop{args.crop_size}"] = 1000 * compute_cpu
    out["first_frame_config"] = (
        f"tiny at {bundle.resolution}², crop side {params.preprocess.crop_size} (and {args.crop_size}: "
        f"*_crop{args.crop_size}), {live_steps} DDIM steps "
        f"({args.stream_steps} offline), "
        f"render_batch {gen.render_batch}, W {bundle.dit.window}, hop {gen.stream_hop} + look-ahead "
        f"{gen.stream_lookahead} frames (offline_*: whole windows), {LIVE_CHUNK_S * 1000:.0f} ms chunks"
    )
    frames = 100  # a 4 s clip, as generate_post.py's default
    post = {side: measure_post(params.generate, side, args.crop_size, frames, params.generate.render_batch)
            for side in (512, 1024)}  # fmt: skip
    for side, figures in post.items():
        out[f"post_ms_per_frame_{side}"] = figures["post_cpu_ms"]
    out["post"] = {str(side): figures for side, figures in post.items()}
    out["goals"] = {key: {"goal": goal, "met": out[key] <= goal} for key, goal in GOALS.items()}
    return out


# --- one config ----------------------------------------------------------------------------------------


def measure(params: Params, name: str, resolution: int, args: argparse.Namespace) -> dict[str, float]:
    rate = params.preprocess.sample_rate
    bundle = build_bundle(params, name, resolution, args.crop_size)
    portrait = synthetic_portrait(resolution, args.crop_size)
    out: dict[str, float] = {}
    with torch.no_grad():
        session = open_session(bundle, portrait)
        out["encode_s"] = session.timings["encode_s"]
        slow = name in args.slow_presets
        repeats = 1 if slow else args.repeats
        for steps in (10, 50):
            out[f"dit{steps}_s"], out[f"dit{steps}_cpu_s"] = time_dit(bundle, args.dit_seconds, steps, repeats)
        if slow:  # seconds per frame: single frames, the best of them
            times = [time_render(session, 1, 1, repeats=1, warmup=False) for _ in range(args.base_frames)]
            out["render_ms"], out["render_cpu_ms"], crops = min(times, key=lambda t: t[0])
        else:
            time_render(session, 1, 1, repeats=1, warmup=False)
            out["render_ms"], out["render_cpu_ms"], crops = time_render(
                session, args.render_frames, args.render_frames, repeats, warmup=False
            )
        out["render_frames"] = args.base_frames if slow else args.render_frames
        many = np.repeat(crops[:1], FPS, axis=0)
        wall, cpu = timed(lambda: paste_back(portrait, many, 0.12), args.repeats)
        out["paste_ms"], out["paste_cpu_ms"] = 1000 * wall / len(many), 1000 * cpu / len(many)
        for kind in ("", "_cpu"):
            per_frame_s = (
                out[f"dit{args.stream_steps}{kind}_s"] / FPS + (out[f"render{kind}_ms"] + out[f"paste{kind}_ms"]) / 1000
            )
            out[f"component{kind}_fps"] = 1 / per_frame_s
        if f"{name}:{resolution}" in args.stream_configs:
            audio = speech_like(args.seconds, rate)
            for crop_only, key in ((True, "crop"), (False, "paste")):
                wall, cpu, count = run_stream(session, audio, rate, args.stream_steps, crop_only)
                assert count == int(args.seconds * FPS), count
                out[f"stream_{key}_fps"], out[f"stream_{key}_cpu_fps"] = count / wall, count / cpu
            wait, compute, _ = first_frame_latency(session, speech_like(bundle.dit.window / FPS + 0.5, rate), rate,
                                                   args.stream_steps)  # fmt: skip
            out["wait_s"], out["compute_s"] = wait, compute
        else:  # one DiT window + W renderings + W paste-backs, from the parts
            window = bundle.dit.window
            out["compute_est_s"] = (
                out[f"dit{args.stream_steps}_s"] * window / FPS + window * (out["render_ms"] + out["paste_ms"]) / 1000
            )
    return out


# --- report ------------------------------------------------------------------------------------------


def report_counted(rows: list[Row], args: argparse.Namespace) -> None:
    throughput = args.gpu_tflops * 1e12 * args.utilisation
    print(f"\n## counted FLOPs and the projection at {args.gpu_tflops:g} TFLOP/s x {args.utilisation:.0%} "
          f"= {throughput / 1e12:.0f} TFLOP/s effective (W 25 / K 5, guided: 3 sequences per call)\n")  # fmt: skip
    print(
        "| config | params face / DiT | encode GFLOP | DiT GFLOP/frame 10 / 50 steps (W100/K25 at 50) "
        "| render GFLOP/frame | total GFLOP/frame (50 steps) | projected fps | projected first-frame compute "
        f"| ops: DiT call / render | first-frame launch floor at {args.launch_us:g} µs/op |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        g = row.gflop
        dit10, dit50 = g["dit_call_w25"] * 10 / 25, g["dit_call_w25"] * 50 / 25
        dit100 = g["dit_call_w100"] * 50 / 100
        total = dit50 + g["render"]
        first_ms = (g["dit_call_w25"] * 50 + WINDOW * g["render"]) * 1e9 / throughput * 1000
        dit_ops, render_ops = row.ops["dit_ops_w25"], row.ops["render_ops"]
        launch_ms = (50 * dit_ops + render_ops * math.ceil(WINDOW / args.render_batch)) * args.launch_us / 1000
        print(f"| {row.config} | {row.params_m[0]:.1f} M / {row.params_m[1]:.2f} M | {g['encode']:.1f} "
              f"| {dit10:.3f} / {dit50:.3f} ({dit100:.3f}) | {g['render']:.2f} | {total:.2f} "
              f"| {throughput / (total * 1e9):,.0f} | {first_ms:.1f} ms | {dit_ops} / {render_ops} "
              f"| {launch_ms:.0f} ms |")  # fmt: skip


def report_measured(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\n## measured on this CPU ({args.threads} torch thread(s), fp32; wall, CPU in brackets)\n")
    print(
        "| config | encode s | DiT s per s audio, 10 / 50 steps | render ms/frame (frames) | render vs 40 ms "
        "| paste-back ms/frame | stream fps crop / pasted | from parts fps | first frame: wait + compute |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = row.measured
        if not m:
            continue
        stream_cell = (f"{m['stream_crop_fps']:.2f} / {m['stream_paste_fps']:.2f} "
                       f"({m['stream_crop_cpu_fps']:.2f} / {m['stream_paste_cpu_fps']:.2f})"
                       if "stream_crop_fps" in m else "not run")  # fmt: skip
        latency = (f"{m['wait_s']:.2f} s + {m['compute_s']:.2f} s" if "wait_s" in m
                   else f"(W/25 s) + {m['compute_est_s']:.0f} s from parts")  # fmt: skip
        print(f"| {row.config} | {m['encode_s']:.2f} | {m['dit10_s']:.3f} / {m['dit50_s']:.3f} "
              f"({m['dit10_cpu_s']:.3f} / {m['dit50_cpu_s']:.3f}) "
              f"| {m['render_ms']:.1f} ({m['render_cpu_ms']:.1f}; {m['render_frames']:.0f}) "
              f"| {m['render_ms'] / BUDGET_MS:.2f}x | {m['paste_ms']:.2f} ({m['paste_cpu_ms']:.2f}) "
              f"| {stream_cell} | {m['component_fps']:.2f} ({m['component_cpu_fps']:.2f}) | {latency} |")  # fmt: skip
    measured = [r for r in rows if r.measured]
    if len(measured) > 1:
        ref = measured[0]
        print(f"\nratios against {ref.config} (same run): render time, DiT time at 50 steps, counted render FLOPs")
        for row in measured[1:]:
            print(f"  {row.config:10s} render {row.measured['render_ms'] / ref.measured['render_ms']:7.1f}x, "
                  f"DiT {row.measured['dit50_s'] / ref.measured['dit50_s']:6.1f}x, "
                  f"render FLOPs {row.gflop['render'] / ref.gflop['render']:7.1f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--configs", nargs="*", default=["tiny:256", "tiny:512", "base:256", "base:512"],
                        help="preset:resolution entries, measured and counted")  # fmt: skip
    parser.add_argument("--count-only", nargs="*", default=[], help="preset:resolution entries only counted")
    parser.add_argument(
        "--stream-configs", nargs="*", default=["tiny:256", "tiny:512"], help="configs whose stream is run"
    )
    parser.add_argument("--slow-presets", nargs="*", default=["base"], help="presets rendered frame by frame")
    parser.add_argument("--seconds", type=float, default=2.0, help="audio of each stream run")
    parser.add_argument("--dit-seconds", type=float, default=1.0, help="audio of each DiT timing")
    parser.add_argument("--stream-steps", type=int, default=50, choices=(10, 50), help="DDIM steps of the streams")
    parser.add_argument("--render-frames", type=int, default=10, help="frames per render timing (fast presets)")
    parser.add_argument("--base-frames", type=int, default=2, help="single frames rendered for slow presets")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--crop-size", type=int, default=512, help="crop side in the portrait (real data: 512)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="projection: dense bf16 peak (H100 SXM)")
    parser.add_argument("--utilisation", type=float, default=0.3, help="projection: assumed FLOPs utilisation")
    parser.add_argument("--launch-us", type=float, default=5.0, help="projection: µs per eager GPU kernel")
    parser.add_argument("--render-batch", type=int, default=25, help="projection: frames per renderer call")
    parser.add_argument("--quick", action="store_true", help="tiny:256 measured, the rest counted; 1 s streams")
    parser.add_argument("--json", type=Path, help="write the real-time figures (and the machine's load) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.count_only = [c for c in args.configs + args.count_only if c != "tiny:256"]
        args.configs, args.stream_configs, args.seconds, args.repeats = ["tiny:256"], ["tiny:256"], 1.0, 1
    limit_threads(args.threads)  # torch, OpenCV and the BLAS pools, as vasa generate / serve set them
    params = load_params(args.params)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, fp32 CPU; W {params.train_motion.window} K {params.train_motion.context}, "
          f"A {AUDIO_DIM}, E {EMOTION_DIM}, guidance {SCALES}; stream {args.seconds:g} s at "
          f"{args.stream_steps} steps; portrait {PORTRAIT_SIDE}², crop side {args.crop_size}")  # fmt: skip
    if (params.train_motion.window, params.train_motion.context) != (WINDOW, CONTEXT):
        print(f"# note: params train_motion uses W {params.train_motion.window} K {params.train_motion.context}; "
              f"this benchmark runs W {WINDOW} K {CONTEXT}")  # fmt: skip
    if args.configs:  # librosa's first call compiles (numba): once per process, kept out of the stream figures
        rate, start = params.preprocess.sample_rate, time.perf_counter()
        log_mel(speech_like(0.2, rate), rate, FPS, params.preprocess.audio)
        print(f"# first log-mel call of this process (librosa warm-up): {time.perf_counter() - start:.2f} s")
    rows = []
    for entry in args.configs + args.count_only:
        name, resolution = entry.split(":")
        with torch.device("meta"):
            face, dit = build_networks(name, int(resolution), WINDOW, CONTEXT)
        counted = count_flops(name, int(resolution), [(WINDOW, CONTEXT), (100, 25)])
        face_params = sum(p.numel() for n, p in face.named_parameters() if not n.startswith("identity_head"))
        row = Row(entry, (face_params / 1e6, sum(p.numel() for p in dit.parameters()) / 1e6),
                  {k: v / 1e9 for k, v in counted.items() if "ops" not in k},
                  {k: v for k, v in counted.items() if "ops" in k})  # fmt: skip
        if entry in args.configs:
            start = time.perf_counter()
            row.measured = measure(params, name, int(resolution), args)
            print(f"# {entry} measured in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(row)
    report_counted(rows, args)
    report_measured(rows, args)
    load_before = load_average()
    figures = real_time_figures(params, args)
    report_real_time(figures)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                   "torch": torch.__version__, "load_average": [load_before, load_average()]}  # fmt: skip
        args.json.write_text(json.dumps({"machine": machine} | figures, indent=1) + "\n")


def report_real_time(figures: dict) -> None:
    print(f"\n## real time (goals: issue 22); first frame: {figures['first_frame_config']}\n")
    print("| figure | measured | goal | met |")
    print("|---|---|---|---|")
    for key, goal in figures["goals"].items():
        print(f"| {key} | {figures[key]:.1f} | <= {goal['goal']} | {'yes' if goal['met'] else 'no'} |")
    print(f"(first frame = {figures['first_frame_wait_ms']:.0f} ms audio wait + "
          f"{figures['first_frame_compute_ms']:.0f} ms compute)")  # fmt: skip


if __name__ == "__main__":
    main()
