"""Feature networks given by local path (never downloaded): identity similarity and FVD₂₅ (VASA-1 §4.1).

Both load a TorchScript file (no pickle of Python objects, no code from the network):
  identity   (N, 3, IDENTITY_SIDE, IDENTITY_SIDE) RGB in [-1, 1] -> (N, D) face embeddings (an ArcFace-style
             recogniser); the figure is the mean cosine similarity of generated frames to the portrait.
  FVD        (N, 3, FVD_FRAMES, FVD_SIDE, FVD_SIDE) RGB in [-1, 1] -> (N, D) video features (I3D's logits or
             pool features); FVD₂₅ is the Fréchet distance between real and generated 25-frame segments.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from vasa.core.errors import InputError
from vasa.evaluation.metrics import cosine, frechet_distance

IDENTITY_SIDE = 112
FVD_FRAMES, FVD_SIDE = 25, 224


def load_feature_net(path: str | Path) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(f"{path}: not a loadable TorchScript feature network ({err})") from None


def _as_input(frames: np.ndarray, side: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, side, side) float32 in [-1, 1]."""
    resized = np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in frames])
    return torch.from_numpy(resized).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def identity_similarity(net: torch.nn.Module, portrait: np.ndarray, frames: np.ndarray) -> float:
    """Mean cosine similarity of each frame's identity embedding to the portrait's: portrait (H, W, 3),
    frames (T, H, W, 3) uint8."""
    features = net(_as_input(np.concatenate([portrait[None], frames]), IDENTITY_SIDE)).float().numpy()
    return float(cosine(features[1:], np.repeat(features[:1], len(frames), axis=0)).mean())


@torch.no_grad()
def video_features(net: torch.nn.Module, videos: list[np.ndarray]) -> np.ndarray:
    """(N, D) features of every whole FVD_FRAMES segment of the videos ((T, H, W, 3) uint8 each)."""
    out = []
    for video in videos:
        for start in range(0, len(video) - FVD_FRAMES + 1, FVD_FRAMES):
            clip = _as_input(video[start : start + FVD_FRAMES], FVD_SIDE)  # (25, 3, S, S)
            out.append(net(clip.permute(1, 0, 2, 3)[None]).float().reshape(1, -1).numpy())
    if not out:
        raise InputError(f"FVD needs videos of at least {FVD_FRAMES} frames")
    return np.concatenate(out)


def fvd(net: torch.nn.Module, real: list[np.ndarray], generated: list[np.ndarray]) -> float:
    """FVD₂₅ between real and generated videos (their whole 25-frame segments)."""
    return frechet_distance(video_features(net, real), video_features(net, generated))
