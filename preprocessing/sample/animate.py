"""Animating a still portrait: speech-driven mouth, blinks and 3D head motion.

Pure functions: a `Portrait`, per-frame motion arrays and a seed in, frames out. Each frame is made
in two steps, both backward warps of pixels:

1. Expression, in portrait space: a smooth vertical displacement field drops the jaw below the lip
   line and slides the upper lids down over the eyes; the mouth interior and teeth are painted into
   the opened gap.
2. Rigid 3D head motion: every portrait pixel gets a depth (`FaceRig.depth`: the portrait's own
   FaceMesh z on the face, extended smoothly over hair and neck by a thin-plate spline that levels
   off at the depth of the head's sides), is lifted into 3D through a pinhole camera, rotated about
   a pivot behind the face (near the ears) and re-projected. So the nose moves against the cheeks
   (parallax) as it does on a real turning head, which a 3D pose fit can measure. The rotation fades
   out over the background and shoulders (`FaceRig.head_weight`), so they stay put; a small camera
   pan and zoom then moves the whole picture. The forward map (portrait -> frame) is inverted by a
   few fixed-point steps, which converge because the displacement changes slowly across pixels.

Why real 3D: VASA-1 (arXiv 2404.10667, sec. 3.1-3.2) learns head pose as part of a 3D-aware motion
latent and conditions on it, so the corpus's head motion must be what a 3D pose fit measures; the
truth written beside each clip is the rendered head's pose (`FaceRig.head_pose`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from preprocessing.pose import euler_to_matrix, head_pose, matrix_to_euler
from preprocessing.sample.portraits import (
    CHIN,
    EYES,
    FOREHEAD,
    LOWER_INNER_LIP,
    MOUTH_CORNERS,
    UPPER_INNER_LIP,
    Portrait,
)
from vasa.core.config import MotionConfig

MOUTH_INTERIOR_RGB = (70, 22, 28)
TEETH_RGB = (222, 216, 205)
BLINK_SHAPE = (0.45, 0.9, 1.0, 0.75, 0.35, 0.1)  # lid closure over consecutive frames


@dataclass(frozen=True)
class MotionTrack:
    """Per-frame animation controls, each (T,) float64."""

    # The head's rotation away from the portrait's own pose, about the camera axes, in the project's
    # one sign convention (preprocessing/schema.py): R = Rz(roll) @ Rx(pitch) @ Ry(yaw).
    yaw: np.ndarray  # degrees, > 0: the subject turns to their right (nose toward image left)
    pitch: np.ndarray  # degrees, > 0: the subject looks down
    roll: np.ndarray  # degrees, > 0: the head tilts clockwise in the image
    shift_x: np.ndarray  # fraction of frame size
    shift_y: np.ndarray  # fraction of frame size
    scale: np.ndarray  # relative, 1.0 = portrait size
    mouth: np.ndarray  # jaw opening in [0, 1]
    blink: np.ndarray  # eyelid closure in [0, 1]

    def as_dict(self) -> dict[str, list[float]]:
        return {name: np.round(getattr(self, name), 4).tolist() for name in self.__dataclass_fields__}


def speech_envelope(audio: np.ndarray, sample_rate: int, fps: int) -> np.ndarray:
    """RMS loudness per video frame, (T,) in [0, 1]; T = len(audio) / (sample_rate / fps).

    Window = one video frame (40 ms at 25 fps) centred on the frame; normalised by the 95th
    percentile of voiced frames so quiet and loud voices open the mouth alike.
    """
    hop = sample_rate // fps
    n_frames = len(audio) // hop
    padded = np.pad(audio.astype(np.float64), (hop // 2, hop))
    frames = np.lib.stride_tricks.sliding_window_view(padded, hop)[: n_frames * hop : hop]
    rms = np.sqrt(np.mean(frames**2, axis=1))
    voiced = rms[rms > 0.1 * rms.max()] if rms.max() > 0 else rms
    reference = np.percentile(voiced, 95) if voiced.size else 1.0
    return np.clip(rms / max(reference, 1e-8), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, n: int, fps: int, low_hz: float, high_hz: float) -> np.ndarray:
    """Sum of three random sinusoids in [low_hz, high_hz]; (n,) scaled to peak 1."""
    t = np.arange(n) / fps
    signal = np.zeros(n)
    for _ in range(3):
        freq, phase, weight = rng.uniform(low_hz, high_hz), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1)
        signal += weight * np.sin(2 * np.pi * freq * t + phase)
    return signal / np.abs(signal).max()


def _attack_release(x: np.ndarray, attack: float, release: float) -> np.ndarray:
    """One-pole smoother with separate rise/fall rates (jaw opens fast, closes slower)."""
    y = np.empty_like(x)
    state = 0.0
    for i, value in enumerate(x):
        rate = attack if value > state else release
        state += rate * (value - state)
        y[i] = state
    return y


def motion_track(
    envelope: np.ndarray, fps: int, motion: MotionConfig, blinks_per_minute: float, rng: np.random.Generator
) -> MotionTrack:
    """Head motion (slow random drift + nods with speech), jaw from loudness, random blinks."""
    n = len(envelope)
    loud = _attack_release(envelope, attack=0.7, release=0.45)
    nod = _attack_release(envelope, attack=0.15, release=0.08)
    blink = np.zeros(n)
    expected = blinks_per_minute * n / fps / 60
    for start in np.sort(rng.choice(max(n - len(BLINK_SHAPE), 1), size=rng.poisson(expected), replace=True)):
        span = blink[start : start + len(BLINK_SHAPE)]
        np.maximum(span, BLINK_SHAPE[: len(span)], out=span)
    # Yaw and pitch sway at 0.1-0.8 Hz: turns and nods as a speaker makes them. At 0.08-0.4 Hz (earlier
    # corpora) a frame's turn was smaller than FaceMesh's frame-to-frame noise (~0.3 degrees), so even the
    # real clips scored near 0 on the yaw-change autocorrelation a viewer's smoothness check reads
    # (vasa/evaluation/independent.py; docs/BENCHMARKS.md "Head motion").
    return MotionTrack(
        yaw=motion.yaw_deg * _smooth_noise(rng, n, fps, 0.1, 0.8),
        pitch=motion.pitch_deg * _smooth_noise(rng, n, fps, 0.1, 0.8) + motion.nod_with_speech_deg * nod,
        roll=motion.roll_deg * _smooth_noise(rng, n, fps, 0.05, 0.3),
        shift_x=motion.shift * _smooth_noise(rng, n, fps, 0.05, 0.25),
        shift_y=motion.shift * _smooth_noise(rng, n, fps, 0.05, 0.25),
        scale=1.0 + motion.scale * _smooth_noise(rng, n, fps, 0.03, 0.15),
        mouth=np.clip(loud, 0.0, 1.0) ** 0.8,
        blink=blink,
    )


# Pinhole camera of the portrait: focal length in frame sides (3: a ~19 degree field of view, a
# portrait lens at conversational distance), principal point at the frame centre.
FOCAL_PER_SIZE = 3.0
# The face oval of the FaceMesh topology (forehead 10 clockwise round to 109): fitted by an ellipse
# that scales the head's extension (hair, ears, neck) and the fade of the head motion.
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
FACE_SIDES = (234, 454)  # the widest points of the face oval, in front of the ears
N_MESH = 468  # FaceMesh points with a surface depth (the 10 refined iris points after them are left out)
# Elliptical radius (face oval = 1) where the depth levels off at the head-side depth, and the span
# over which the head motion fades to none: the hair moves with the head, the background does not.
HEAD_EDGE, BACKGROUND_EDGE = 1.35, 2.0
DEPTH_RINGS = (HEAD_EDGE, 1.7, 2.2, 3.0)  # elliptical radii of the level control points
DEPTH_GRID = 64  # the depth spline is evaluated on a DEPTH_GRID² grid and resized (it is smooth)
DEPTH_SMOOTHING = 3e-2  # thin-plate regularisation in face-height units: FaceMesh z is a noisy estimate
MAP_STRIDE = 2  # the head's backward map is solved on every 2nd pixel and resized (it is smooth)
FIXED_POINT_STEPS = 6  # inverse-map iterations: the error shrinks by the displacement gradient (<= 0.6) per step


class FaceRig:
    """Static fields of one portrait (expression fields, depth, head weight), combined by `render`."""

    def __init__(self, portrait: Portrait, mouth_max_open: float) -> None:
        self.portrait = portrait
        size = portrait.image.shape[0]
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        self.grid_x, self.grid_y = xs, ys
        left, right = portrait.points(MOUTH_CORNERS)
        mouth_width = float(np.linalg.norm(right - left))
        self.face_height = float(np.linalg.norm(portrait.point(CHIN) - portrait.point(FOREHEAD)))
        self.max_drop = mouth_max_open * mouth_width  # pixels at mouth == 1
        self.jaw = self._jaw_field(xs, ys, mouth_width)
        # How far each lower-lip point travels per pixel of drop: the field just below the lip line.
        self.lower_lip_travel = np.exp(
            -(((self.portrait.points(LOWER_INNER_LIP)[:, 0] - self.mouth_x) / (0.75 * mouth_width)) ** 2)
        )
        self.lids = [self._lid_field(xs, ys, eye) for eye in EYES]
        self.upper_lip = portrait.points(UPPER_INNER_LIP)
        self.lower_lip = portrait.points(LOWER_INNER_LIP)
        centre = (portrait.point(CHIN) + portrait.point(FOREHEAD)) / 2
        self.head_centre = centre.astype(np.float64)
        self.focal = FOCAL_PER_SIZE * size
        mesh = portrait.mesh
        self.pivot_depth = float(mesh[list(FACE_SIDES), 2].mean())  # portrait z of the rotation centre
        self.reference_depth = float(mesh[:N_MESH, 2].mean())  # portrait z imaged 1:1 at `focal`
        radius = _oval_radius(mesh[list(FACE_OVAL), :2], size)  # (S, S) face oval = 1
        self.depth = _depth_map(mesh, self.pivot_depth, self.face_height, size)
        # Smoothstep from 1 inside HEAD_EDGE to 0 beyond BACKGROUND_EDGE.
        fade = np.clip((radius - HEAD_EDGE) / (BACKGROUND_EDGE - HEAD_EDGE), 0, 1)
        self.head_weight = (1 - fade * fade * (3 - 2 * fade)).astype(np.float32)
        self.fine = _Grid(xs, ys, self.head_weight)
        # cv2.resize's pixel-centre alignment: coarse pixel j sits at fine index (j + 0.5) * stride - 0.5.
        small = -(-size // MAP_STRIDE)
        centres = ((np.arange(small) + 0.5) * size / small - 0.5).astype(np.float32)
        coarse_x, coarse_y = np.meshgrid(centres, centres)
        coarse_weight = cv2.resize(self.head_weight, (small, small), interpolation=cv2.INTER_AREA)
        self.coarse = _Grid(coarse_x, coarse_y, coarse_weight)
        # The portrait's own head pose, as preprocessing.pose measures it on its stored FaceMesh.
        self.rest_rotation = head_pose(mesh[None]).rotation[0]  # (3, 3)

    def _jaw_field(self, xs: np.ndarray, ys: np.ndarray, mouth_width: float) -> np.ndarray:
        """Fraction of the jaw drop each output pixel takes: 1 on the lower lip and chin, 0 above
        the lip line; sharp between the lips (the mouth opens), smooth beside them (cheeks stretch).
        """
        upper = self.portrait.points(UPPER_INNER_LIP)
        self.mouth_x = cx = float(upper[:, 0].mean())
        lip_y = np.interp(xs, upper[:, 0], upper[:, 1]).astype(np.float32) + 0.5
        beside = np.maximum(np.abs(xs - cx) - 0.45 * mouth_width, 0)
        band = 1.0 + 1.5 * beside
        below = np.clip((ys - lip_y) / band, 0, 1)
        chin_y = self.portrait.point(CHIN)[1]
        across = np.exp(-(((xs - cx) / (0.75 * mouth_width)) ** 2))
        fade_below_chin = np.exp(-((np.maximum(ys - chin_y, 0) / (0.25 * mouth_width + 1)) ** 2))
        return (below * across * fade_below_chin).astype(np.float32)

    def _lid_field(self, xs: np.ndarray, ys: np.ndarray, eye: tuple[int, int, int, int]) -> tuple[np.ndarray, float]:
        corner_a, corner_b, upper, lower = (self.portrait.point(i) for i in eye)
        cx, cy = (corner_a + corner_b) / 2
        width = float(np.linalg.norm(corner_b - corner_a))
        opening = max(float(lower[1] - upper[1]), 2.0)
        field = np.exp(-(((xs - cx) / (0.6 * width)) ** 4) - ((ys - cy) / (1.3 * opening)) ** 2)
        return field.astype(np.float32), 1.1 * opening

    def head_pose(self, track: MotionTrack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(yaw, pitch, roll), each (T,) degrees: the rendered head's pose in the project's convention.

        The driving rotation composed with the portrait's rest pose, R = R_drive @ R_rest: what an
        exact estimator would report, up to that estimator's own constant offset on this face.
        """
        return matrix_to_euler(euler_to_matrix(track.yaw, track.pitch, track.roll) @ self.rest_rotation)

    def render(self, track: MotionTrack, index: int) -> np.ndarray:
        """Frame `index` of `track` -> (S, S, 3) uint8 RGB."""
        drop = float(track.mouth[index]) * self.max_drop
        closure = float(track.blink[index])
        shift = drop * self.jaw
        for field, travel in self.lids:
            shift = shift + closure * travel * field
        face = cv2.remap(
            self.portrait.image, self.grid_x, self.grid_y - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        # The depth travels with the pixels it belongs to (a dropped chin keeps the chin's depth).
        depth = cv2.remap(self.depth, self.grid_x, self.grid_y - shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if drop > 0.5:
            face = self._paint_mouth(face, drop)
        map_x, map_y = self.head_map(track, index, depth)
        return cv2.remap(face, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    def _paint_mouth(self, face: np.ndarray, drop: float) -> np.ndarray:
        """Fill the gap between the fixed upper and the dropped lower inner lip: teeth, then dark."""
        lower = self.lower_lip.copy()
        lower[:, 1] += drop * self.lower_lip_travel
        interior = np.concatenate([self.upper_lip, lower[1:-1]])
        teeth = np.concatenate([self.upper_lip, self.upper_lip[::-1] + (0, 0.3 * drop)])
        mask = np.zeros(face.shape[:2], np.uint8)
        # Shift 4 fractional bits for sub-pixel polygons, antialiased edges.
        cv2.fillPoly(mask, [np.round(interior * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        teeth_mask = np.zeros_like(mask)
        cv2.fillPoly(teeth_mask, [np.round(teeth * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        teeth_alpha = (np.minimum(mask, teeth_mask).astype(np.float32) / 255)[..., None]
        alpha = (mask.astype(np.float32) / 255)[..., None]
        out = face * (1 - alpha) + np.array(MOUTH_INTERIOR_RGB, np.float32) * alpha
        out = out * (1 - teeth_alpha) + np.array(TEETH_RGB, np.float32) * teeth_alpha
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def displacement(
        self, yaw: float, pitch: float, roll: float, depth: np.ndarray, grid: _Grid | None = None
    ) -> np.ndarray:
        """(H, W, 2) float32 pixels each portrait point of `grid` moves under the head rotation.

        Angles in degrees; `depth` (H, W) portrait z at the grid's points (default grid: every pixel).
        Points (continuous coordinates: pixel index + 0.5) are lifted to 3D at camera depth
        focal + depth - reference_depth, rotated by R = Rz(roll) Rx(pitch) Ry(yaw) about the pivot
        (the head centre at the depth of the face sides) and projected back; the move is then
        weighted by the head weight (1 on the head, 0 on the background).
        """
        grid = grid or self.fine
        principal = self.portrait.image.shape[0] / 2
        rotation = euler_to_matrix(yaw, pitch, roll).astype(np.float32)  # (3, 3)
        camera_z = self.focal + depth - self.reference_depth  # (H, W) pixels
        x = (grid.x + 0.5 - principal) * camera_z / self.focal
        y = (grid.y + 0.5 - principal) * camera_z / self.focal
        pivot_z = self.focal + self.pivot_depth - self.reference_depth
        pivot = np.array([*(self.head_centre - principal) * pivot_z / self.focal, pivot_z], np.float32)
        rel = (x - pivot[0], y - pivot[1], camera_z - pivot[2])
        moved = [sum(rotation[row, k] * rel[k] for k in range(3)) + pivot[row] for row in range(3)]
        u = self.focal * moved[0] / moved[2] + principal - 0.5
        v = self.focal * moved[1] / moved[2] + principal - 0.5
        return np.dstack([(u - grid.x) * grid.weight, (v - grid.y) * grid.weight])

    def head_map(self, track: MotionTrack, index: int, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backward map (map_x, map_y), each (S, S) float32, of frame `index`'s head motion.

        `depth` (S, S) is the portrait z of every pixel of the (expression-warped) face. The forward
        map is p -> camera(p + displacement(p)), camera = zoom about the head centre and pan. Its
        inverse at q solves p + displacement(p) = camera^-1(q) by fixed-point steps
        p <- camera^-1(q) - displacement(p), a contraction where the displacement's gradient is
        below 1 (at 12 degrees of yaw it is ~0.6 at the face sides, the steepest part). The map is
        smooth, so it is solved on a grid MAP_STRIDE times coarser and its offset from the identity
        resized up (4x fewer points; the error is a small fraction of a pixel).
        """
        size, coarse = depth.shape[0], self.coarse
        small = cv2.resize(depth, coarse.x.shape[::-1], interpolation=cv2.INTER_AREA)
        angles = float(track.yaw[index]), float(track.pitch[index]), float(track.roll[index])
        field = self.displacement(*angles, small, coarse)  # (h, w, 2) at the coarse points
        scale, shift = float(track.scale[index]), np.array([track.shift_x[index], track.shift_y[index]]) * size
        # Continuous coordinates (pixel centres at +0.5), as head_centre; the zoom is about the head centre.
        target_x = (coarse.x + 0.5 - self.head_centre[0] - shift[0]) / scale + self.head_centre[0] - 0.5
        target_y = (coarse.y + 0.5 - self.head_centre[1] - shift[1]) / scale + self.head_centre[1] - 0.5
        map_x, map_y = target_x, target_y
        to_coarse = coarse.x.shape[1] / size  # fine pixel index p -> coarse (p + 0.5) * to_coarse - 0.5
        for _ in range(FIXED_POINT_STEPS):
            at_x, at_y = (map_x + 0.5) * to_coarse - 0.5, (map_y + 0.5) * to_coarse - 0.5
            moved = cv2.remap(field, at_x, at_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            map_x, map_y = target_x - moved[..., 0], target_y - moved[..., 1]
        offset = np.dstack([map_x - coarse.x, map_y - coarse.y])  # (h, w, 2) backward move
        offset = cv2.resize(offset, (size, size), interpolation=cv2.INTER_LINEAR)
        return self.fine.x + offset[..., 0], self.fine.y + offset[..., 1]


@dataclass(frozen=True)
class _Grid:
    """Points where the head motion is evaluated: pixel indices (fine) or a coarser lattice."""

    x: np.ndarray  # (H, W) float32 pixel index coordinates in the portrait (centre of pixel j = j)
    y: np.ndarray  # (H, W) float32
    weight: np.ndarray  # (H, W) float32 head weight at the points, in [0, 1]


def _oval_radius(oval: np.ndarray, size: int) -> np.ndarray:
    """(S, S) float32 elliptical radius of each pixel centre: 1 on the ellipse fitted to `oval` (N, 2)."""
    (cx, cy), (width, height), angle = cv2.fitEllipse(oval.astype(np.float32))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    along, across = (xs - cx) * cos + (ys - cy) * sin, -(xs - cx) * sin + (ys - cy) * cos
    return np.sqrt((along / (width / 2)) ** 2 + (across / (height / 2)) ** 2).astype(np.float32)


def _depth_map(mesh: np.ndarray, pivot_depth: float, face_height: float, size: int) -> np.ndarray:
    """(S, S) float32 depth in portrait pixels (z away from the camera) of every pixel.

    A thin-plate spline through the FaceMesh points (x, y) -> z, plus control points at the depth
    of the face sides on two ellipses around the face (HEAD_EDGE and twice that), so the surface
    curves back from the face over the hair, ears and neck and then stays level. Evaluated on a
    DEPTH_GRID² grid of pixel centres and resized, then rounded to 1/64 px so the bytes do not hang
    on the last bits of the linear solve.
    """
    (cx, cy), (width, height), angle = cv2.fitEllipse(mesh[list(FACE_OVAL), :2].astype(np.float32))
    turns = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    ring = np.column_stack([np.cos(turns) * width / 2, np.sin(turns) * height / 2])
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    ring = ring @ np.array([[cos, sin], [-sin, cos]]) + (cx, cy)  # (32, 2) on the fitted ellipse
    rings = np.vstack([(ring - (cx, cy)) * factor + (cx, cy) for factor in DEPTH_RINGS])
    points = np.vstack([mesh[:N_MESH, :2], rings]) / face_height  # (N, 2) face heights
    values = np.concatenate([mesh[:N_MESH, 2], np.full(len(rings), pivot_depth)]) / face_height
    step = size / DEPTH_GRID
    coarse = (np.arange(DEPTH_GRID) + 0.5) * step / face_height  # pixel centres of the coarse grid
    grid = np.stack(np.meshgrid(coarse, coarse), axis=-1).reshape(-1, 2)  # (G², 2) x, y
    surface = _thin_plate(points, values, grid, DEPTH_SMOOTHING).reshape(DEPTH_GRID, DEPTH_GRID)
    depth = cv2.resize(surface * face_height, (size, size), interpolation=cv2.INTER_CUBIC)
    return (np.round(depth * 64) / 64).astype(np.float32)


def _thin_plate(points: np.ndarray, values: np.ndarray, query: np.ndarray, smoothing: float) -> np.ndarray:
    """Thin-plate spline through (N, 2) `points` with (N,) `values`, evaluated at (M, 2) `query`.

    f(p) = a0 + a . p + sum_i w_i U(|p - p_i|), U(r) = r^2 log r (Duchon 1977), with the weights
    orthogonal to affine functions; `smoothing` on the diagonal trades exactness for smoothness.
    """

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        r2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
        return 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))

    n = len(points)
    affine = np.column_stack([np.ones(n), points])  # (N, 3)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = kernel(points, points) + smoothing * np.eye(n)
    system[:n, n:], system[n:, :n] = affine, affine.T
    solution = np.linalg.solve(system, np.concatenate([values, np.zeros(3)]))
    weights, coefficients = solution[:n], solution[n:]
    return kernel(query, points) @ weights + np.column_stack([np.ones(len(query)), query]) @ coefficients
