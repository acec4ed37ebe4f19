"""vasa/diffusion.py: noise schedule, DDIM, classifier-free guidance and sliding-window generation; and what a
`tiny` motion DiT trained for a few seconds on synthetic motion learns (tests/test_motion_dit.py builds the data):
mouth dynamics follow the audio, gaze and head distance steer the motion, window borders do not jump."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_motion_dit import (
    AUDIO_DIM,
    CONTEXT,
    EMOTION_DIM,
    EYE_PHI,
    EYE_THETA,
    MOTION_DIM,
    MOUTH,
    SCALE,
    WINDOW,
    _one_thread,  # noqa: F401 (autouse fixture: one intra-op thread in this module too)
    _perturbed_model,
    diffusion_cfg,
    loss_cfg,
    make_task,
    synthetic_clips,
    synthetic_windows,
)
from vasa.diffusion import NoiseSchedule, ddim_sample, generate, guided_denoiser, sliding_windows, x0_loss

FPS = 25


# ---------------------------------------------------------------- schedule and sampler


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_run_from_signal_to_noise(schedule):
    sched = NoiseSchedule(diffusion_cfg(schedule=schedule))
    a = sched.alphas_cumprod
    assert a.shape == (1000,) and bool((a[1:] < a[:-1]).all())
    assert a[0] > 0.99 and a[-1] < 0.01
    x0, noise = torch.ones(2, 3, 4), torch.randn(2, 3, 4)
    x_t = sched.add_noise(x0, torch.tensor([0, 999]), noise)
    assert torch.allclose(x_t[0], x0[0], atol=0.1) and torch.allclose(x_t[1], noise[1], atol=0.1)
    assert sched.sampling_timesteps(4) == [999, 749, 499, 249]
    assert len(sched.sampling_timesteps(50)) == 50 and sched.sampling_timesteps(50)[0] == 999
    with pytest.raises(ValueError):
        sched.sampling_timesteps(1001)


def test_x0_loss_is_per_sample_mean_square():
    a, b = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    b[1] = 2.0
    assert x0_loss(a, b).tolist() == [0.0, 4.0]


def test_ddim_with_a_perfect_denoiser_returns_its_x0_and_is_deterministic_under_a_seed():
    sched = NoiseSchedule(diffusion_cfg())
    target = torch.linspace(-1, 1, 12).view(1, 4, 3)

    def oracle(x, t):
        return target.expand_as(x)

    def run(seed, eta=0.0, denoise=oracle, steps=10):
        return ddim_sample(
            denoise, sched, (2, 4, 3), steps, eta, torch.Generator().manual_seed(seed), torch.device("cpu")
        )

    assert torch.allclose(run(0), target.expand(2, 4, 3))

    # A denoiser that uses x_t: the result depends on the initial noise, and only on the seed.
    def shrink(x, t):
        return 0.5 * x

    assert torch.equal(run(3, denoise=shrink), run(3, denoise=shrink))
    assert not torch.equal(run(3, denoise=shrink), run(4, denoise=shrink))
    assert torch.equal(run(3, eta=1.0, denoise=shrink), run(3, eta=1.0, denoise=shrink))
    assert not torch.equal(run(3, eta=1.0, denoise=shrink), run(3, eta=0.0, denoise=shrink))


# ---------------------------------------------------------------- classifier-free guidance


def _cond(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "motion"}


def test_guidance_scales_zero_reproduce_the_unguided_model_exactly():
    model = _perturbed_model()
    sched = NoiseSchedule(diffusion_cfg())
    cond = _cond(synthetic_windows(2, torch.Generator().manual_seed(0)))

    def sample(denoise):
        return ddim_sample(denoise, sched, (2, WINDOW, MOTION_DIM), 5, 0.0, torch.Generator().manual_seed(0), "cpu")

    with torch.no_grad():
        plain = sample(lambda x, t: model(x, t, cond))
        zero = sample(guided_denoiser(model, cond, {"audio": 0.0, "gaze": 0.0, "distance": 0.0}))
        guided = sample(guided_denoiser(model, cond, {"audio": 0.5, "gaze": 1.0}))
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, guided)


def test_guidance_follows_the_per_condition_formula():
    model = _perturbed_model()
    cond = _cond(synthetic_windows(2, torch.Generator().manual_seed(1)))
    x, t = torch.randn(2, WINDOW, MOTION_DIM), torch.tensor([400, 400])
    yes = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        full = model(x, t, cond)
        no_audio = model(x, t, cond, {"audio": yes})
        no_gaze = model(x, t, cond, {"gaze": yes})
        guided = guided_denoiser(model, cond, {"audio": 0.5, "gaze": 1.0})(x, t)
    expected = (1 + 0.5 + 1.0) * full - 0.5 * no_audio - 1.0 * no_gaze  # VASA-1 §3.2
    assert torch.allclose(guided, expected, atol=1e-5)


# ---------------------------------------------------------------- sliding windows


class Recorder:
    """Forward pre-hook: the frames each sequence of a forward call spans (context + window) and the batch."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self.contexts: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x_t, _, cond = args[:3]
        self.calls.append((x_t.shape[0], x_t.shape[1] + cond["motion_pre"].shape[1]))
        self.contexts.append(cond["motion_pre"][:1].clone())


