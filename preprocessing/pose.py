"""Stage pose: 3D head pose, gaze and an expression descriptor from FaceMesh landmarks.

VASA-1 (arXiv 2404.10667, sec. 3.2) conditions its motion generator on the main gaze direction
(theta, phi) and the head distance, and its latent has a 3D head pose (rotation, translation,
scale). MediaPipe's canonical face model is not in the wheel, so the pose here is a rigid
similarity fit (Umeyama 1991) of the project's own 3D template (scripts/build_face_template.py,
shipped as assets/face_template.npz) to each frame's landmarks.

Frames: landmarks are in the camera frame of preprocessing.face (pixels; x right, y down, z away
from the camera; right-handed). The template's head frame uses the same axes for a frontal face:
x from the subject's right outer eye corner (33, image left) to the left one (263, image right),
y from forehead toward chin (down), z = x cross y, into the head (away from the camera). Origin at
the template centroid, unit = outer eye-corner distance. A frame's pose maps head to camera:

    landmark ~= scale * R @ template_point + translation,   R = Rz(roll) @ Rx(pitch) @ Ry(yaw)

with the right-handed elementary rotations about the camera axes (degrees everywhere). Signs:
    yaw   > 0: the subject turns to THEIR right (nose toward image left in an unmirrored view),
    pitch > 0: the subject looks down (nose toward image bottom),
    roll  > 0: the head tilts clockwise in the image (the subject's left eye, image right, drops).
A mirrored image flips the signs of yaw and roll and keeps pitch. Zero pitch means the template's
forehead-to-chin line (10 -> 152) lies in the image plane; like any template fit, absolute pitch
has a constant offset between people, changes of it do not.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

TEMPLATE_PATH = Path(__file__).parent / "assets" / "face_template.npz"
NOSE_TIP = 1
RIGHT_IRIS, LEFT_IRIS = 468, 473  # iris centres (refined landmarks); the subject's right eye is image left
RIGHT_EYE_CORNERS, LEFT_EYE_CORNERS = (33, 133), (362, 263)  # (outer, inner), (inner, outer)

# Landmarks for the rigid fit: forehead, nose bridge and nose, eye corners (canthi), cheekbones and
# temples. Left out because they move relative to the skull: lips, jaw line and chin (speech),
# eyelids and irises (blinks, gaze), eyebrows (expression), and the mesh contour (it slides along
# the silhouette as the head turns). The set is closed under the template's left/right pairing
# (tested), so a mirrored face gives a mirrored pose.
RIGID_LANDMARKS = (
    # midline: forehead, glabella, nose bridge, nose tip, columella
    10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 2,
    # forehead sides
    109, 338, 67, 297, 108, 337, 69, 299,
    # nose sides and alae
    98, 327, 129, 358, 48, 278, 64, 294, 115, 344, 220, 440,
    # eye corners
    33, 263, 133, 362,
    # cheekbones, under-eye cheek, temples
    116, 345, 117, 346, 118, 347, 123, 352, 50, 280, 101, 330, 36, 266, 143, 372, 139, 368,
)  # fmt: skip

# expression(): columns, each a length in template units (outer eye-corner distance = 1) measured in
# the head frame, so head rotation and distance drop out and people are comparable.
EXPRESSION_COLUMNS = (
    "mouth_open",  # inner upper lip (13) to inner lower lip (14)
    "mouth_width",  # mouth corners 61 to 291
    "smile",  # how far the mouth corners sit above the inner-lip centre (negative: below)
    "eye_open_right",  # subject's right eye: upper lid 159 to lower lid 145
    "eye_open_left",  # subject's left eye: upper lid 386 to lower lid 374
    "brow_raise",  # eyebrow (66/105, 296/334) above the eye-corner midpoint, both sides averaged
)
# Eyeball radius over eye width (corner to corner): ~12 mm eyeball, ~28-30 mm palpebral fissure.
EYEBALL_RADIUS_PER_EYE_WIDTH = 0.42


@dataclass(frozen=True)
class Template:
    """The canonical face: symmetric about x = 0, unit outer eye-corner distance."""

    points: np.ndarray  # (478, 3) float64 template units, head frame
    pairs: np.ndarray  # (478,) int: index of each point's mirror partner (itself on the midline)
    meta: dict  # how it was built: sources with sha256, frames used, GPA iterations


@dataclass(frozen=True)
class Pose:
    """Per-frame head pose; NaN where the frame has no usable face."""

    yaw: np.ndarray  # (T,) degrees, > 0 when the subject turns to their right
    pitch: np.ndarray  # (T,) degrees, > 0 when the subject looks down
    roll: np.ndarray  # (T,) degrees, > 0 clockwise in the image
    translation: np.ndarray  # (T, 3) pixels: where the template origin lands in the frame
    scale: np.ndarray  # (T,) pixels per template unit: head distance proxy, larger = closer

    @property
    def rotation(self) -> np.ndarray:
        """(T, 3, 3) head-to-camera rotation R = Rz(roll) @ Rx(pitch) @ Ry(yaw)."""
        return euler_to_matrix(self.yaw, self.pitch, self.roll)

    def select(self, index: int) -> Pose:
        """The pose of one frame, still as length-1 arrays."""
        pick = slice(index, index + 1)
        return Pose(self.yaw[pick], self.pitch[pick], self.roll[pick], self.translation[pick], self.scale[pick])


@functools.cache
def load_template(path: Path = TEMPLATE_PATH) -> Template:
    """The shipped template (read once per process; its arrays are read-only as it is shared)."""
    with np.load(path, allow_pickle=False) as data:
        points, pairs = data["points"].astype(np.float64), data["pairs"].astype(np.int64)
        meta = json.loads(str(data["meta"]))
    points.flags.writeable = pairs.flags.writeable = False
    return Template(points=points, pairs=pairs, meta=meta)


def euler_to_matrix(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(T, 3, 3) R = Rz(roll) @ Rx(pitch) @ Ry(yaw) from (T,) angles in degrees."""
    y, p, r = (np.radians(np.asarray(a, dtype=np.float64)) for a in (yaw, pitch, roll))
    one, zero = np.ones_like(y), np.zeros_like(y)
    ry = np.stack([np.cos(y), zero, np.sin(y), zero, one, zero, -np.sin(y), zero, np.cos(y)], -1)
    rx = np.stack([one, zero, zero, zero, np.cos(p), -np.sin(p), zero, np.sin(p), np.cos(p)], -1)
    rz = np.stack([np.cos(r), -np.sin(r), zero, np.sin(r), np.cos(r), zero, zero, zero, one], -1)
    shape = (*y.shape, 3, 3)
    return rz.reshape(shape) @ rx.reshape(shape) @ ry.reshape(shape)


