"""Quality filters for a face segment: each returns a reason string when the segment fails.

Pure functions over arrays; the thresholds come from params `preprocess.filters`. A failing segment
is recorded with its reason (per-shard stats, failure report), never silently dropped.
"""

from __future__ import annotations

import cv2
import numpy as np

from vasa.config import FilterConfig

# Reasons, as they appear in stats and the failure report.
TOO_SHORT = "too_short"
BLURRY = "blurry"
EXTREME_POSE = "extreme_pose"
AV_OFFSET = "av_offset"


def sharpness(crops: np.ndarray, samples: int = 16) -> float:
    """Median variance of the Laplacian of the grey crops (a standard focus measure), over up to
    `samples` evenly spaced frames. crops: (T, S, S, 3) uint8."""
    picks = np.linspace(0, len(crops) - 1, min(samples, len(crops))).round().astype(int)
    values = [cv2.Laplacian(cv2.cvtColor(crops[i], cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for i in picks]
    return float(np.median(values))


def segment_problems(
    n_frames: int,
    fps: int,
    crop_sharpness: float,
    yaw_deg: np.ndarray,
    pitch_deg: np.ndarray,
    av_offset: int | None,
    cfg: FilterConfig,
) -> list[str]:
    """Every filter the segment fails (empty list: keep it).

    Pose extremes use the median over the segment: a brief glance sideways is natural head motion
    and must stay in the data; a profile-view clip is not what the model can learn from.
    """
    problems = []
    if n_frames / fps < cfg.min_seconds:
        problems.append(TOO_SHORT)
    if crop_sharpness < cfg.min_sharpness:
        problems.append(BLURRY)
    if (
        abs(float(np.nanmedian(yaw_deg))) > cfg.max_abs_yaw_deg
        or abs(float(np.nanmedian(pitch_deg))) > cfg.max_abs_pitch_deg
    ):
        problems.append(EXTREME_POSE)
    if av_offset is not None and abs(av_offset) > cfg.max_av_offset:
        problems.append(AV_OFFSET)
    return problems
