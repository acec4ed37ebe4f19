"""Quality filters for a face segment: each failing filter gives a reason and a detail.

Pure functions over arrays; the thresholds come from params `preprocess.filters`. A failing segment
is recorded with its reason and a detail holding the measured value and the threshold (per-shard
stats, failure report), never silently dropped.
"""

from __future__ import annotations

import cv2
import numpy as np

from vasa.core.config import FilterConfig

# Reasons, as they appear in stats and the failure report.
TOO_SHORT = "too_short"
BLURRY = "blurry"
EXTREME_POSE = "extreme_pose"
AV_OFFSET = "av_offset"
OUTSIDE_FRAME = "outside_frame"
UPSCALED = "upscaled"
REASONS = (TOO_SHORT, BLURRY, EXTREME_POSE, AV_OFFSET, OUTSIDE_FRAME, UPSCALED)

# Sharpness is measured on the face resized to this many pixels (face height), so it is a property
# of the source video, the same whatever the crop size or crop mode (a crop-pixel measure passed a
# segment at 128² and failed it at 512²).
SHARPNESS_FACE_PX = 128


def face_sharpness(frame: np.ndarray, centre: np.ndarray, height: float) -> float:
    """Variance of the Laplacian (a standard focus measure) of the grey face region of one frame.

    frame: (H, W, 3) uint8 RGB; centre: (2,) source pixels; height: face height in source pixels.
    The region is a square one face height wide around the centre (eyes, nose, mouth: texture that
    is always there, no background), clipped to the frame, resized so the face is SHARPNESS_FACE_PX
    high (INTER_AREA when shrinking, linear when enlarging: an upscaled small face scores low, as it
    should). NaN when the region is empty.
    """
    if not (np.isfinite(height) and np.isfinite(centre).all()) or height < 2:
        return float("nan")
    half = height / 2
    x0, y0 = np.maximum(np.floor(centre - half).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(centre + half).astype(int), frame.shape[1::-1])
    if x1 - x0 < 2 or y1 - y0 < 2:
        return float("nan")
    factor = SHARPNESS_FACE_PX / height
    size = (max(2, round((x1 - x0) * factor)), max(2, round((y1 - y0) * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    grey = cv2.cvtColor(cv2.resize(frame[y0:y1, x0:x1], size, interpolation=interpolation), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def segment_problems(
    n_frames: int,
    fps: int,
    sharpness: float,
    yaw_deg: np.ndarray,
    pitch_deg: np.ndarray,
    roll_deg: np.ndarray,
    av_offset: int | None,
    outside: float,
    upscale: float,
    cfg: FilterConfig,
) -> list[tuple[str, str]]:
    """Every filter the segment fails, as (reason, detail with the value and the threshold); an empty
    list keeps it.

    yaw_deg, pitch_deg, roll_deg: (T,) head pose in degrees in the crop frame (preprocessing.pose);
    sharpness: median `face_sharpness` over the segment; outside: fraction of the crop area outside
    the source frame (mean over frames); upscale: crop pixels per decoded source pixel (median).
    Pose extremes use the median over the segment: a brief glance sideways is natural head motion
    and must stay in the data; a profile-view clip, or a face lying on its side (roll near ±90°),
    is not what the model can learn from.
    """
    problems = []
    if n_frames / fps < cfg.min_seconds:
        problems.append((TOO_SHORT, f"{n_frames / fps:.2f} s < min_seconds {cfg.min_seconds}"))
    if not sharpness >= cfg.min_sharpness:  # NaN (no measurable face) fails too
        problems.append((BLURRY, f"sharpness {sharpness:.1f} < min_sharpness {cfg.min_sharpness}"))
    yaw, pitch = abs(float(np.nanmedian(yaw_deg))), abs(float(np.nanmedian(pitch_deg)))
    # Roll wraps at ±180°: an upside-down face flickers between +179 and -179, whose median can be ~0.
    roll = float(np.nanmedian(np.abs(roll_deg)))
    if yaw > cfg.max_abs_yaw_deg or pitch > cfg.max_abs_pitch_deg or roll > cfg.max_abs_roll_deg:
        limits = f"(max {cfg.max_abs_yaw_deg}, {cfg.max_abs_pitch_deg}, {cfg.max_abs_roll_deg})"
        problems.append((EXTREME_POSE, f"median |yaw|, |pitch|, |roll| {yaw:.1f}, {pitch:.1f}, {roll:.1f} {limits}"))
    if av_offset is not None and abs(av_offset) > cfg.max_av_offset:
        problems.append((AV_OFFSET, f"|av_offset| {abs(av_offset)} > max_av_offset {cfg.max_av_offset} frames"))
    if outside > cfg.max_outside_fraction:
        problems.append((OUTSIDE_FRAME, f"outside {outside:.3f} > max_outside_fraction {cfg.max_outside_fraction}"))
    if upscale > cfg.max_upscale:
        problems.append((UPSCALED, f"upscale {upscale:.2f} > max_upscale {cfg.max_upscale}"))
    return problems