def matrix_to_euler(rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(yaw, pitch, roll) in degrees of (T, 3, 3) rotations, inverse of euler_to_matrix.

    The bottom row of Rz Rx Ry is (-cos p sin y, sin p, cos p cos y), and its middle column is
    (-sin r cos p, cos r cos p, sin p); pitch is kept in [-90, 90].
    """
    yaw = np.arctan2(-rotation[..., 2, 0], rotation[..., 2, 2])
    pitch = np.arcsin(np.clip(rotation[..., 2, 1], -1.0, 1.0))
    roll = np.arctan2(-rotation[..., 0, 1], rotation[..., 1, 1])
    return np.degrees(yaw), np.degrees(pitch), np.degrees(roll)


def umeyama(
    source: np.ndarray, target: np.ndarray, with_scale: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarity target ~= s * R @ source + t (Umeyama 1991), batched over frames.

    source, target: (..., N, 3). Returns s (...,), R (..., 3, 3) with det +1, t (..., 3). The sign
    correction D = diag(1, 1, sign det(U V^T)) keeps R a rotation even for near-planar or noisy
    points, where the unconstrained optimum would be a reflection.
    """
    mu_source, mu_target = source.mean(axis=-2), target.mean(axis=-2)
    centred_source, centred_target = source - mu_source[..., None, :], target - mu_target[..., None, :]
    covariance = np.swapaxes(centred_target, -1, -2) @ centred_source / source.shape[-2]  # (..., 3, 3)
    u, sigma, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(u @ vt))
    sign = np.where(sign == 0, 1.0, sign)
    d = np.stack([np.ones_like(sign), np.ones_like(sign), sign], axis=-1)  # (..., 3)
    rotation = (u * d[..., None, :]) @ vt
    if with_scale:
        variance = np.mean(np.sum(centred_source**2, axis=-1), axis=-1)
        scale = np.sum(sigma * d, axis=-1) / variance
    else:
        scale = np.ones(rotation.shape[:-2])
    translation = mu_target - scale[..., None] * np.einsum("...ij,...j->...i", rotation, mu_source)
    return scale, rotation, translation


def head_pose(landmarks: np.ndarray, template: Template | None = None) -> Pose:
    """Pose of each frame of (T, 478, 3) pixel landmarks (see the module docstring for conventions)."""
    template = template or load_template()
    rigid = list(RIGID_LANDMARKS)
    count = len(landmarks)
    yaw, pitch, roll, scale = (np.full(count, np.nan) for _ in range(4))
    translation = np.full((count, 3), np.nan)
    valid = np.all(np.isfinite(landmarks[:, rigid]), axis=(1, 2))
    if valid.any():
        observed = landmarks[valid][:, rigid].astype(np.float64)  # (V, R, 3) pixels
        source = np.broadcast_to(template.points[rigid], observed.shape)
        s, rotation, t = umeyama(source, observed)
        yaw[valid], pitch[valid], roll[valid] = matrix_to_euler(rotation)
        scale[valid], translation[valid] = s, t
    return Pose(yaw=yaw, pitch=pitch, roll=roll, translation=translation, scale=scale)


def to_head_frame(landmarks: np.ndarray, pose: Pose) -> np.ndarray:
    """(T, N, 3) landmarks in template units in the head frame: R^T (p - t) / s."""
    centred = landmarks - pose.translation[:, None, :]
    return np.einsum("tji,tnj->tni", pose.rotation, centred) / pose.scale[:, None, None]


