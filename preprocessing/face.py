"""Stage face: MediaPipe FaceMesh tracking, splitting a clip into single-face runs, aligned crops.

Coordinates are continuous pixels of the source frame: (0, 0) is the top-left corner of the top-left
pixel and (W, H) the bottom-right corner of the last one, i.e. MediaPipe's normalised coordinates
times the image size. z is MediaPipe's relative depth times the image width (MediaPipe gives z "at
roughly the same scale as x"); it is positive away from the camera. So (x, y, z) is a right-handed
frame with x right, y down, z into the scene: the OpenCV camera convention.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import cv2
import mediapipe as mp
import numpy as np

from vasa.config import FaceConfig

N_LANDMARKS = 478  # FaceMesh with refine_landmarks: 468 mesh points + 2 x 5 iris points
FOREHEAD, CHIN = 10, 152  # top of the forehead and bottom of the chin on the mesh midline
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263  # the subject's right eye is on the image left
EYE_CORNERS = (33, 133, 362, 263)
MOUTH_CORNERS = (61, 291)
SEGMENT_REJECTS = ("no_face", "multiple_faces", "face_too_small", "track_jump", "too_short")


@dataclass(frozen=True)
class FaceTrack:
    """FaceMesh output for one clip; landmarks are NaN wherever `faces != 1`."""

    landmarks: np.ndarray  # (T, 478, 3) float32 pixels: x, y in the frame, z = MediaPipe z * width
    faces: np.ndarray  # (T,) int faces found in each frame (0, 1 or 2: the graph looks for at most 2)


class FaceMeshTracker:
    """MediaPipe FaceMesh in tracking mode (one graph, reused for many clips).

    Tracking mode (static_image_mode=False) reuses the previous frame's landmarks as the next
    region of interest, which is both faster and steadier than detecting in every frame.
    max_num_faces=2 makes the graph keep running the detector while it tracks fewer than two faces,
    so a second person entering is counted (VASA-1 drops clips with more than one person).
    """

    def __init__(self, min_detection_confidence: float, min_tracking_confidence: float) -> None:
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            refine_landmarks=True,
            max_num_faces=2,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )

    def track(self, frames: np.ndarray) -> FaceTrack:
        """Landmarks of every frame of one clip, `frames` (T, H, W, 3) uint8 RGB.

        The graph keeps the last frame's faces as tracking state, so without a reset the first
        frames of a clip are tracked from the previous clip's face positions (measured: landmarks
        differ by up to 5 % of the image for 4 frames). `SolutionBase.reset()` closes the graph run
        and starts a new one with the same loaded models (~3 ms), after which the output is
        bit-identical to a fresh instance. Graph timestamps stay monotonic across resets: the
        solution adds 33333 us per frame to a counter that reset() does not rewind. The legacy face
        mesh graph has no timestamp-dependent smoothing, so variable frame timing (vid03) is moot.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        height, width = frames.shape[1:3]
        scale = np.array([width, height, width], dtype=np.float32)
        self._mesh.reset()
        landmarks = np.full((len(frames), N_LANDMARKS, 3), np.nan, dtype=np.float32)  # (T, 478, 3) pixels
        faces = np.zeros(len(frames), dtype=np.int64)
        for index, frame in enumerate(frames):
            found = self._mesh.process(np.ascontiguousarray(frame)).multi_face_landmarks or []
            faces[index] = len(found)
            if len(found) == 1:
                points = np.array([(p.x, p.y, p.z) for p in found[0].landmark], dtype=np.float32)
                landmarks[index] = points * scale
        return FaceTrack(landmarks=landmarks, faces=faces)


_local = threading.local()


def get_tracker(cfg: FaceConfig) -> FaceMeshTracker:
    """The tracker of this process and thread for `cfg`, built on first use.

    Building is cheap but each graph holds its own models and threads, so a worker keeps one per
    config rather than one per clip. MediaPipe graphs are not thread-safe (one per thread), and a
    graph inherited through fork() has lost its threads, so the key includes the process id.
    """
    trackers = getattr(_local, "trackers", None)
    if trackers is None:
        trackers = _local.trackers = {}
    key = (os.getpid(), cfg.min_detection_confidence, cfg.min_tracking_confidence)
    if key not in trackers:
        trackers[key] = FaceMeshTracker(cfg.min_detection_confidence, cfg.min_tracking_confidence)
    return trackers[key]


