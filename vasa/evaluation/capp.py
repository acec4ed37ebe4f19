"""CAPP, the contrastive audio and pose pretraining judge of VASA-1 §4.1: a pose-sequence transformer and an
audio encoder over 3 s windows, trained with the CLIP loss; the score is the cosine similarity of a pose
sequence's embedding and its audio's.

Pose input: the frame-to-frame change of yaw, pitch and roll in degrees (the shards' `preprocessing.pose`,
or the same estimator run on a generated video), divided by POSE_UNIT_DEG: the judge sees the motion, not the
speaker's resting head orientation, and fast moves (nods) weigh as much as slow drift. Audio input: the
window's normalised log-mel, k mel frames per video frame. On a small corpus the tiny preset is kept very
narrow on purpose: wider encoders memorise the few training clips (true pairs told apart by content, 100 %
train accuracy, no margin on held-out clips; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vasa.loaders.judge_clips import JudgeClip, normalise_mel

CAPP = "capp"
POSE_UNIT_DEG = 0.5  # per-frame change; the sample corpus moves ~0.3-0.5 deg per frame


@dataclass(frozen=True)
class CappPreset:
    name: str
    width: int  # transformer width
    layers: int  # per encoder
    heads: int
    dim: int  # embedding size
    pool: int  # frames averaged into one time step of the embedding

    def describe(self) -> dict:
        return asdict(self)


CAPP_PRESETS = {
    "tiny": CappPreset("tiny", width=16, layers=1, heads=2, dim=16, pool=15),
    "base": CappPreset("base", width=256, layers=4, heads=8, dim=256, pool=5),
}


class _SequenceEncoder(nn.Module):
    """(B, W, C) -> linear to width -> + learned positions -> transformer -> mean over `pool` frames -> flatten
    -> linear -> (B, dim). Pooling in segments, not over the whole window, keeps WHEN things happen in the
    embedding: what a true pose/audio pair shares is timing (a nod with a stressed syllable)."""

    def __init__(self, channels: int, preset: CappPreset, window: int) -> None:
        super().__init__()
        self.project = nn.Linear(channels, preset.width)
        self.position = nn.Parameter(torch.zeros(1, window, preset.width))
        layer = nn.TransformerEncoderLayer(
            preset.width,
            preset.heads,
            2 * preset.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, preset.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(preset.width)
        self.head = nn.Linear(preset.width * (window // preset.pool), preset.dim)
        self.pool_size = preset.pool

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.encoder(self.project(x) + self.position[:, : x.shape[1]]))  # (B, W, width)
        h = F.avg_pool1d(h.transpose(1, 2), self.pool_size, self.pool_size)  # (B, width, W // pool)
        return self.head(h.flatten(1))


class Capp(nn.Module):
    """CAPP: pose windows (B, W, 3) and audio windows (B, W, k * n_mels) -> unit embeddings (B, dim) each."""

    def __init__(self, preset: CappPreset, window: int, audio_dim: int) -> None:
        super().__init__()
        self.preset, self.window, self.audio_dim = preset, window, audio_dim
        self.pose = _SequenceEncoder(3, preset, window)
        self.audio = _SequenceEncoder(audio_dim, preset, window)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # CLIP's initial temperature

    def embed_pose(self, angles: Tensor) -> Tensor:
        return F.normalize(self.pose(angles), dim=-1)

    def embed_audio(self, audio: Tensor) -> Tensor:
        return F.normalize(self.audio(audio), dim=-1)


def pose_window(angles: np.ndarray) -> np.ndarray:
    """(W, 3) degrees -> (W, 3) change from the previous frame (0 for the first) in POSE_UNIT_DEG; a change
    into or out of a frame without a face is 0."""
    change = np.diff(angles, axis=0, prepend=angles[:1])
    return (np.nan_to_num(change) / POSE_UNIT_DEG).astype(np.float32)


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """Starts of the windows an evaluation reads: every `stride` frames, and one ending at the clip's end."""
    if frames < window:
        return []
    starts = list(range(0, frames - window + 1, stride))
    return starts if starts[-1] == frames - window else [*starts, frames - window]


