"""Stage face: MediaPipe FaceMesh tracking, splitting a clip into single-face runs, crops.

Two crop modes (params `preprocess.crop.mode`, frames defined in preprocessing/schema.py):
`box`, one fixed axis-aligned square per segment, so head roll, translation and scale stay in the
pixels as VASA-1's latent space needs them (arXiv 2404.10667 sec. 3.1: pose is one of the factors it
disentangles from the video); and `aligned`, a smoothed similarity per frame that levels the eyes.

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

from vasa.core import native_logs
from vasa.core.config import FaceConfig

N_LANDMARKS = 478  # FaceMesh with refine_landmarks: 468 mesh points + 2 x 5 iris points
FOREHEAD, CHIN = 10, 152  # top of the forehead and bottom of the chin on the mesh midline
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263  # the subject's right eye is on the image left
EYE_CORNERS = (33, 133, 362, 263)
MOUTH_CORNERS = (61, 291)
SEGMENT_REJECTS = ("no_face", "multiple_faces", "face_too_small", "track_jump", "too_short")


MAX_FACES = 2  # the graph looks for at most two faces: enough to see a second person
_face_found = threading.Event()  # set once any tracker of this process has found a face


@dataclass(frozen=True)
class FaceTrack:
    """FaceMesh output for one clip; landmarks are NaN wherever `faces != 1`."""

    landmarks: np.ndarray  # (T, 478, 3) float32 pixels: x, y in the frame, z = MediaPipe z * width
    faces: np.ndarray  # (T,) int faces counted in each frame (0, 1 or 2)
    detections: np.ndarray | None = None  # (T, 2, 478, 3) float32 every detection as found, NaN-padded

    @classmethod
    def from_detections(cls, detections: np.ndarray, counts: np.ndarray) -> FaceTrack:
        """The raw track: a frame has one face exactly when FaceMesh found one."""
        counts = np.asarray(counts, dtype=np.int64)
        landmarks = np.where((counts == 1)[:, None, None], detections[:, 0], np.nan).astype(np.float32)
        return cls(landmarks=landmarks, faces=counts, detections=detections)


class FaceMeshTracker:
    """MediaPipe FaceMesh in tracking mode (one graph, reused for many clips).

    Tracking mode (static_image_mode=False) reuses the previous frame's landmarks as the next
    region of interest, which is both faster and steadier than detecting in every frame.
    max_num_faces=2 makes the graph keep running the detector while it tracks fewer than two faces,
    so a second person entering is counted (VASA-1 drops clips with more than one person).
    """

    def __init__(self, min_detection_confidence: float, min_tracking_confidence: float) -> None:
        with native_logs.captured():  # MediaPipe's log lines go to `logging` (vasa/core/native_logs.py)
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False,
                refine_landmarks=True,
                max_num_faces=2,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence,
            )
            self._wait_until_open()

    def reset(self) -> None:
        """Forget the tracked faces: call before the first frame of each clip (see `track`)."""
        with native_logs.captured():
            self._mesh.reset()
            self._wait_until_open()

    def _wait_until_open(self) -> None:
        """Wait for the graph run just started: its threads load the models and log as they do, so
        this keeps those lines inside the caller's capture."""
        self._mesh._graph.wait_until_idle()  # what SolutionBase.process does after each frame

    def _process(self, frame: np.ndarray) -> list:
        """FaceMesh's faces in one (H, W, 3) uint8 RGB frame. The first face projected in a process
        logs a warning once (vasa/core/native_logs.py), so frames are captured until one was found."""
        if _face_found.is_set():
            return self._mesh.process(frame).multi_face_landmarks or []
        with native_logs.captured():
            found = self._mesh.process(frame).multi_face_landmarks or []
        if found:
            _face_found.set()
        return found

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detections in consecutive frames (T, H, W, 3) uint8 RGB, continuing from the last call.

        Returns ((T, 2, 478, 3) float32 pixels NaN-padded, (T,) int faces found). Call it chunk by
        chunk over a clip (after one `reset`): the tracking state carries across calls, so the result
        equals one call over all frames.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        height, width = frames.shape[1:3]
        scale = np.array([width, height, width], dtype=np.float32)
        detections = np.full((len(frames), MAX_FACES, N_LANDMARKS, 3), np.nan, dtype=np.float32)
        counts = np.zeros(len(frames), dtype=np.int64)
        for index, frame in enumerate(frames):
            found = self._process(np.ascontiguousarray(frame))
            counts[index] = len(found)
            for slot, face in enumerate(found[:MAX_FACES]):
                detections[index, slot] = np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float32) * scale
        return detections, counts

    def track(self, frames: np.ndarray) -> FaceTrack:
        """Landmarks of every frame of one clip, `frames` (T, H, W, 3) uint8 RGB (raw face counts).

        The graph keeps the last frame's faces as tracking state, so without a reset the first
        frames of a clip are tracked from the previous clip's face positions (measured: landmarks
        differ by up to 5 % of the image for 4 frames). `SolutionBase.reset()` closes the graph run
        and starts a new one with the same loaded models (~3 ms), after which the output is
        bit-identical to a fresh instance. Graph timestamps stay monotonic across resets: the
        solution adds 33333 us per frame to a counter that reset() does not rewind. The legacy face
        mesh graph has no timestamp-dependent smoothing, so variable frame timing (vid03) is moot.
        """
        self.reset()
        return FaceTrack.from_detections(*self.detect(frames))


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


