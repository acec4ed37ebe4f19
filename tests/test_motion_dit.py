"""The motion DiT (vasa/models/motion_dit.py) and its TrainTask (vasa/training/motion_task.py) on synthetic motion:
shapes, presets, condition dropout, the engine loop (loss falls, kill-and-resume is bit-identical, curves PNG).

The synthetic data (`synthetic_windows`) is also what tests/test_diffusion.py trains on: per frame
[yaw, pitch, roll, tx, ty, tz, scale, mouth, eye_theta, eye_phi] where the mouth equals a smoothed audio
envelope, yaw/pitch and the eye columns follow the gaze condition and scale follows the head distance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vasa.core.config import DiffusionConfig, GuidanceConfig, MotionLossConfig, TrainConfig
from vasa.core.weights import load_weights
from vasa.models.motion_dit import CONDITIONS, MotionDiT, count_parameters
from vasa.models.presets import MOTION_PRESETS, get_motion_preset
from vasa.training import checkpoint  # FIXME split module
from vasa.training.engine import TrainTask, train
from vasa.training.motion_task import MotionTask

WINDOW, CONTEXT = 16, 4
MOTION_DIM, AUDIO_DIM, EMOTION_DIM = 10, 8, 2
MOUTH, EYE_THETA, EYE_PHI, SCALE = 7, 8, 9, 6  # columns of the synthetic motion
GAZE_RANGE_DEG = 20.0


def diffusion_cfg(**changes) -> DiffusionConfig:
    return DiffusionConfig.from_data(
        {"train_steps": 1000, "schedule": "cosine", "sampling_steps": 10, "eta": 0.0} | changes
    )


def guidance_cfg(**changes) -> GuidanceConfig:
    return GuidanceConfig.from_data({"p_drop": 0.1, "p_drop_context": 0.5, "cfg_audio": 0.5, "cfg_gaze": 1.0} | changes)


def loss_cfg(**changes) -> MotionLossConfig:
    return MotionLossConfig.from_data({"velocity": 1.0, "smoothness": 0.0, "transition": 1.0} | changes)


def make_task(**changes) -> MotionTask:
    settings = {
        "motion_dim": MOTION_DIM, "audio_dim": AUDIO_DIM, "emotion_dim": EMOTION_DIM, "window": WINDOW,
        "context": CONTEXT, "diffusion": diffusion_cfg(), "guidance": guidance_cfg(), "loss": loss_cfg(),
    } | changes  # fmt: skip
    return MotionTask(get_motion_preset("tiny"), **settings)


def train_cfg(**changes) -> TrainConfig:
    values = {
        "steps": 6, "batch_size": 16, "grad_accum": 1, "lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.0,
        "warmup_steps": 5, "min_lr_ratio": 0.1, "clip_norm": 1.0, "ema_decay": 0.9, "precision": "fp32",
        "seed": 0, "log_every": 2, "image_every": 3, "checkpoint_every": 3, "keep_checkpoints": 2,
        "activation_checkpointing": False, "compile": False,
    }  # fmt: skip
    return TrainConfig.from_data(values | changes)


def _smooth(x: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average along the last axis, 'valid' part: (..., N + width - 1) -> (..., N)."""
    kernel = torch.ones(1, 1, width) / width
    return torch.nn.functional.conv1d(x.reshape(-1, 1, x.shape[-1]), kernel).reshape(*x.shape[:-1], -1)


AUDIO_DIRECTION = torch.nn.functional.normalize(
    torch.randn(AUDIO_DIM, generator=torch.Generator().manual_seed(7)), dim=0
)