@torch.no_grad()
def capp_scores(model: Capp, angles: np.ndarray, mel: np.ndarray, stride: int) -> np.ndarray:
    """Cosine similarity per window of a clip: angles (T, 3) degrees, mel (T, k * n_mels) normalised."""
    model.eval()
    device = next(model.parameters()).device
    starts = window_starts(min(len(angles), len(mel)), model.window, stride)
    if not starts:
        return np.zeros(0, np.float32)
    w = model.window
    poses = torch.from_numpy(np.stack([pose_window(angles[s : s + w]) for s in starts])).to(device)
    audio = torch.from_numpy(np.stack([mel[s : s + w] for s in starts])).to(device)
    return (model.embed_pose(poses) * model.embed_audio(audio)).sum(-1).cpu().numpy()


class CappTask:
    """CAPP as a TrainTask of the shared engine (one module, EMA kept): the symmetric CLIP loss over a batch of
    (pose window, audio window) pairs, the other pairs of the batch as negatives."""

    def __init__(self, preset: CappPreset, window: int, audio_dim: int) -> None:
        self.preset, self.window, self.audio_dim = preset, window, audio_dim

    def build(self) -> dict[str, nn.Module]:
        return {CAPP: Capp(self.preset, self.window, self.audio_dim)}

    def update_order(self) -> list[str]:
        return [CAPP]

    def ema_modules(self) -> list[str]:
        return [CAPP]

    def describe(self) -> dict:
        info = {"task": "capp", "preset": self.preset.describe(), "window": self.window, "audio_dim": self.audio_dim}
        return json.loads(json.dumps(info))

    def loss(self, name: str, models: dict[str, nn.Module], batch: dict[str, Tensor], scratch: dict):
        model = models[name]
        p = F.normalize(model.pose(batch["pose"]), dim=-1)
        a = F.normalize(model.audio(batch["audio"]), dim=-1)
        logits = model.logit_scale.clamp(max=np.log(100)).exp() * p @ a.T
        target = torch.arange(len(p), device=p.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        accuracy = (logits.argmax(1) == target).float().mean()
        return loss, {"clip": loss.detach(), "accuracy": accuracy.detach()}

    def images(self, models: dict[str, nn.Module], batch: dict[str, Tensor]) -> np.ndarray:
        """The batch's pose/audio similarity matrix as a grey image (diagonal = true pairs), 8x upscaled."""
        model = models[CAPP]
        sim = (model.embed_pose(batch["pose"]) @ model.embed_audio(batch["audio"]).T).float().cpu().numpy()
        grey = np.clip((sim + 1) * 127.5, 0, 255).astype(np.uint8)
        big = np.kron(grey, np.ones((8, 8), np.uint8))
        return np.repeat(big[..., None], 3, axis=2)


def capp_batches(clips: list[JudgeClip], stats: dict, window: int, batch_size: int, seed: int):
    """The engine's batch source: random W-frame windows of the clips (pose and its audio), deterministic in
    (seed, epoch, rank)."""
    prepared = [(c.angles, normalise_mel(c.mel, stats)) for c in clips if len(c.angles) >= window]

    def source(epoch: int, rank: int, world: int) -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng([seed, epoch, rank, 29])
        while True:
            poses, audio = [], []
            for _ in range(batch_size):
                angles, mel = prepared[rng.integers(len(prepared))]
                s = int(rng.integers(len(angles) - window + 1))
                poses.append(pose_window(angles[s : s + window]))
                audio.append(mel[s : s + window])
            yield {"pose": torch.from_numpy(np.stack(poses)), "audio": torch.from_numpy(np.stack(audio))}

    return source


def load_capp(weights: dict[str, Tensor], task: dict) -> Capp:
    model = Capp(CAPP_PRESETS[task["preset"]["name"]], task["window"], task["audio_dim"])
    model.load_state_dict(weights[CAPP], strict=True)
    return model.eval()