def gaze(landmarks: np.ndarray, pose: Pose, template: Template | None = None) -> np.ndarray:
    """(T, 2) eye direction relative to the head, degrees: theta (horizontal), phi (vertical).

    Signs follow yaw and pitch: theta > 0 when the eyes turn toward the subject's right, phi > 0
    when they look down, so a gaze fixed on the camera gives theta ~= -yaw. Per eye, the iris centre
    is taken relative to the eye-corner midpoint in the head frame (head rotation and distance
    removed), minus the same offset in the template (the fixtures' average, people mostly looking
    at the camera, defines zero), divided by an eyeball radius proportional to that eye's width,
    and passed through arcsin. The two eyes are averaged.
    """
    template = template or load_template()
    head = to_head_frame(landmarks, pose)  # (T, 478, 3) template units
    angles = []
    for iris, corners in ((RIGHT_IRIS, RIGHT_EYE_CORNERS), (LEFT_IRIS, LEFT_EYE_CORNERS)):
        middle = head[:, corners].mean(axis=1)  # (T, 3)
        rest = template.points[iris] - template.points[list(corners)].mean(axis=0)  # (3,)
        offset = head[:, iris] - middle - rest  # (T, 3) template units
        width = np.linalg.norm(head[:, corners[0]] - head[:, corners[1]], axis=-1)  # (T,)
        ratio = offset[:, :2] / (EYEBALL_RADIUS_PER_EYE_WIDTH * width[:, None])
        angles.append(np.degrees(np.arcsin(np.clip(ratio * [-1.0, 1.0], -1.0, 1.0))))
    return (angles[0] + angles[1]) / 2


def main_gaze(gaze_angles: np.ndarray) -> np.ndarray:
    """(2,) the clip's median gaze (theta, phi) in degrees over frames with a face: VASA-1's g."""
    return np.nanmedian(gaze_angles, axis=0)


def expression(landmarks: np.ndarray, pose: Pose) -> np.ndarray:
    """(T, len(EXPRESSION_COLUMNS)) geometric expression descriptor in template units.

    Distances are measured in the head frame, so they do not change with head rotation or
    distance, and in template units, so a wide mouth means the same for every face size.
    """
    head = to_head_frame(landmarks, pose)  # (T, 478, 3) template units
    lips = head[:, [13, 14]].mean(axis=1)
    corners = head[:, [61, 291]]
    eye_middle = (head[:, [33, 133]].mean(axis=1), head[:, [362, 263]].mean(axis=1))
    brows = (head[:, [66, 105]].mean(axis=1), head[:, [296, 334]].mean(axis=1))
    columns = {
        "mouth_open": np.linalg.norm(head[:, 13] - head[:, 14], axis=-1),
        "mouth_width": np.linalg.norm(corners[:, 0] - corners[:, 1], axis=-1),
        "smile": lips[:, 1] - corners[:, :, 1].mean(axis=1),
        "eye_open_right": np.linalg.norm(head[:, 159] - head[:, 145], axis=-1),
        "eye_open_left": np.linalg.norm(head[:, 386] - head[:, 374], axis=-1),
        "brow_raise": ((eye_middle[0][:, 1] - brows[0][:, 1]) + (eye_middle[1][:, 1] - brows[1][:, 1])) / 2,
    }
    return np.stack([columns[name] for name in EXPRESSION_COLUMNS], axis=1)


def draw_pose_axes(
    crop: np.ndarray, pose_row: Pose, transform: np.ndarray, length: float = 0.7, template: Template | None = None
) -> np.ndarray:
    """A copy of an RGB `crop` with the head axes drawn from the nose tip, for eyeballing poses.

    `pose_row` is one frame's pose (Pose.select) in the pixels `transform` (2, 3) maps from into
    the crop: source pixels and that frame's crop transform, or a pose.npy row (crop frame) and the
    identity [[1, 0, 0], [0, 1, 0]]. Red: head x (toward the subject's left), green: head y (down), blue:
    facing direction (-z, out of the face). `length` is in template units (eye distance = 1).
    """
    template = template or load_template()
    rotation = pose_row.rotation[0]
    nose = pose_row.scale[0] * rotation @ template.points[NOSE_TIP] + pose_row.translation[0]  # (3,) pixels
    axes = pose_row.scale[0] * length * (rotation * [1.0, 1.0, -1.0]).T  # (3, 3) rows: x, y, -z
    points = np.vstack([nose, nose + axes])[:, :2]  # (4, 2) source pixels, orthographic projection
    points = points @ transform[:, :2].T + transform[:, 2]  # (4, 2) crop pixels
    out = crop.copy()
    start = tuple(int(round(v)) for v in points[0])
    for end, colour in zip(points[1:], ((255, 0, 0), (0, 255, 0), (0, 0, 255)), strict=True):
        cv2.line(out, start, tuple(int(round(v)) for v in end), colour, 2, cv2.LINE_AA)
    return out
