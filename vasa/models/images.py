"""The image convention every network shares: (3, S, S) float32 in [-1, 1] <-> (S, S, 3) uint8 RGB."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def to_tensor(frame: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The inverse of `to_tensor` for a batch: (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
