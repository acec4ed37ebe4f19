"""Viewer-side measures of a talking-face video that use none of the project's learned judges.

Everything here is geometry from MediaPipe FaceMesh (the project's `FaceMeshTracker`), the head pose
of `preprocessing.pose.head_pose`, audio loudness and image gradients, so it can check a generated
clip without trusting a model trained alongside the generator:

- lip sync: per-frame mouth opening against the audio's loudness, best Pearson r over small lags;
- sharpness: Laplacian variance of the face region, relative to the source portrait's;
- yaw jitter: lag-1 autocorrelation of the frame-to-frame yaw change.

Shapes: frames (T, H, W, 3) uint8 RGB; landmarks (T, 478, 3) float pixels as in preprocessing.face,
NaN where a frame does not have exactly one face; audio (N,) float32 mono in [-1, 1].
"""

from __future__ import annotations

import cv2
import numpy as np

from preprocessing.face import FaceMeshTracker, get_tracker, landmark_boxes, merge_duplicates
from preprocessing.pose import head_pose
from vasa.core.config import FaceConfig

UPPER_LIP, LOWER_LIP = 13, 14  # inner lip centres on the mesh midline
MOUTH_LEFT, MOUTH_RIGHT = 61, 291  # mouth corners
MIN_PAIRS = 10  # fewest frames a correlation is computed from; fewer gives NaN
STILL_REPEATS = 3  # a still is tracked over 3 repeats: the last one has a tracked region of interest
# Frames whose shorter side is below this are tracked enlarged (bicubic) to it, landmarks scaled back: on the
# sample corpus's 128² crops FaceMesh's mouth opening followed the same clip's 256² frames at r 0.59 for one
# speaker (0.99 for the other), its loudness r read 0.49 against 0.88; tracked at 384 px, 0.69.
MEASURE_MIN_SIDE = 384


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(T,) inner-lip gap over mouth width, |lm13 - lm14| / |lm61 - lm291| (dimensionless).

    `landmarks` (T, 468|478, 2|3) pixels; all given coordinates are used, so with z (FaceMesh's depth
    scaled like x) turning the head does not narrow the width. NaN where a frame has no face.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    gap = np.linalg.norm(landmarks[:, UPPER_LIP] - landmarks[:, LOWER_LIP], axis=-1)
    width = np.linalg.norm(landmarks[:, MOUTH_LEFT] - landmarks[:, MOUTH_RIGHT], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(width > 0, gap / width, np.nan)


def loudness_envelope(audio: np.ndarray, fps: float, sample_rate: int, n_frames: int | None = None) -> np.ndarray:
    """(T,) RMS of the mono `audio` (N,) over each video frame's span, in full-scale units.

    Frame k covers samples [round(k * sr / fps), round((k + 1) * sr / fps)), so non-integer samples
    per frame (30 fps at 16 kHz) do not drift. T is `n_frames` if given, else the number of whole
    frames the audio covers; frames the audio does not fully cover are NaN.
    """
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    step = sample_rate / fps
    whole_frames = int(np.floor(len(audio) * fps / sample_rate + 1e-6))  # 1e-6: 32000 / 533.33 is 59.99...
    count = whole_frames if n_frames is None else n_frames
    edges = np.round(np.arange(count + 1) * step).astype(np.int64)
    cumulative = np.concatenate([[0.0], np.cumsum(audio**2)])
    envelope = np.full(count, np.nan)
    whole = edges[1:] <= len(audio)
    starts, ends = edges[:-1][whole], edges[1:][whole]
    envelope[whole] = np.sqrt((cumulative[ends] - cumulative[starts]) / np.maximum(ends - starts, 1))
    return envelope


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the positions where both are finite (NaN with < MIN_PAIRS or a constant input)."""
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < MIN_PAIRS:
        return float("nan")
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    scale = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / scale) if scale > 0 else float("nan")


def lip_sync(opening: np.ndarray, envelope: np.ndarray, max_lag: int = 2) -> dict:
    """How well the mouth follows the loudness: {"r", "lag", "opening_std"}.

    `opening` (T,) from mouth_opening, `envelope` (T,) from loudness_envelope (same frames; a longer
    one is cut to the shorter). r is the largest Pearson r over lags -max_lag..+max_lag frames, and
    lag the lag giving it: at lag L, opening[t] is paired with envelope[t - L], so L > 0 means the
    mouth moves L frames after the sound. NaN frames of either are left out of each pair. With no
    usable lag, r is NaN and lag None. opening_std is the standard deviation of the finite openings
    (how much the mouth moves at all; NaN without any face). A weak measure on single clips: on the
    11 real fixture clips r ranged 0.05-0.42, so compare averages over many clips, not one clip.
    """
    count = min(len(opening), len(envelope))
    opening, envelope = np.asarray(opening[:count], float), np.asarray(envelope[:count], float)
    best_r, best_lag = float("nan"), None
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            r = _pearson(opening[lag:], envelope[: count - lag])
        else:
            r = _pearson(opening[: count + lag], envelope[-lag:])
        if np.isfinite(r) and not r <= best_r:  # `not <=`: the first finite r beats NaN
            best_r, best_lag = r, lag
    finite = opening[np.isfinite(opening)]
    return {"r": best_r, "lag": best_lag, "opening_std": float(finite.std()) if len(finite) else float("nan")}


def face_box(landmarks: np.ndarray, frame_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) whole pixels, the bounding box of one frame's (478, 2|3) landmarks clipped to
    the frame (H, W); None without a face or when the box is under 3 x 3 pixels."""
    box = landmark_boxes(np.asarray(landmarks, dtype=np.float64))
    if not np.isfinite(box).all():
        return None
    height, width = frame_hw
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
    return (x0, y0, x1, y1) if x1 - x0 >= 3 and y1 - y0 >= 3 else None


def _grey(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return cv2.cvtColor(np.ascontiguousarray(frame[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)


def _laplacian_variance(grey: np.ndarray) -> float:
    return float(cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F).var())


def sharpness(frame: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Variance of the Laplacian (3 x 3 aperture, grey levels 0-255, so units grey level² per pixel⁴)
    of the grey face region `box` (x0, y0, x1, y1 pixels) of one (H, W, 3) uint8 RGB frame.
    Higher is sharper; it depends on the pixel scale, so compare regions of equal size."""
    return _laplacian_variance(_grey(frame, box))


def _tracker(face_cfg: FaceConfig | None) -> FaceMeshTracker:
    """The project's tracker for `face_cfg`; without one, a fresh one at MediaPipe's default 0.5 confidences."""
    return get_tracker(face_cfg) if face_cfg is not None else FaceMeshTracker(0.5, 0.5)


def _track(frames: np.ndarray, face_cfg: FaceConfig | None) -> np.ndarray:
    """(T, 478, 3) landmarks of consecutive frames, NaN where a frame has no single face (a face
    found twice, overlapping by face_cfg.duplicate_iou or more, counts once)."""
    track = _tracker(face_cfg).track(np.ascontiguousarray(frames))
    if face_cfg is not None:
        track = merge_duplicates(track, face_cfg.duplicate_iou)
    return track.landmarks


def track_enlarged(frames: np.ndarray, face_cfg: FaceConfig | None) -> np.ndarray:
    """`_track`, on frames enlarged so their shorter side is at least MEASURE_MIN_SIDE; landmarks in the
    given frames' pixels."""
    side = min(frames.shape[1:3])
    if side >= MEASURE_MIN_SIDE:
        return _track(frames, face_cfg)
    scale = MEASURE_MIN_SIDE / side
    size = (round(frames.shape[2] * scale), round(frames.shape[1] * scale))  # (width, height) for cv2
    enlarged = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC) for frame in frames])
    landmarks = _track(enlarged, face_cfg)
    return landmarks / np.array([size[0] / frames.shape[2], size[1] / frames.shape[1], size[0] / frames.shape[2]])


def _still_landmarks(image: np.ndarray, face_cfg: FaceConfig | None) -> np.ndarray:
    """(478, 3) landmarks of one still (H, W, 3) image (NaN without a face)."""
    return _track(np.repeat(image[None], STILL_REPEATS, axis=0), face_cfg)[-1]


def sharpness_ratio(
    generated_frames: np.ndarray,
    portrait: np.ndarray,
    face_cfg: FaceConfig | None = None,
    *,
    landmarks: np.ndarray | None = None,
    portrait_landmarks: np.ndarray | None = None,
) -> float:
    """Median over frames of the generated face's sharpness over the portrait face's (dimensionless).

    `generated_frames` (T, H, W, 3) and `portrait` (h, w, 3) uint8 RGB. The face region of each is
    the bounding box of its FaceMesh landmarks (tracked here unless given: `landmarks` (T, 478, 3),
    `portrait_landmarks` (478, 3) pixels). Both are measured at the same pixel scale: for every frame
    the portrait's grey face crop is resized to that frame's face-crop size (width and height) before
    its Laplacian variance is taken, since the variance grows as an image is shrunk. The resize is
    Lanczos: at a factor near 1, INTER_AREA or bilinear resampling blurs the portrait by itself
    (measured on vid01-03 against their own first frame: ratio 1.5-1.6 with INTER_AREA, 0.99-1.10
    with Lanczos, 0.99-1.11 unresampled). 1 means as sharp as the portrait, < 1 blurrier. NaN when
    the portrait or every frame lacks a face, or the portrait face is flat (zero variance).
    """
    if landmarks is None:
        landmarks = _track(generated_frames, face_cfg)
    if portrait_landmarks is None:
        portrait_landmarks = _still_landmarks(portrait, face_cfg)
    portrait_box = face_box(portrait_landmarks, portrait.shape[:2])
    if portrait_box is None:
        return float("nan")
    portrait_face = _grey(portrait, portrait_box)
    ratios = []
    if len(landmarks) != len(generated_frames):
        raise ValueError(f"{len(landmarks)} landmark frames for {len(generated_frames)} frames")
    for frame, points in zip(generated_frames, landmarks, strict=True):
        box = face_box(points, frame.shape[:2])
        if box is None:
            continue
        size = (box[2] - box[0], box[3] - box[1])  # (width, height) for cv2
        reference = _laplacian_variance(cv2.resize(portrait_face, size, interpolation=cv2.INTER_LANCZOS4))
        if reference > 0:
            ratios.append(sharpness(frame, box) / reference)
    return float(np.median(ratios)) if ratios else float("nan")


def yaw_jitter(yaw_deg: np.ndarray) -> float:
    """Lag-1 autocorrelation of the frame-to-frame yaw change d[t] = yaw[t + 1] - yaw[t] (degrees).

    `yaw_deg` (T,) degrees, NaN without a face; a change is kept only between two consecutive frames
    with a face, and a product only between two consecutive kept changes. The estimator is the usual
    one: sum_t (d[t] - m)(d[t + 1] - m) / sum_t (d[t] - m)², m the mean change. Near -1: the yaw flips
    direction every frame (jitter); near +1: smooth turns; white noise in the yaw itself gives -0.5.
    Real clips with head motion are positive (0.60-0.64 on vid01-03), but nearly still heads, where
    landmark noise is most of the change, give about 0 (-0.21 to -0.02 on vid04-06). NaN with fewer
    than MIN_PAIRS pairs or a constant yaw.
    """
    change = np.diff(np.asarray(yaw_deg, dtype=np.float64))
    finite = np.isfinite(change)
    if finite.sum() < 2:
        return float("nan")
    centred = change - change[finite].mean()
    pairs = finite[:-1] & finite[1:]
    denominator = np.sum(centred[finite] ** 2)
    if pairs.sum() < MIN_PAIRS or denominator <= 0:
        return float("nan")
    return float(np.sum(centred[:-1][pairs] * centred[1:][pairs]) / denominator)


def measure_video(
    frames: np.ndarray,
    audio: np.ndarray,
    fps: float,
    portrait: np.ndarray | None = None,
    face_cfg: FaceConfig | None = None,
    *,
    sample_rate: int = 16000,
    max_lag: int = 2,
) -> dict:
    """Every measure of one clip: frames (T, H, W, 3) uint8 RGB at `fps` Hz, its audio (N,) float32
    mono at `sample_rate` Hz (16 kHz) starting with the first frame, and optionally the source
    portrait (h, w, 3) uint8 RGB. FaceMesh runs once over the frames (tracking mode, `face_cfg`'s
    confidences; MediaPipe's defaults without one), enlarged to MEASURE_MIN_SIDE when smaller.

    Returns {"mouth_r": float, "mouth_lag": int | None (frames, > 0: mouth after sound),
    "mouth_std": float, "sharpness_ratio": float | None (None without a portrait),
    "yaw_lag1_autocorr": float, "faces_found": fraction of frames with exactly one face,
    "frames": T}. Undefined figures are NaN.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    landmarks = track_enlarged(frames, face_cfg)
    found = np.isfinite(landmarks).all(axis=(1, 2))
    sync = lip_sync(mouth_opening(landmarks), loudness_envelope(audio, fps, sample_rate, len(frames)), max_lag)
    ratio = None if portrait is None else sharpness_ratio(frames, portrait, face_cfg, landmarks=landmarks)
    return {
        "mouth_r": sync["r"],
        "mouth_lag": sync["lag"],
        "mouth_std": sync["opening_std"],
        "sharpness_ratio": ratio,
        "yaw_lag1_autocorr": yaw_jitter(head_pose(landmarks).yaw),
        "faces_found": float(found.mean()) if len(found) else float("nan"),
        "frames": len(frames),
    }
