"""MotionTask: stage 2 (VASA-1 §3.2) as a `TrainTask` of the shared engine (vasa/training/engine.py).

One module, "dit" (the motion DiT, EMA kept). Each step noises the batch's motion windows at stratified noise
levels, drops conditions for classifier-free guidance (p_drop for audio, gaze, distance, emotion; p_drop_context
for the previous window's X_pre/A_pre) and minimises the x0 loss ‖X0 − H(Xt, t, C)‖² plus the optional terms of
params `train_motion.loss` (velocity, smoothness, window transition: the anchors needed them against flicker,
JoyVASA, Ditto). The x0 loss is also logged by noise-level bucket (`x0_by_noise/t_0-250` ... for T = 1000).

Batch contract (float32 unless noted; from the motion loader):
    motion (B, W, M), motion_pre (B, K, M): normalised [pose (7), z_dyn]; audio (B, W, A), audio_pre (B, K, A);
    has_pre (B,) bool; gaze (B, 2) degrees; distance (B, 1); emotion (B, E).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor, nn

from vasa.core.config import DiffusionConfig, GuidanceConfig, MotionLossConfig
from vasa.diffusion import NoiseSchedule, ddim_sample, guided_denoiser, x0_loss
from vasa.models.motion_dit import CONDITIONS, MotionDiT
from vasa.models.motion_encoder import POSE_DIM
from vasa.models.presets import MotionPreset

DIT = "dit"
LOSS_BUCKETS = 4  # the x0 loss is logged separately for 4 equal ranges of noise level
POSE_CURVES = (("yaw", 0), ("pitch", 1), ("roll", 2), ("scale", 6))  # columns of the normalised motion
IMAGE_SEED = 0  # the logged curves are sampled from a fixed seed: images of two steps differ only by the model


class MotionTask:
    """Stage-2 training task for windows of `window` frames after `context` frames of a previous window."""

    def __init__(
        self,
        preset: MotionPreset,
        *,
        motion_dim: int,
        audio_dim: int,
        emotion_dim: int,
        window: int,
        context: int,
        diffusion: DiffusionConfig,
        guidance: GuidanceConfig,
        loss: MotionLossConfig,
    ) -> None:
        self.preset = preset
        self.dims = {"motion_dim": motion_dim, "audio_dim": audio_dim, "emotion_dim": emotion_dim}
        self.window, self.context = window, context
        self.diffusion, self.guidance, self.loss_cfg = diffusion, guidance, loss
        self.schedule = NoiseSchedule(diffusion)

    # --- the TrainTask protocol -------------------------------------------------------------------

    def build(self) -> dict[str, nn.Module]:
        return {DIT: MotionDiT(self.preset, **self.dims, window=self.window, context=self.context)}

    def update_order(self) -> list[str]:
        return [DIT]

    def ema_modules(self) -> list[str]:
        return [DIT]

    def describe(self) -> dict:
        """Preset, data dims, window/context and the diffusion/guidance/loss settings, as plain JSON."""
        info = {
            "task": "train_motion",
            "preset": self.preset.describe(),
            **self.dims,
            "window": self.window,
            "context": self.context,
            "diffusion": self.diffusion.model_dump(mode="json"),
            "guidance": self.guidance.model_dump(mode="json"),
            "loss": self.loss_cfg.model_dump(mode="json"),
        }
        return json.loads(json.dumps(info))

    def guidance_scales(self) -> dict[str, float]:
        """λ per condition for sampling (VASA-1: audio 0.5, gaze 1.0)."""
        return {"audio": self.guidance.cfg_audio, "gaze": self.guidance.cfg_gaze}

    def loss(
        self, name: str, models: dict[str, nn.Module], batch: dict[str, Tensor], scratch: dict
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x0 loss (+ weighted extra terms) of one batch; logged terms are detached 0-dim tensors. The noise
        levels, noise and dropout masks come from the global RNG the engine seeds per rank (and restores on
        resume)."""
        if name != DIT:
            raise KeyError(f"MotionTask has no module {name!r}; modules: {self.update_order()}")
        x0 = batch["motion"]  # (B, W, M)
        b, device = x0.shape[0], x0.device
        t = self.schedule.sample_timesteps(b, device)
        x_t = self.schedule.add_noise(x0, t, torch.randn_like(x0))
        p = {c: self.guidance.p_drop for c in CONDITIONS} | {"context": self.guidance.p_drop_context}
        drop = {c: torch.rand(b) < p[c] for c in CONDITIONS}
        prediction = models[DIT](x_t, t, batch, drop)
        per_sample = x0_loss(prediction, x0)
        terms = {"x0": per_sample.mean()}
        cfg = self.loss_cfg
        if cfg.velocity > 0:
            terms["velocity"] = (prediction.diff(dim=1) - x0.diff(dim=1)).square().mean()
        if cfg.smoothness > 0:
            terms["smoothness"] = prediction.diff(n=2, dim=1).square().mean()
        if cfg.transition > 0:
            terms["transition"] = self._transition(prediction, x0, batch)
        total = terms["x0"] + sum(getattr(cfg, key) * value for key, value in terms.items() if key != "x0")
        logged = {key: value.detach() for key, value in terms.items()}
        logged.update(self._buckets(per_sample.detach(), t))
        logged["total"] = total.detach()
        return total, logged

    def _transition(self, prediction: Tensor, x0: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """MSE of the step from the context's last frame to the window's first frame, predicted vs true, over
        the windows that have a previous window (the jump at a window border, JoyVASA's transition loss)."""
        last = batch["motion_pre"][:, -1]  # (B, M)
        error = ((prediction[:, 0] - last) - (x0[:, 0] - last)).square().mean(1)
        weight = batch["has_pre"].to(error.dtype)
        return (error * weight).sum() / weight.sum().clamp_min(1)

    def _buckets(self, per_sample: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Mean x0 loss per noise-level range: {"x0_by_noise/t_0-250": ..., ...} for the ranges present in the batch."""
        edges = np.linspace(0, self.schedule.train_steps, LOSS_BUCKETS + 1).round().astype(int)
        out = {}
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mask = (t >= int(lo)) & (t < int(hi))
            if bool(mask.any()):
                out[f"x0_by_noise/t_{lo}-{hi}"] = per_sample[mask].mean()
        return out

    # --- monitoring -------------------------------------------------------------------------------

    def sample_window(self, model: nn.Module, batch: dict[str, Tensor], steps: int | None = None) -> Tensor:
        """Generated window (B, W, M) for the batch's conditions (guided, DDIM from a fixed seed)."""
        cond = {k: v for k, v in batch.items() if k != "motion"}
        shape = (batch["motion"].shape[0], self.window, self.dims["motion_dim"])
        denoise = guided_denoiser(model, cond, self.guidance_scales())
        generator = torch.Generator().manual_seed(IMAGE_SEED)
        with torch.no_grad():
            return ddim_sample(
                denoise, self.schedule, shape, steps or self.diffusion.sampling_steps, self.diffusion.eta, generator,
                batch["motion"].device,
            )  # fmt: skip

    def images(self, models: dict[str, nn.Module], batch: dict[str, Tensor]) -> np.ndarray:
        """Curves of generated vs real motion for the first batch item: head pose (yaw, pitch, roll, scale) and
        the mouth-dynamics proxy, the z_dyn column most correlated with the window's audio energy (z_dyn has no
        named mouth column). uint8 (H, W, 3)."""
        first = {k: v[:1] for k, v in batch.items()}
        generated = self.sample_window(models[DIT], first)[0].float().cpu().numpy()  # (W, M)
        real = first["motion"][0].float().cpu().numpy()
        energy = first["audio"][0].float().mean(-1).cpu().numpy()  # (W,) mean feature: loudness for log-mel
        curves = [(label, column) for label, column in POSE_CURVES if column < real.shape[1]]
        if real.shape[1] > POSE_DIM:
            mouth = _most_correlated(real[:, POSE_DIM:], energy)
            curves.append((f"z_dyn[{mouth}] (mouth proxy)", POSE_DIM + mouth))
        return _plot_curves(real, generated, curves)


def _most_correlated(columns: np.ndarray, signal: np.ndarray) -> int:
    """Index of the column of (W, D), D >= 1, with the largest |Pearson r| against signal (W,) (0 if all undefined)."""
    centred = columns - columns.mean(0)
    s = signal - signal.mean()
    denominator = np.linalg.norm(centred, axis=0) * np.linalg.norm(s)
    r = np.abs(centred.T @ s) / np.where(denominator > 0, denominator, np.inf)
    return int(np.argmax(r))


def _plot_curves(real: np.ndarray, generated: np.ndarray, curves: list[tuple[str, int]]) -> np.ndarray:
    """One panel per (label, column): real and generated over the window's frames, as an RGB uint8 image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 1.6 * len(curves)), dpi=80)
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(len(curves), 1, sharex=True)
    for ax, (label, column) in zip(np.atleast_1d(axes), curves, strict=True):
        ax.plot(real[:, column], label="real", color="black")
        ax.plot(generated[:, column], label="generated", color="tab:red")
        ax.set_ylabel(label, fontsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper right")
    np.atleast_1d(axes)[-1].set_xlabel("frame (25 fps), normalised units")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
