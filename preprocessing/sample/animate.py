"""Animating a still portrait: speech-driven mouth, blinks and 3D head motion.

Pure functions: a `Portrait`, per-frame motion arrays and a seed in, frames out. The face is
deformed by a smooth backward displacement field (jaw drop below the lip line, upper lids sliding
down over the eyes), the mouth interior is painted into the opened gap, and the whole picture is
moved by the homography of a plane rotating about a head centre behind it, so yaw and pitch are
true perspective rotations that a 3D pose estimator sees, not in-plane shears.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from preprocessing.sample.portraits import (
    CHIN,
    EYES,
    FOREHEAD,
    LOWER_INNER_LIP,
    MOUTH_CORNERS,
    UPPER_INNER_LIP,
    Portrait,
)
from vasa.config import MotionConfig

MOUTH_INTERIOR_RGB = (70, 22, 28)
TEETH_RGB = (222, 216, 205)
BLINK_SHAPE = (0.45, 0.9, 1.0, 0.75, 0.35, 0.1)  # lid closure over consecutive frames


@dataclass(frozen=True)
class MotionTrack:
    """Per-frame animation controls, each (T,) float64."""

    yaw: np.ndarray  # degrees, positive turns the face to the viewer's left
    pitch: np.ndarray  # degrees, positive tilts the face down
    roll: np.ndarray  # degrees, positive rotates counter-clockwise in the image
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
    return MotionTrack(
        yaw=motion.yaw_deg * _smooth_noise(rng, n, fps, 0.08, 0.4),
        pitch=motion.pitch_deg * _smooth_noise(rng, n, fps, 0.1, 0.5) + motion.nod_with_speech_deg * nod,
        roll=motion.roll_deg * _smooth_noise(rng, n, fps, 0.05, 0.3),
        shift_x=motion.shift * _smooth_noise(rng, n, fps, 0.05, 0.25),
        shift_y=motion.shift * _smooth_noise(rng, n, fps, 0.05, 0.25),
        scale=1.0 + motion.scale * _smooth_noise(rng, n, fps, 0.03, 0.15),
        mouth=np.clip(loud, 0.0, 1.0) ** 0.8,
        blink=blink,
    )


class FaceRig:
    """Static deformation fields of one portrait, combined per frame by `render`."""

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
        if drop > 0.5:
            face = self._paint_mouth(face, drop)
        return self._move_head(face, track, index)

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

    def _move_head(self, face: np.ndarray, track: MotionTrack, index: int) -> np.ndarray:
        size = face.shape[0]
        homography = head_homography(
            size=size,
            head_centre=self.head_centre,
            depth_offset=0.5 * self.face_height,
            yaw_deg=float(track.yaw[index]),
            pitch_deg=float(track.pitch[index]),
            roll_deg=float(track.roll[index]),
            shift=(float(track.shift_x[index]) * size, float(track.shift_y[index]) * size),
            scale=float(track.scale[index]),
        )
        return cv2.warpPerspective(
            face, homography, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )


def head_homography(
    size: int,
    head_centre: np.ndarray,
    depth_offset: float,
    yaw_deg: float,
    pitch_deg: float,
    roll_deg: float,
    shift: tuple[float, float],
    scale: float,
) -> np.ndarray:
    """3x3 homography of the image plane rotating about a point `depth_offset` pixels behind the
    face centre, seen by a pinhole camera (focal = 3 * size) that images the plane 1:1.
    """
    focal = 3.0 * size
    principal = np.array([size / 2, size / 2])
    yaw, pitch, roll = np.radians([yaw_deg, pitch_deg, roll_deg])
    rot_y = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(pitch), np.sin(pitch)], [0, -np.sin(pitch), np.cos(pitch)]])
    rot_z = np.array([[np.cos(roll), np.sin(roll), 0], [-np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
    rotation = rot_z @ rot_x @ rot_y
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    plane = np.column_stack([corners - principal, np.full(4, focal)])  # points on the plane z = f
    pivot = np.array([*(head_centre - principal), focal + depth_offset])
    moved = (plane - pivot) @ rotation.T + pivot
    projected = focal * moved[:, :2] / moved[:, 2:3] + principal
    projected = (projected - head_centre) * scale + head_centre + np.asarray(shift)
    return cv2.getPerspectiveTransform(corners.astype(np.float32), projected.astype(np.float32))