def test_sixty_seconds_of_audio_give_exactly_1500_frames_window_by_window():
    model = _perturbed_model()
    sched = NoiseSchedule(diffusion_cfg())
    seconds = 60
    audio = torch.randn(1, seconds * FPS, AUDIO_DIM)
    recorder = Recorder(model)
    out = generate(
        model, sched, audio, torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, EMOTION_DIM),
        steps=2, eta=0.0, scales={"audio": 0.5, "gaze": 1.0}, seed=0,
    )  # fmt: skip
    assert out.shape == (1, 1500, MOTION_DIM) and bool(torch.isfinite(out).all())
    windows = math.ceil(1500 / WINDOW)
    assert len(recorder.calls) == windows * 2  # one batched (guided) call per DDIM step per window
    # Memory is bounded by one window: every call sees 3 sequences (conditional + 2 unconditional) of
    # K + W frames, whatever the audio length.
    assert set(recorder.calls) == {(3, CONTEXT + WINDOW)}


def test_each_window_is_conditioned_on_the_last_generated_frames():
    model = _perturbed_model()
    sched = NoiseSchedule(diffusion_cfg())
    audio = torch.randn(1, 3 * WINDOW - 5, AUDIO_DIM)  # the last window is cut: 2 full + 11 frames
    recorder = Recorder(model)
    windows = list(
        sliding_windows(
            model, sched, audio, torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, EMOTION_DIM),
            steps=1, eta=0.0, scales=None, seed=0,
        )
    )  # fmt: skip
    assert [(start, frames.shape[1]) for start, frames in windows] == [(0, WINDOW), (WINDOW, WINDOW), (2 * WINDOW, 11)]
    assert torch.count_nonzero(recorder.contexts[0]) == 0  # the first window: null context
    for index in (1, 2):
        previous = windows[index - 1][1]
        assert torch.equal(recorder.contexts[index], previous[:, -CONTEXT:])
    again = [frames for _, frames in sliding_windows(
        model, sched, audio, torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, EMOTION_DIM),
        steps=1, eta=0.0, scales=None, seed=0,
    )]  # fmt: skip
    assert all(torch.equal(a, b) for a, (_, b) in zip(again, windows, strict=True))  # deterministic under a seed


# ---------------------------------------------------------------- what a briefly trained tiny DiT learns

TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 400, 32, 2e-3
EVAL_CLIPS, EVAL_FRAMES = 8, 10 * WINDOW
GUIDED = {"audio": 0.5, "gaze": 1.0}  # VASA-1's defaults