def face_height(landmarks: np.ndarray) -> np.ndarray:
    """(T,) pixels from forehead (10) to chin (152) in 3D, so nodding does not shrink it."""
    return np.linalg.norm(landmarks[:, CHIN] - landmarks[:, FOREHEAD], axis=-1)


def face_centre(landmarks: np.ndarray) -> np.ndarray:
    """(T, 2) pixels halfway between the eye-corner centre and the mouth-corner centre.

    Mouth corners rather than lips: the inner lips move with every syllable.
    """
    eyes = landmarks[:, EYE_CORNERS, :2].mean(axis=1)
    mouth = landmarks[:, MOUTH_CORNERS, :2].mean(axis=1)
    return (eyes + mouth) / 2


def find_segments(track: FaceTrack, cfg: FaceConfig, min_frames: int) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Runs of usable frames, [(start, end_exclusive)], and frames left out per reason.

    A frame is usable with exactly one face at least `cfg.min_face_px` high. A move of the face
    centre by more than `cfg.max_jump` face heights from the previous usable frame is a cut or a
    tracker switch: that frame is dropped (its landmarks may still come from the old track) and a
    new run starts after it. Runs shorter than `min_frames` are dropped as "too_short". Every frame
    is either in a returned run or counted under exactly one reason of SEGMENT_REJECTS.
    """
    faces = np.asarray(track.faces)
    height = face_height(track.landmarks)  # (T,) pixels, NaN without one face
    centre = face_centre(track.landmarks)  # (T, 2) pixels
    reason = np.full(len(faces), "", dtype=object)
    reason[faces == 0] = "no_face"
    reason[faces > 1] = "multiple_faces"
    reason[(faces == 1) & ~(height >= cfg.min_face_px)] = "face_too_small"
    move = np.linalg.norm(np.diff(centre, axis=0), axis=-1) / height[1:]  # (T-1,) face heights
    jumped = np.concatenate([[False], (reason[:-1] == "") & (reason[1:] == "") & (move > cfg.max_jump)])
    reason[jumped] = "track_jump"

    segments = []
    start = None
    for index, why in enumerate([*reason, "end"]):
        if why == "" and start is None:
            start = index
        elif why != "" and start is not None:
            if index - start >= min_frames:
                segments.append((start, index))
            else:
                reason[start:index] = "too_short"
            start = None
    counts = {name: int(np.sum(reason == name)) for name in SEGMENT_REJECTS}
    return segments, counts


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Moving average along axis 0, edge-padded so the output has the input's length and the first
    and last frames are not pulled toward zero. An even window is widened by one to stay centred."""
    x = np.asarray(x, dtype=np.float64)
    if window <= 1 or len(x) == 0:
        return x.copy()
    half = window // 2
    padded = np.concatenate([np.repeat(x[:1], half, axis=0), x, np.repeat(x[-1:], half, axis=0)])
    cumulative = np.cumsum(np.concatenate([np.zeros_like(x[:1]), padded]), axis=0)
    return (cumulative[2 * half + 1 :] - cumulative[: -2 * half - 1]) / (2 * half + 1)


