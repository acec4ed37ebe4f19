"""Audio-visual sync expert: the SyncNet-style judge behind S_C / S_D (VASA-1 §4.1; Chung & Zisserman 2016).

Two encoders into one embedding space: 5 consecutive grey mouth crops (stacked as channels) and the log-mel
of the same 5 video frames (k mel frames each). Trained contrastively (InfoNCE over cosine similarity): for a
mouth window the aligned audio is the positive, the same clip's audio shifted by `min_shift`..`max_shift`
frames either way the negatives, so the only cue is timing. Distances are Euclidean between L2-normalised
embeddings (0..2), which `vasa.evaluation.metrics` turns into S_C / S_D as SyncNet's evaluation does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vasa.loaders.judge_clips import MOUTH_H, MOUTH_W, JudgeClip, normalise_mel

SYNC = "sync"
FRAMES = 5  # video frames per window (SyncNet: 5 frames = 0.2 s at 25 fps)


@dataclass(frozen=True)
class SyncPreset:
    name: str
    width: int  # channels of the first conv; doubled at each stride
    dim: int  # embedding size

    def describe(self) -> dict:
        return asdict(self)


SYNC_PRESETS = {
    "tiny": SyncPreset("tiny", width=16, dim=64),  # CPU: the sample corpus in seconds
    "base": SyncPreset("base", width=64, dim=256),
}


def _tower(in_channels: int, width: int, dim: int, first_stride: tuple[int, int]) -> nn.Sequential:
    """conv (first_stride) -> 2 stride-2 convs (width, 2 width, 2 width) -> global mean -> linear to `dim`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, first_stride, 1),
        nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, 2, 1),
        nn.GroupNorm(8, 2 * width),
        nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, 2, 1),
        nn.GroupNorm(8, 2 * width),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, dim),
    )


class SyncExpert(nn.Module):
    """Sync expert: mouth window (B, FRAMES, MOUTH_H, MOUTH_W) in [-1, 1] and audio window (B, FRAMES * k,
    n_mels) normalised log-mel -> unit embeddings (B, dim) each."""

    def __init__(self, preset: SyncPreset, mel_per_frame: int, n_mels: int) -> None:
        super().__init__()
        self.preset, self.mel_per_frame, self.n_mels = preset, mel_per_frame, n_mels
        self.visual = _tower(FRAMES, preset.width, preset.dim, (2, 2))
        self.audio = _tower(1, preset.width, preset.dim, (2, 4))  # 20 mel frames x 80 bins -> 10 x 20 first

    def embed_visual(self, mouths: Tensor) -> Tensor:
        return F.normalize(self.visual(mouths), dim=-1)

    def embed_audio(self, mel: Tensor) -> Tensor:
        return F.normalize(self.audio(mel[:, None]), dim=-1)


def mouth_windows(mouths: np.ndarray) -> np.ndarray:
    """(T, H, W) uint8 -> (T - FRAMES + 1, FRAMES, H, W) float32 in [-1, 1]: window i = frames i..i+4."""
    x = mouths.astype(np.float32) / 127.5 - 1.0
    return np.stack([x[i : i + FRAMES] for i in range(len(x) - FRAMES + 1)])


def mel_windows(mel: np.ndarray, mel_per_frame: int) -> np.ndarray:
    """(T, k * n_mels) normalised -> (T - FRAMES + 1, FRAMES * k, n_mels): the mel frames of frames i..i+4."""
    frames = mel.reshape(len(mel), mel_per_frame, -1)
    return np.stack([frames[i : i + FRAMES].reshape(FRAMES * mel_per_frame, -1) for i in range(len(mel) - FRAMES + 1)])


