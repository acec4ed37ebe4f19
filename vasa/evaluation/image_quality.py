"""No-reference image quality of a face crop video, computed without any downloaded weights.

Two classical measures over the face region (the landmarks' box in crop pixels, snapped to the 8-pixel
block grid of the codec), each a fraction in [0, 1] where 0 is best:

blur index     Crété-Roffet, Dolmiere, Ladret & Nicolas 2007, "The blur effect: perception and estimation
               with a new no-reference perceptual blur metric" (skimage.measure.blur_effect): how little the
               grey face changes when blurred again. Median over `frames` evenly spread frames.
frozen blocks  fraction of 8x8 face blocks whose mean absolute change between consecutive frames is below
               FROZEN_GREY grey levels: a low-bitrate encoder copies blocks from the previous frame (skip
               blocks) and quantises small changes away, so a talking face freezes in patches, while camera
               noise and speech move every block of a well-encoded face a little.

score = 100 x (1 - max(blur index, frozen blocks)): one number for reports, higher is better, 0..100 like the
learned IQA scores peers filter on (LatentSync drops hyperIQA < 40). The filters (params score.quality) apply
to the two measures, each with its own threshold: their spreads on good video differ (blur index 0.29-0.49
with the content, frozen blocks 0.02-0.3 with the motion, docs/BENCHMARKS.md "Score table").

Measured on what training sees (the shards' crop mp4, re-encoded at preprocess.crop_crf): a source that is
soft or compressed but downscaled into a sharp crop is not penalised. Content matters (a soft portrait has
a higher blur index than a sharp one at the same encoding), so the thresholds are set from measured originals
and degraded copies (docs/BENCHMARKS.md "Score table").
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.measure import blur_effect

BLOCK = 8  # the codec's transform block (H.264 8x8; macroblocks are 16x16 = 2x2 of them)
FROZEN_GREY = 0.5  # grey levels: a block changing less than this between frames counts as frozen


@dataclass(frozen=True)
class ImageQuality:
    blur: float  # blur index in [0, 1] (0 = sharp)
    frozen: float  # frozen-block fraction in [0, 1] (0 = every face block changes between frames)

    @property
    def score(self) -> float:
        """100 x (1 - max(blur, frozen)): higher is better."""
        return 100.0 * (1.0 - max(self.blur, self.frozen))


def face_box(landmarks: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) crop pixels of the face: the 2nd..98th percentile of every landmark over the clip,
    snapped outwards to the BLOCK grid and clipped to the crop. landmarks: (T, N, 2+) crop pixels, NaN
    where no face; the whole crop when none is measured or the box is under 2 blocks a side."""
    points = np.asarray(landmarks, np.float64)[..., :2].reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    whole = (0, 0, side - side % BLOCK, side - side % BLOCK)
    if len(points) == 0:
        return whole
    (x0, y0), (x1, y1) = np.percentile(points, 2, axis=0), np.percentile(points, 98, axis=0)
    x0, y0 = (max(0, int(v) // BLOCK * BLOCK) for v in (x0, y0))
    x1, y1 = (min(side - side % BLOCK, -(-int(np.ceil(v)) // BLOCK) * BLOCK) for v in (x1, y1))
    if x1 - x0 < 2 * BLOCK or y1 - y0 < 2 * BLOCK:
        return whole
    return x0, y0, x1, y1


def grey_faces(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, y1 - y0, x1 - x0) uint8 grey face region."""
    x0, y0, x1, y1 = box
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY) for f in frames])


def blur_index(grey: np.ndarray, frames: int) -> float:
    """Median Crété-Roffet blur effect of `frames` evenly spread frames of (T, h, w) uint8 grey faces."""
    picks = np.unique(np.linspace(0, len(grey) - 1, min(frames, len(grey))).round().astype(int))
    return float(np.median([blur_effect(grey[i]) for i in picks]))


def frozen_blocks(grey: np.ndarray) -> float:
    """Fraction of (block, frame pair) whose mean absolute grey change is below FROZEN_GREY; (T, h, w) uint8
    with h, w multiples of BLOCK. 0 for a single frame (nothing to compare)."""
    if len(grey) < 2:
        return 0.0
    change = np.abs(np.diff(grey.astype(np.int16), axis=0))  # (T-1, h, w)
    t, h, w = change.shape
    per_block = change.reshape(t, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(2, 4))
    return float((per_block < FROZEN_GREY).mean())


def image_quality(frames: np.ndarray, landmarks: np.ndarray, blur_frames: int) -> ImageQuality:
    """The quality of a crop video: frames (T, S, S, 3) uint8 RGB, landmarks (T, N, 2+) in its pixels."""
    grey = grey_faces(frames, face_box(landmarks, frames.shape[2]))
    return ImageQuality(blur_index(grey, blur_frames), frozen_blocks(grey))