def landmark_boxes(landmarks: np.ndarray) -> np.ndarray:
    """(..., 4) x0, y0, x1, y1 pixels: the 2D bounding box of (..., 478, 2|3) landmarks (NaN stays NaN)."""
    xy = landmarks[..., :2]
    return np.concatenate([xy.min(axis=-2), xy.max(axis=-2)], axis=-1)


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Intersection over union of (..., 4) boxes x0, y0, x1, y1 (NaN boxes give NaN)."""
    low, high = np.maximum(first[..., :2], second[..., :2]), np.minimum(first[..., 2:], second[..., 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=-1)
    area = np.prod(first[..., 2:] - first[..., :2], axis=-1) + np.prod(second[..., 2:] - second[..., :2], axis=-1)
    return inter / np.maximum(area - inter, 1e-9)


def merge_duplicates(track: FaceTrack, min_iou: float, previous: np.ndarray | None = None) -> FaceTrack:
    """One person is one face: a second detection whose box overlaps the other by IoU >= `min_iou`
    is the same face found twice (FaceMesh in tracking mode does this when its detector re-finds a
    face it already tracks: IoU 0.67-0.83 measured on a phone video), so the frame counts one face.
    Of the pair, the one nearest the previous frame's face is kept, so the track does not hop
    between the two. Detections that do not overlap stay two faces (a second person: VASA-1,
    arXiv 2404.10667 sec. 4.1, drops clips with more than one). Pure: returns a new FaceTrack.
    `previous` (2,) is the face centre before the first frame, for merging a clip chunk by chunk
    (`last_centre` of the previous chunk's result).
    """
    if track.detections is None:
        raise ValueError("merge_duplicates needs the raw detections (FaceTrack.from_detections)")
    detections, counts = track.detections, track.faces.copy()
    landmarks = np.array(track.landmarks, copy=True)
    boxes = landmark_boxes(detections)  # (T, 2, 4)
    overlap = box_iou(boxes[:, 0], boxes[:, 1])  # (T,) NaN unless two faces
    for index in range(len(counts)):
        if counts[index] == 2 and overlap[index] >= min_iou:
            pick = 0
            if previous is not None:
                centres = face_centre(detections[index])  # (2, 2)
                pick = int(np.argmin(np.linalg.norm(centres - previous, axis=-1)))
            landmarks[index] = detections[index, pick]
            counts[index] = 1
        if counts[index] == 1:
            previous = face_centre(landmarks[index : index + 1])[0]
    return FaceTrack(landmarks=landmarks, faces=counts, detections=detections)


def last_centre(track: FaceTrack, default: np.ndarray | None = None) -> np.ndarray | None:
    """(2,) face centre of the track's last frame with one face, else `default`."""
    single = np.flatnonzero(track.faces == 1)
    return default if len(single) == 0 else face_centre(track.landmarks[single[-1] : single[-1] + 1])[0]


BRIDGEABLE = ("no_face", "multiple_faces")


def find_segments(track: FaceTrack, cfg: FaceConfig, min_frames: int) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Runs of usable frames, [(start, end_exclusive)], and frames left out per reason.

    A frame is usable with exactly one face at least `cfg.min_face_px` high. A move of the face
    centre by more than `cfg.max_jump` face heights from the previous usable frame is a cut or a
    tracker switch: that frame is dropped (its landmarks may still come from the old track) and a
    new run starts after it. A gap of at most `cfg.max_gap_frames` frames with no face or two faces
    between usable frames, across which the face moves no more than `cfg.max_jump` face heights, is
    bridged: its frames stay in the run with NaN landmarks (fill them with `fill_gaps`), so a missed
    detection or a stray one does not cut the clip. Runs shorter than `min_frames` are dropped as
    "too_short". Every frame is either in a returned run or counted under exactly one reason of
    SEGMENT_REJECTS.
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
    _bridge_gaps(reason, centre, height, cfg)

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


def _bridge_gaps(reason: np.ndarray, centre: np.ndarray, height: np.ndarray, cfg: FaceConfig) -> None:
    """Mark short no-face / two-face gaps between usable frames usable (in place), unless the face
    jumped across the gap (a cut hidden by black frames stays a cut)."""
    index = 0
    while index < len(reason):
        if reason[index] not in BRIDGEABLE:
            index += 1
            continue
        end = index
        while end < len(reason) and reason[end] in BRIDGEABLE:
            end += 1
        short = index > 0 and end < len(reason) and end - index <= cfg.max_gap_frames
        if short and reason[index - 1] == "" and reason[end] == "":
            move = np.linalg.norm(centre[end] - centre[index - 1]) / height[end]
            if move <= cfg.max_jump:
                reason[index:end] = ""
        index = end


def fill_gaps(landmarks: np.ndarray) -> np.ndarray:
    """(T, 478, 3) landmarks with NaN frames (bridged gaps) linearly interpolated from their
    neighbours, nearest at the ends. Raises ValueError when no frame has a face."""
    flat = landmarks.reshape(len(landmarks), -1)
    if np.isfinite(flat).all():
        return landmarks
    return _fill_gaps(flat).reshape(landmarks.shape).astype(landmarks.dtype)


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


def box_transform(
    landmarks: np.ndarray, size: int, crop_scale: float, frame_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """(2, 3) source pixels -> crop pixels of ONE axis-aligned square for a whole segment.

    The box is centred on the median face centre; its side is `crop_scale` times a robust maximum
    (95th percentile) of the face height, widened where the face moves further, so the face stays
    inside: half the side covers the largest (98th percentile) move of the centre plus 0.6 face
    heights. Given the frame size (H, W), a box that would stick out is first narrowed toward the
    frame's shorter side (never below what keeps the face inside) and then shifted into the frame:
    sources that are already face crops (VoxCeleb2's 224² tracks) would otherwise get a third of
    every crop made of filled border. Corner and side are whole pixels, so cropping is an exact
    sub-window and a resize. Frames without a face (NaN) are ignored; none at all raises ValueError.
    """
    height, centre = face_height(landmarks), face_centre(landmarks)  # (T,), (T, 2) pixels
    valid = np.isfinite(height) & np.isfinite(centre).all(axis=1)
    if not valid.any():
        raise ValueError("no frame with a face: cannot place a crop")
    tall = float(np.percentile(height[valid], 95))
    middle = np.median(centre[valid], axis=0)
    spread = float(np.percentile(np.abs(centre[valid] - middle), 98, axis=0).max())
    needed = 2 * spread + 1.2 * tall  # keeps the face inside as it moves
    side = max(crop_scale * tall, needed)
    corner = middle - side / 2
    if frame_hw is not None:
        frame_h, frame_w = frame_hw
        side = max(min(side, frame_h, frame_w), needed)
        corner = middle - side / 2
        # Shift into the frame along each axis where the box fits; centre it where it does not.
        for axis, extent in ((0, frame_w), (1, frame_h)):
            corner[axis] = np.clip(corner[axis], 0, extent - side) if side <= extent else (extent - side) / 2
    side = max(2, round(side))
    x0, y0 = np.round(corner)
    scale = size / side
    return np.array([[scale, 0.0, -scale * x0], [0.0, scale, -scale * y0]])


def box_of(transform: np.ndarray, size: int) -> tuple[int, int, int]:
    """(x0, y0, side) source pixels of the square an axis-aligned (2, 3) transform crops."""
    scale = float(transform[0, 0])
    return round(-transform[0, 2] / scale), round(-transform[1, 2] / scale), round(size / scale)


def outside_fraction(transforms: np.ndarray, size: int, source_hw: tuple[int, int], grid: int = 32) -> np.ndarray:
    """(T,) fraction of each crop's area that lies outside the source frame (H, W), from a grid of
    grid x grid crop pixel centres mapped back into the source."""
    centres = (np.arange(grid) + 0.5) * size / grid
    points = np.stack(np.meshgrid(centres, centres), axis=-1).reshape(-1, 2)  # (G², 2) crop pixels
    linear, offset = transforms[:, :, :2], transforms[:, :, 2]
    source = np.einsum("tij,tnj->tni", np.linalg.inv(linear), points[None] - offset[:, None])  # (T, G², 2)
    height, width = source_hw
    inside = (source[..., 0] >= 0) & (source[..., 0] <= width) & (source[..., 1] >= 0) & (source[..., 1] <= height)
    return 1.0 - inside.mean(axis=1)


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


BORDERS = {"replicate": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101}


def crop_box(frame: np.ndarray, box: tuple[int, int, int], size: int, border: str = "replicate") -> np.ndarray:
    """(size, size, 3) uint8 crop of the square `box` = (x0, y0, side) source pixels of (H, W, 3) `frame`.

    A sub-window and one resize (INTER_AREA when shrinking: an exact box filter, no aliasing;
    INTER_CUBIC when enlarging), the cheap path of the fixed `box` crop. Parts of the box outside the
    frame are filled by `border` (edge replication or reflection, never black: black wedges would be
    learned as content).
    """
    x0, y0, side = box
    height, width = frame.shape[:2]
    left, top = max(x0, 0), max(y0, 0)
    right, bottom = min(x0 + side, width), min(y0 + side, height)
    if right <= left or bottom <= top:
        raise ValueError(f"crop box {box} does not overlap the {width}x{height} frame")
    region = frame[top:bottom, left:right]
    pads = (top - y0, y0 + side - bottom, left - x0, x0 + side - right)
    if any(pads):
        region = cv2.copyMakeBorder(region, *pads, BORDERS[border])
    if side == size:
        return np.ascontiguousarray(region)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(region, (size, size), interpolation=interpolation)


def crop_frame(frame: np.ndarray, transform: np.ndarray, size: int, border: str = "replicate") -> np.ndarray:
    """(size, size, 3) crop of one (H, W, 3) frame by a (2, 3) source -> crop transform: the sub-window
    path for an axis-aligned square with a whole-pixel corner and side, a warp otherwise."""
    x0, y0, side = box_of(transform, size) if transform[0, 1] == 0 == transform[1, 0] else (0, 0, 0)
    if side and np.allclose(transform, [[size / side, 0, -x0 * size / side], [0, size / side, -y0 * size / side]]):
        return crop_box(frame, (x0, y0, side), size, border)
    return _crop_one(frame, transform, size, border)


def apply_crops(frames: np.ndarray, transforms: np.ndarray, size: int, border: str = "replicate") -> np.ndarray:
    """(T, size, size, 3) uint8 crops of (T, H, W, 3) uint8 `frames` by (T, 2, 3) transforms.

    warpAffine has no area filter, and bilinear sampling of a 512² face into 128² aliases (hair,
    teeth, stubble shimmer from frame to frame). So when a crop shrinks, the region it covers is
    first reduced with INTER_AREA (an exact box filter) to the crop's resolution, and the remaining
    rotation and sub-pixel shift, near scale 1, uses INTER_CUBIC, which stays sharper than bilinear
    there. Cutting the region first keeps the cost independent of the source resolution.
    """
    crops = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for index, (frame, transform) in enumerate(zip(frames, transforms, strict=True)):
        crops[index] = crop_frame(frame, transform, size, border)
    return crops


def _crop_one(frame: np.ndarray, transform: np.ndarray, size: int, border: str) -> np.ndarray:
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
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=BORDERS[border])