def _fill_gaps(values: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN rows of (T, D) values (nearest value at the ends)."""
    valid = np.all(np.isfinite(values), axis=1)
    if not valid.any():
        raise ValueError("no frame with a face: cannot place a crop")
    frames = np.arange(len(values))
    return np.stack([np.interp(frames, frames[valid], column[valid]) for column in values.T], axis=1)


def crop_transforms(landmarks: np.ndarray, size: int, cfg: FaceConfig) -> np.ndarray:
    """(T, 2, 3) similarity transforms, source pixels -> crop pixels, for a `size`² aligned crop.

    The crop is rotated so the eye line is horizontal, its side is `cfg.crop_scale` face heights and
    its centre is halfway between eyes and mouth. Angle, log-scale and centre are smoothed over
    `cfg.smooth_frames` (angle unwrapped first): smoothing the parameters keeps each matrix a
    similarity, whereas averaging matrices would shrink them when the angle changes. Frames without
    a face take parameters interpolated from their neighbours; a clip with none raises ValueError.
    Pass one segment of find_segments at a time, so smoothing never bridges a cut.
    """
    eye_line = landmarks[:, LEFT_EYE_OUTER, :2] - landmarks[:, RIGHT_EYE_OUTER, :2]  # (T, 2) pixels
    angle = np.arctan2(eye_line[:, 1], eye_line[:, 0])  # (T,) radians, clockwise in the image
    params = np.column_stack(
        [angle, np.log(size / (cfg.crop_scale * face_height(landmarks))), face_centre(landmarks)]
    )  # (T, 4): angle, log(crop px per source px), centre x, centre y
    params = _fill_gaps(params)
    params[:, 0] = np.unwrap(params[:, 0])
    angle, log_scale, centre_x, centre_y = smooth(params, cfg.smooth_frames).T
    cos, sin = np.exp(log_scale) * np.cos(angle), np.exp(log_scale) * np.sin(angle)
    # Rotating by -angle levels the eye line: [[cos, sin], [-sin, cos]] scaled.
    linear = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], axis=1)  # (T, 2, 2)
    offset = size / 2 - np.einsum("tij,tj->ti", linear, np.column_stack([centre_x, centre_y]))
    return np.concatenate([linear, offset[:, :, None]], axis=2)


def transform_scale(transforms: np.ndarray) -> np.ndarray:
    """(T,) scale of each similarity transform (crop pixels per source pixel)."""
    return np.sqrt(np.abs(np.linalg.det(transforms[:, :, :2])))


def transform_points(points: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Map (T, N, 2|3) source pixels into the crops: x, y by the transform, z scaled by its scale."""
    points = np.asarray(points)
    mapped = np.array(points, dtype=np.result_type(points, np.float32), copy=True)
    mapped[..., :2] = np.einsum("tij,tnj->tni", transforms[:, :, :2], points[..., :2]) + transforms[:, None, :, 2]
    if points.shape[-1] == 3:
        mapped[..., 2] = points[..., 2] * transform_scale(transforms)[:, None]
    return mapped


def apply_crops(frames: np.ndarray, transforms: np.ndarray, size: int) -> np.ndarray:
    """(T, size, size, 3) uint8 crops of (T, H, W, 3) uint8 `frames`.

    warpAffine has no area filter, and bilinear sampling of a 512² face into 128² aliases (hair,
    teeth, stubble shimmer from frame to frame). So when a crop shrinks, the region it covers is
    first reduced with INTER_AREA (an exact box filter) to the crop's resolution, and the remaining
    rotation and sub-pixel shift, near scale 1, uses INTER_CUBIC, which stays sharper than bilinear
    there. Cutting the region first keeps the cost independent of the source resolution.
    """
    crops = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for index, (frame, transform) in enumerate(zip(frames, transforms, strict=True)):
        crops[index] = _crop_one(frame, transform, size)
    return crops


def _crop_one(frame: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    linear, offset = transform[:, :2].astype(np.float64), transform[:, 2].astype(np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(linear))))
    if scale < 1:
        # The crop's footprint in the source (corners mapped back), 2 px margin for the filters.
        inverse = np.linalg.inv(linear)
        corners = (np.array([[0, 0], [size, 0], [0, size], [size, size]]) - offset) @ inverse.T
        x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 2, 0)
        x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 2, frame.shape[1::-1])
        if x1 > x0 and y1 > y0:
            region = frame[y0:y1, x0:x1]
            width, height = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
            frame = cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)
            # Continuous coordinates: source = region corner + reduced / per-axis factor.
            factor = np.array([width / (x1 - x0), height / (y1 - y0)])
            offset = offset + linear @ np.array([x0, y0], dtype=np.float64)
            linear = linear / factor[None, :]
    # warpAffine samples at pixel centres (integer coordinates); our transforms map continuous
    # coordinates (pixel corners at integers), so shift by half a pixel on both sides.
    centred = offset + linear @ np.array([0.5, 0.5]) - 0.5
    matrix = np.concatenate([linear, centred[:, None]], axis=1)
    return cv2.warpAffine(
        frame, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
