"""Disentanglement of a trained stage-1 model (VASA-1 §3.1): does pose come from the driver and identity
from the source?

For frame pairs (A, B) of two different speakers:
  pose swap        A's appearance and facial dynamics rendered with B's head pose
  appearance swap  B's appearance rendered with A's head pose and dynamics
Two judges, neither of them the generator's own motion encoder:
  pose      `preprocessing.pose` on MediaPipe FaceMesh landmarks of the rendered pixels (the pipeline's
            own pose estimator). The pose swap's re-estimated head rotation must move from A's toward
            B's: `pose/gap_closed` = 1 - |swap - B| / |A - B| (1 = B's pose exactly, 0 = still A's).
  identity  the model's identity encoder (cosine distance to A's z_id): the pose swap must change A's
            identity less than the appearance swap does (`identity/pose_swap_distance` <
            `identity/appearance_swap_distance`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from preprocessing.face import FaceMeshTracker
from preprocessing.pose import head_pose
from vasa.evaluation.independent import mouth_opening
from vasa.models.face_latent import FaceLatent
from vasa.models.images import to_uint8

JUDGE_SIDE = 256  # renderings are upsampled to this side before FaceMesh (it misses faces at 64²)
MIN_GAP_DEG = 2.0  # pairs whose measured A/B rotation gap is smaller say nothing about the direction


def upsampled(images: torch.Tensor, side: int = JUDGE_SIDE) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, side, side, 3) uint8 RGB, bicubic."""
    return to_uint8(F.interpolate(images.float(), size=(side, side), mode="bicubic", align_corners=False))


def measured_landmarks(tracker: FaceMeshTracker, images: torch.Tensor) -> np.ndarray:
    """(B, 478, 3) FaceMesh landmarks found on each (upsampled) image alone; NaN where no single face."""
    return np.concatenate([tracker.track(frame[None]).landmarks for frame in upsampled(images)])


def measured_rotation(tracker: FaceMeshTracker, images: torch.Tensor) -> np.ndarray:
    """(B, 3) yaw, pitch, roll in degrees re-estimated on each image alone; NaN rows where no single face."""
    pose = head_pose(measured_landmarks(tracker, images))
    return np.stack([pose.yaw, pose.pitch, pose.roll], axis=1).astype(np.float64)


@torch.no_grad()
def mouth_following(
    model: FaceLatent,
    source: torch.Tensor,
    driver: torch.Tensor,
    tracker: FaceMeshTracker,
    expressions: tuple[torch.Tensor, torch.Tensor] | None = None,
    poses: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """Does the rendering open the mouth as the driver does? The source's appearance driven by the driver's
    motion, frame pairs (N, 3, S, S) of one clip each; FaceMesh mouth opening (|lm13 - lm14| / mouth width,
    vasa/evaluation/independent.py) of driver and reconstruction, on pairs where both show one face:
    `mouth/r` their Pearson r, `mouth/std_ratio` the reconstruction's spread over the driver's.
    `expressions`: the measured expression (N, E) of source and driver (the shards'), which a model with an
    expression field renders from (as it trains and generates); `poses` their measured head pose (N, 7) in
    z_pose units, which a `measured_pose` model renders from."""
    device = next(model.parameters()).device
    source, driver = source.to(device), driver.to(device)
    measured_s, measured_d = expressions if expressions is not None else (None, None)
    pose_s, pose_d = poses if poses is not None else (None, None)
    code_s = model.measured(model.encode(source), measured_s, pose_s)
    code_d = model.measured(model.encode(driver, appearance=False), measured_d, pose_d)
    recon = model.render(model.canonical(code_s, source), code_s.z_id, code_d.pose, code_d.dyn)
    real = mouth_opening(measured_landmarks(tracker, driver))
    made = mouth_opening(measured_landmarks(tracker, recon))
    ok = np.isfinite(real) & np.isfinite(made)
    enough = ok.sum() >= 3 and real[ok].std() > 0 and made[ok].std() > 0
    return {
        "mouth/pairs": float(ok.sum()),
        "mouth/r": float(np.corrcoef(real[ok], made[ok])[0, 1]) if enough else float("nan"),
        "mouth/std_ratio": float(made[ok].std() / real[ok].std()) if enough else float("nan"),
    }


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - cos between rows."""
    return 1 - F.cosine_similarity(a.float(), b.float(), dim=1)


@torch.no_grad()
def disentanglement(
    model: FaceLatent,
    a: torch.Tensor,
    b: torch.Tensor,
    tracker: FaceMeshTracker,
    poses: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """Figures (see the module docstring) over frame pairs a, b: (N, 3, S, S) in [-1, 1], a[i] and b[i]
    of different speakers. Pose figures use the pairs where FaceMesh finds one face in A, B and the pose
    swap and A and B differ by at least MIN_GAP_DEG of rotation. `poses`: the measured head pose (N, 7) of
    a and b in z_pose units, which a `measured_pose` model renders from (as it trains and generates)."""
    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    pose_a, pose_b = poses if poses is not None else (None, None)
    code_a, code_b = model.measured(model.encode(a), None, pose_a), model.measured(model.encode(b), None, pose_b)
    pose_swap = model.render(model.canonical(code_a, a), code_a.z_id, code_b.pose, code_a.dyn)
    appearance_swap = model.render(model.canonical(code_b, b), code_b.z_id, code_a.pose, code_a.dyn)

    id_a = model.identity(a)
    pose_swap_distance = cosine_distance(model.identity(pose_swap), id_a).mean().item()
    appearance_swap_distance = cosine_distance(model.identity(appearance_swap), id_a).mean().item()

    rot_a, rot_b, rot_swap = (measured_rotation(tracker, x) for x in (a, b, pose_swap))
    gap = np.linalg.norm(rot_a - rot_b, axis=1)
    usable = np.isfinite(gap) & np.isfinite(rot_swap).all(axis=1) & (gap >= MIN_GAP_DEG)
    remaining = np.linalg.norm(rot_swap - rot_b, axis=1)
    closed = 1 - remaining[usable] / gap[usable]
    return {
        "pose/pairs": float(usable.sum()),
        "pose/gap_deg": float(gap[usable].mean()) if usable.any() else float("nan"),
        "pose/remaining_deg": float(remaining[usable].mean()) if usable.any() else float("nan"),
        "pose/gap_closed": float(np.median(closed)) if usable.any() else float("nan"),
        "identity/pose_swap_distance": pose_swap_distance,
        "identity/appearance_swap_distance": appearance_swap_distance,
    }