@torch.no_grad()
def embed_clip(
    model: SyncExpert, mouths: np.ndarray, mel: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Visual and audio embeddings (N, dim) of every window of a clip; mel normalised, (T, k * n_mels)."""
    model.eval()
    device = next(model.parameters()).device
    v, a = mouth_windows(mouths), mel_windows(mel, model.mel_per_frame)
    out_v, out_a = [], []
    for start in range(0, len(v), batch):
        out_v.append(model.embed_visual(torch.from_numpy(v[start : start + batch]).to(device)).cpu().numpy())
        out_a.append(model.embed_audio(torch.from_numpy(a[start : start + batch]).to(device)).cpu().numpy())
    return np.concatenate(out_v), np.concatenate(out_a)


class SyncTask:
    """The sync expert as a TrainTask of the shared engine (one module, EMA kept)."""

    def __init__(self, preset: SyncPreset, mel_per_frame: int, n_mels: int, negatives: int, temperature: float):
        self.preset, self.mel_per_frame, self.n_mels = preset, mel_per_frame, n_mels
        self.negatives, self.temperature = negatives, temperature

    def build(self) -> dict[str, nn.Module]:
        return {SYNC: SyncExpert(self.preset, self.mel_per_frame, self.n_mels)}

    def update_order(self) -> list[str]:
        return [SYNC]

    def ema_modules(self) -> list[str]:
        return [SYNC]

    def describe(self) -> dict:
        info = {
            "task": "sync_expert",
            "preset": self.preset.describe(),
            "mel_per_frame": self.mel_per_frame,
            "n_mels": self.n_mels,
            "frames": FRAMES,
            "mouth": [MOUTH_H, MOUTH_W],
            "negatives": self.negatives,
            "temperature": self.temperature,
        }
        return json.loads(json.dumps(info))

    def loss(self, name: str, models: dict[str, nn.Module], batch: dict[str, Tensor], scratch: dict):
        """InfoNCE: batch["mouths"] (B, FRAMES, H, W), batch["audio"] (B, 1 + N, FRAMES * k, n_mels) with the
        aligned window first and N shifted windows after it."""
        model = models[name]
        b, candidates = batch["audio"].shape[:2]
        v = F.normalize(model.visual(batch["mouths"]), dim=-1)  # (B, D)
        a = F.normalize(model.audio(batch["audio"].flatten(0, 1)[:, None]), dim=-1).view(b, candidates, -1)
        logits = torch.einsum("bd,bnd->bn", v, a) / self.temperature
        target = torch.zeros(b, dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(1) == 0).float().mean()
        return loss, {"infonce": loss.detach(), "accuracy": accuracy.detach()}

    def images(self, models: dict[str, nn.Module], batch: dict[str, Tensor]) -> np.ndarray:
        """The first 4 mouth windows, their 5 frames side by side: uint8 (4 H, 5 W, 3)."""
        mouths = batch["mouths"][:4].float().clamp(-1, 1)  # (n, 5, H, W)
        grid = torch.cat([torch.cat(list(window), dim=1) for window in mouths], dim=0)  # (n H, 5 W)
        grey = ((grid + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        return np.repeat(grey[..., None], 3, axis=2)


def sync_batches(clips: list[JudgeClip], stats: dict, mel_per_frame: int, cfg, batch_size: int, seed: int):
    """The engine's batch source: random windows of the clips, each with its aligned audio and `cfg.negatives`
    shifts of min_shift..max_shift frames (either sign, inside the clip). Deterministic in (seed, epoch, rank)."""
    prepared = [(c.mouths, normalise_mel(c.mel, stats)) for c in clips if len(c.mouths) >= FRAMES + 2 * cfg.min_shift]

    def source(epoch: int, rank: int, world: int) -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng([seed, epoch, rank, 17])
        while True:
            mouths, audio = [], []
            for _ in range(batch_size):
                m, mel = prepared[rng.integers(len(prepared))]
                last = len(m) - FRAMES  # last window start
                t = int(rng.integers(last + 1))
                shifts = [
                    s
                    for s in range(-cfg.max_shift, cfg.max_shift + 1)
                    if abs(s) >= cfg.min_shift and 0 <= t + s <= last
                ]
                chosen = rng.choice(shifts, size=cfg.negatives, replace=len(shifts) < cfg.negatives)
                starts = [t, *(t + int(s) for s in chosen)]
                mouths.append(m[t : t + FRAMES])
                frames = mel.reshape(len(mel), mel_per_frame, -1)
                audio.append(np.stack([frames[s : s + FRAMES].reshape(FRAMES * mel_per_frame, -1) for s in starts]))
            yield {
                "mouths": torch.from_numpy(np.stack(mouths).astype(np.float32) / 127.5 - 1.0),
                "audio": torch.from_numpy(np.stack(audio)),
            }

    return source


def load_sync_expert(weights: dict[str, Tensor], task: dict) -> SyncExpert:
    """A SyncExpert from a judge folder's weights and model.json `task` block."""
    model = SyncExpert(SYNC_PRESETS[task["preset"]["name"]], task["mel_per_frame"], task["n_mels"])
    model.load_state_dict(weights[SYNC], strict=True)
    return model.eval()