def synthetic_clips(batch: int, frames: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`batch` synthetic clips of `frames` frames: audio (B, N, A), motion (B, N, M), gaze (B, 2) degrees,
    distance (B, 1), emotion (B, E), and the envelope (B, N) the mouth column equals."""
    envelope = _smooth(torch.randn(batch, frames + 4, generator=generator), 5)
    envelope = (envelope - envelope.mean(1, keepdim=True)) / envelope.std(1, keepdim=True).clamp_min(1e-3)
    audio = envelope[..., None] * AUDIO_DIRECTION * math.sqrt(AUDIO_DIM)
    audio = audio + 0.1 * torch.randn(batch, frames, AUDIO_DIM, generator=generator)
    gaze = (torch.rand(batch, 2, generator=generator) * 2 - 1) * GAZE_RANGE_DEG
    distance = torch.rand(batch, 1, generator=generator) * 2 - 1
    emotion = torch.randn(batch, EMOTION_DIM, generator=generator)
    t = torch.arange(frames, dtype=torch.float32)
    freq = 0.02 + 0.03 * torch.rand(batch, 6, 1, generator=generator)  # cycles per frame: 20-50 frame periods
    phase = 2 * math.pi * torch.rand(batch, 6, 1, generator=generator)
    slow = 0.4 * torch.sin(2 * math.pi * freq * t + phase)  # (B, 6, N)
    eye = gaze / GAZE_RANGE_DEG  # (B, 2) in [-1, 1]
    columns = [
        eye[:, 0:1] + slow[:, 0], eye[:, 1:2] + slow[:, 1], slow[:, 2], slow[:, 3], slow[:, 4], slow[:, 5],
        distance + 0.25 * slow[:, 0], envelope, eye[:, 0:1].expand(-1, frames), eye[:, 1:2].expand(-1, frames),
    ]  # fmt: skip
    motion = torch.stack(columns, dim=2)
    return {
        "audio": audio,
        "motion": motion,
        "gaze": gaze,
        "distance": distance,
        "emotion": emotion,
        "envelope": envelope,
    }


def synthetic_windows(batch: int, generator: torch.Generator, p_first: float = 0.2) -> dict[str, torch.Tensor]:
    """A training batch in the loader's contract: windows of WINDOW frames after CONTEXT frames of context;
    a fraction p_first are a clip's first window (zero context, has_pre False)."""
    clips = synthetic_clips(batch, CONTEXT + WINDOW, generator)
    has_pre = torch.rand(batch, generator=generator) >= p_first
    keep = has_pre[:, None, None].float()
    return {
        "motion": clips["motion"][:, CONTEXT:],
        "motion_pre": clips["motion"][:, :CONTEXT] * keep,
        "audio": clips["audio"][:, CONTEXT:],
        "audio_pre": clips["audio"][:, :CONTEXT] * keep,
        "has_pre": has_pre,
        "gaze": clips["gaze"],
        "distance": clips["distance"],
        "emotion": clips["emotion"],
    }


def synthetic_source(batch_size: int, seed: int):
    """Engine batch source: a pure function of (seed, epoch, rank), so a resumed run sees the same batches."""

    def source(epoch: int, rank: int, world: int):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
        while True:
            yield synthetic_windows(batch_size, generator)

    return source


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP workers otherwise spin against each other
    (docs/BENCHMARKS.md, stage 2), and one thread keeps CPU results bit-stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_motion(out, cfg: TrainConfig, task: MotionTask | None = None, resume: bool = False):
    return train(
        task or make_task(),
        cfg,
        synthetic_source(cfg.batch_size, cfg.seed),
        out,
        meta={},
        resume=resume,
        progress=False,
    )


# ---------------------------------------------------------------- the network


def test_presets_and_base_size_matches_the_paper():
    assert set(MOTION_PRESETS) == {"tiny", "base"}
    base = get_motion_preset("base")
    assert (base.layers, base.width, base.heads) == (8, 512, 8)
    # VASA-1 reports ~29M parameters; with 7 + 256 motion dims and 4 x 80 log-mel features ours has 29.15M.
    count = count_parameters(MotionDiT(base, 263, 320, 8, window=100, context=25))
    assert 27e6 < count < 31e6, count
    with pytest.raises(KeyError, match="known"):
        get_motion_preset("huge")


def test_forward_shapes_and_zero_initialised_output():
    torch.manual_seed(0)
    model = MotionDiT(get_motion_preset("tiny"), MOTION_DIM, AUDIO_DIM, EMOTION_DIM, WINDOW, CONTEXT)
    batch = synthetic_windows(3, torch.Generator().manual_seed(0))
    out = model(torch.randn(3, WINDOW, MOTION_DIM), torch.tensor([0, 500, 999]), batch)
    assert out.shape == (3, WINDOW, MOTION_DIM)
    assert torch.count_nonzero(out) == 0  # DiT's zero-initialised head: the first prediction is the data mean
    with pytest.raises(ValueError, match="window/context"):
        model(torch.randn(3, WINDOW + 1, MOTION_DIM), torch.zeros(3, dtype=torch.long), batch)
    with pytest.raises(KeyError, match="unknown conditions"):
        model(torch.randn(3, WINDOW, MOTION_DIM), torch.zeros(3), batch, {"pitch": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="context"):
        MotionDiT(get_motion_preset("tiny"), MOTION_DIM, AUDIO_DIM, EMOTION_DIM, window=4, context=8)


def _perturbed_model() -> MotionDiT:
    """A tiny DiT with random (non-zero) heads, so every input reaches the output."""
    torch.manual_seed(1)
    model = MotionDiT(get_motion_preset("tiny"), MOTION_DIM, AUDIO_DIM, EMOTION_DIM, WINDOW, CONTEXT)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_each_condition_reaches_the_output_and_dropping_it_uses_the_null_embedding():
    model = _perturbed_model()
    batch = synthetic_windows(2, torch.Generator().manual_seed(3), p_first=0.0)
    x, t = torch.randn(2, WINDOW, MOTION_DIM), torch.tensor([100, 700])
    base = model(x, t, batch)
    changed = {
        "audio": {"audio": torch.randn_like(batch["audio"])},
        "gaze": {"gaze": batch["gaze"] + 10},
        "distance": {"distance": batch["distance"] + 1},
        "emotion": {"emotion": batch["emotion"] + 1},
        "context": {"motion_pre": batch["motion_pre"] + 1, "audio_pre": batch["audio_pre"] + 1},
    }
    yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    for name in CONDITIONS:
        other = batch | changed[name]
        assert not torch.allclose(model(x, t, other), base), f"{name} does not reach the output"
        # Dropped, the condition's value no longer matters: only the null embedding is seen.
        assert torch.equal(model(x, t, other, {name: yes}), model(x, t, batch, {name: yes})), name
        # A mask selects per sample.
        mixed = model(x, t, other, {name: torch.tensor([True, False])})
        assert torch.equal(mixed[0], model(x, t, batch, {name: yes})[0])
        assert torch.equal(mixed[1], model(x, t, other, {name: no})[1])
    # No previous window (a clip's first window) is the null context, whatever motion_pre holds.
    first = batch | {"has_pre": no}
    assert torch.equal(model(x, t, first | changed["context"]), model(x, t, batch, {"context": yes}))


# ---------------------------------------------------------------- the task in the engine


def test_task_satisfies_the_protocol_and_logs_every_term_and_noise_bucket():
    task = make_task()
    assert isinstance(task, TrainTask)
    torch.manual_seed(0)
    models = task.build()
    batch = synthetic_windows(8, torch.Generator().manual_seed(0))
    total, terms = task.loss("dit", models, batch, {})
    assert total.ndim == 0 and total.requires_grad
    buckets = [f"x0_by_noise/t_{lo}-{lo + 250}" for lo in (0, 250, 500, 750)]
    assert set(terms) == {"x0", "velocity", "transition", "total", *buckets}  # smoothness weight 0: not computed
    expected = terms["x0"] + terms["velocity"] + terms["transition"]
    assert float(terms["total"]) == pytest.approx(float(expected), rel=1e-6)
    # Noise levels are stratified: each quarter of [0, T) holds 2 of the 8 samples.
    t = task.schedule.sample_timesteps(8, torch.device("cpu"))
    assert sorted((t // 250).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    off = make_task(loss=loss_cfg(velocity=0.0, transition=0.0))
    _, terms = off.loss("dit", models, batch, {})
    assert set(terms) == {"x0", "total", *buckets}
    with pytest.raises(KeyError):
        task.loss("discriminator", models, batch, {})
    json.dumps(task.describe())


@pytest.mark.slow
def test_training_through_the_engine_lowers_the_loss_and_writes_curves(tmp_path):
    cfg = train_cfg(steps=40, log_every=10, image_every=40, checkpoint_every=40)
    result = run_motion(tmp_path, cfg)
    x0 = [row["loss/dit/x0"] for row in result.loss_curve]
    first, last = np.mean(x0[:5]), np.mean(x0[-5:])
    assert last < 0.6 * first, (first, last)
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"t_0-250", "t_750-1000"} <= set(metrics["loss"]["dit"]["x0_by_noise"])  # loss by noise level, plotted
    weights, meta = load_weights(tmp_path / "model")
    assert meta["task"]["task"] == "train_motion" and set(weights) == {"dit"}
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "images" / "step_0000040.png"))
    assert png.ndim == 3 and png.shape[2] >= 3 and png.std() > 0  # curves drawn, not a blank canvas


class Killed(Exception):
    """Stands for SIGKILL: raised by the batch source once the step-3 state is on disk."""


def test_kill_and_resume_gives_identical_weights(tmp_path):
    cfg = train_cfg(steps=6, checkpoint_every=3)
    straight = run_motion(tmp_path / "straight", cfg)
    source = synthetic_source(cfg.batch_size, cfg.seed)

    def dies_in_second_epoch(epoch, rank, world):
        if epoch == 1:
            raise Killed
        yield from source(epoch, rank, world)

    with pytest.raises(Killed):
        train(make_task(), cfg, dies_in_second_epoch, tmp_path / "killed", meta={}, resume=False, progress=False)
    assert [s for s, _ in checkpoint.complete_states(tmp_path / "killed" / "checkpoints")] == [3]
    resumed = train(make_task(), cfg, source, tmp_path / "killed", meta={}, resume=True, progress=False)
    assert resumed.step == 6 and resumed.parameter_digests == straight.parameter_digests
    a, _ = load_weights(tmp_path / "straight" / "model")
    b, _ = load_weights(tmp_path / "killed" / "model")
    assert all(torch.equal(a["dit"][k], b["dit"][k]) for k in a["dit"])


def test_images_are_uint8_curves_and_deterministic():
    task = make_task()
    torch.manual_seed(0)
    model = task.build()["dit"].eval()
    batch = synthetic_windows(2, torch.Generator().manual_seed(0))
    first = task.images({"dit": model}, batch)
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    assert np.array_equal(first, task.images({"dit": model}, batch))


def test_config_validation():
    with pytest.raises(ValueError, match="sampling_steps"):
        diffusion_cfg(train_steps=20, sampling_steps=50)
    with pytest.raises(ValueError):
        diffusion_cfg(schedule="sigmoid")
    with pytest.raises(ValueError):
        guidance_cfg(p_drop=1.0)
    with pytest.raises(ValueError):
        loss_cfg(velocity=-1.0)