@pytest.fixture(scope="module")
def trained():
    """A tiny DiT trained for 400 steps (~15 s of CPU) on the synthetic motion, with a strong window-transition
    term, and the task that holds its schedule. Plain AdamW loop over MotionTask.loss (the engine's own
    behaviour is tested in test_motion_dit.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module fixture runs before the function-scoped _one_thread
    task = make_task(loss=loss_cfg(transition=10.0))
    torch.manual_seed(0)
    model = task.build()["dit"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    generator = torch.Generator().manual_seed(0)
    for step in range(TRAIN_STEPS):
        warm = min(1.0, (step + 1) / 20)
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / TRAIN_STEPS))
        for group in optimizer.param_groups:
            group["lr"] = TRAIN_LR * warm * cosine
        loss, _ = task.loss("dit", {"dit": model}, synthetic_windows(TRAIN_BATCH, generator), {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    yield task, model.eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def held_out():
    return synthetic_clips(EVAL_CLIPS, EVAL_FRAMES, torch.Generator().manual_seed(123))


def _generate(trained, clips, **changes):
    task, model = trained
    inputs = {k: clips[k] for k in ("audio", "gaze", "distance", "emotion")} | changes
    return generate(model, task.schedule, **inputs, steps=10, eta=0.0, scales=GUIDED, seed=0)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.slow
def test_generated_mouth_follows_the_true_audio_not_the_shuffled_audio(trained, held_out):
    shuffle = torch.randperm(EVAL_FRAMES, generator=torch.Generator().manual_seed(5))
    true = _generate(trained, held_out)
    shuffled = _generate(trained, held_out, audio=held_out["audio"][:, shuffle])
    r_true = np.mean([_pearson(true[i, :, MOUTH], held_out["envelope"][i]) for i in range(EVAL_CLIPS)])
    r_shuffled = np.mean([_pearson(shuffled[i, :, MOUTH], held_out["envelope"][i]) for i in range(EVAL_CLIPS)])
    # Measured: r_true 0.99, r_shuffled 0.04 (the mouth then follows the shuffled envelope instead).
    assert r_true > 0.8 and r_true - r_shuffled > 0.5, (r_true, r_shuffled)


@pytest.mark.slow
def test_gaze_and_head_distance_conditions_steer_the_generated_motion(trained, held_out):
    """The synthetic eye columns equal gaze / 20°, and scale follows the head distance."""
    up = _generate(trained, held_out, gaze=torch.full((EVAL_CLIPS, 2), 15.0))
    down = _generate(trained, held_out, gaze=torch.full((EVAL_CLIPS, 2), -15.0))
    for column in (EYE_THETA, EYE_PHI):  # expected difference 2 x 15 / 20 = 1.5
        assert float(up[:, :, column].mean() - down[:, :, column].mean()) > 1.0, column
    near = _generate(trained, held_out, distance=torch.full((EVAL_CLIPS, 1), 0.8))
    far = _generate(trained, held_out, distance=torch.full((EVAL_CLIPS, 1), -0.8))
    assert float(near[:, :, SCALE].mean() - far[:, :, SCALE].mean()) > 1.0  # expected 1.6


@pytest.mark.slow
def test_pose_jump_at_window_borders_is_no_larger_than_within_windows(trained, held_out):
    motion = _generate(trained, held_out)
    jumps = (motion[:, 1:, :7] - motion[:, :-1, :7]).abs().mean(dim=(0, 2))  # (N-1,): frame i -> i+1, pose
    border = torch.zeros(EVAL_FRAMES - 1, dtype=torch.bool)
    border[torch.arange(WINDOW, EVAL_FRAMES, WINDOW) - 1] = True  # last frame of a window -> first of the next
    ratio = float(jumps[border].mean() / jumps[~border].mean())
    # Measured 1.00 (border 0.138, within 0.138 mean |Δ| per pose column, normalised units); 1.3-1.7 with a
    # transition weight of 1.
    assert ratio <= 1.1, (float(jumps[border].mean()), float(jumps[~border].mean()))
