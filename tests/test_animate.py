"""The sample corpus's animation: envelope, motion track, and the 3D head warp with its truth."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest

from preprocessing.pose import euler_to_matrix, head_pose
from preprocessing.sample.animate import FACE_SIDES, FaceRig, MotionTrack, motion_track, speech_envelope
from preprocessing.sample.portraits import PORTRAITS, prepare_portrait

NOSE_TIP, RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 1, 33, 263


@functools.cache
def _rig(name: str) -> FaceRig:
    return FaceRig(prepare_portrait(name, 256), mouth_max_open=0.45)


def _track(yaw, pitch, roll, mouth=0.0, shift=(0.0, 0.0), scale=1.0) -> MotionTrack:
    one = np.ones(1)
    return MotionTrack(
        yaw * one, pitch * one, roll * one, shift[0] * one, shift[1] * one, scale * one, mouth * one, 0 * one
    )


def _forward(rig: FaceRig, points: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(N, 2) where the head warp moves portrait points (N, 2), continuous pixel coordinates."""
    field = rig.displacement(yaw, pitch, roll, rig.depth)
    at = (points - 0.5).astype(np.float32)[None]  # remap samples at pixel centres
    return points + cv2.remap(field, at[..., 0], at[..., 1], cv2.INTER_LINEAR)[0]


def test_envelope_is_zero_in_silence_and_one_per_video_frame():
    rate, fps = 16000, 25
    t = np.arange(rate * 2) / rate
    audio = np.where(t < 1, 0.0, 0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    envelope = speech_envelope(audio, rate, fps)
    assert envelope.shape == (50,)
    assert envelope[:20].max() == 0.0
    assert envelope[30:].min() > 0.9


def test_motion_track_respects_amplitudes(params):
    cfg = params.sample
    envelope = np.abs(np.sin(np.linspace(0, 20, 250)))
    track = motion_track(envelope, cfg.fps, cfg.motion, cfg.blinks_per_minute, np.random.default_rng(0))
    assert np.abs(track.yaw).max() <= cfg.motion.yaw_deg + 1e-9
    assert np.abs(track.roll).max() <= cfg.motion.roll_deg + 1e-9
    assert track.mouth.min() >= 0 and track.mouth.max() <= 1
    assert np.corrcoef(track.mouth, envelope)[0, 1] > 0.8
    assert track.blink.max() == 1.0  # 10 s at 18 blinks/min: some blink happened


def test_still_head_renders_the_portrait_unmoved():
    rig = _rig("skimage_astronaut")
    map_x, map_y = rig.head_map(_track(0, 0, 0), 0, rig.depth)
    np.testing.assert_allclose(map_x, rig.grid_x, atol=1e-3)
    np.testing.assert_allclose(map_y, rig.grid_y, atol=1e-3)
    frame = rig.render(_track(0, 0, 0), 0)
    assert np.abs(frame.astype(int) - rig.portrait.image).max() <= 1


@pytest.mark.parametrize("name", sorted(PORTRAITS))
def test_yaw_has_parallax_and_signs_follow_the_schema(name):
    """Real 3D motion: under yaw the nose tip moves against the sides of the face (a flat plane
    would move them alike), and each angle moves the face the way preprocessing/schema.py says."""
    rig = _rig(name)
    mesh = rig.portrait.mesh[:, :2]
    sides = mesh[list(FACE_SIDES)]
    turned = _forward(rig, np.vstack([mesh[[NOSE_TIP]], sides]), 10, 0, 0)
    nose_move = turned[0, 0] - mesh[NOSE_TIP, 0]
    sides_move = (turned[1:, 0] - sides[:, 0]).mean()
    assert nose_move < -5 and nose_move - sides_move < -0.05 * rig.face_height  # yaw > 0: nose to image left
    down = _forward(rig, mesh[[NOSE_TIP]], 0, 8, 0)
    assert down[0, 1] - mesh[NOSE_TIP, 1] > 1  # pitch > 0: looks down
    eyes = mesh[[RIGHT_EYE_OUTER, LEFT_EYE_OUTER]]
    tilted = _forward(rig, eyes, 0, 0, 5)
    # roll > 0: clockwise in the image, the subject's left eye (image right) drops.
    assert tilted[1, 1] - eyes[1, 1] > 1 and tilted[0, 1] - eyes[0, 1] < -1


@pytest.mark.parametrize("name", sorted(PORTRAITS))
def test_inverse_map_is_accurate_at_the_largest_angles(name, params):
    """The fixed-point inverse lands within a pixel of the forward map on the head and around it."""
    rig = _rig(name)
    motion = params.sample.motion
    yaw, pitch, roll = motion.yaw_deg, motion.pitch_deg + motion.nod_with_speech_deg, motion.roll_deg
    for signs in ((1, 1, 1), (-1, 1, -1), (1, -1, 1)):
        angles = [a * s for a, s in zip((yaw, pitch, roll), signs, strict=True)]
        map_x, map_y = rig.head_map(_track(*angles), 0, rig.depth)
        field = rig.displacement(*angles, rig.depth)
        moved = cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR)
        error = np.hypot(map_x + moved[..., 0] - rig.grid_x, map_y + moved[..., 1] - rig.grid_y)
        assert error[rig.head_weight > 0].max() < 1.0, (angles, float(error.max()))


@pytest.mark.parametrize("name", sorted(PORTRAITS))
def test_truth_is_the_pose_of_the_moved_mesh(name):
    """The truth (`FaceRig.head_pose`) equals what preprocessing.pose fits to the portrait's own mesh
    moved by the renderer's warp (x, y) and rotated (z): no FaceMesh involved, so any error here is
    the renderer's or the truth's, not the estimator's."""
    rig = _rig(name)
    mesh = rig.portrait.mesh
    rng = np.random.default_rng(0)
    angles = np.column_stack([rng.uniform(-12, 12, 12), rng.uniform(-10, 10, 12), rng.uniform(-7, 7, 12)])
    truth = np.array(rig.head_pose(MotionTrack(*angles.T, *np.zeros((5, 12))))).T  # (12, 3)
    fitted = []
    for yaw, pitch, roll in angles:
        moved = np.empty_like(mesh)
        moved[:, :2] = _forward(rig, mesh[:, :2], yaw, pitch, roll)
        moved[:, 2] = (mesh - mesh.mean(axis=0)) @ euler_to_matrix(yaw, pitch, roll)[2]  # rotated depth
        pose = head_pose(moved[None])
        fitted.append([pose.yaw[0], pose.pitch[0], pose.roll[0]])
    error = np.array(fitted) - truth
    error -= error.mean(axis=0)  # the per-clip offset the pose test removes as well
    assert np.abs(error).max() < 1.0, np.abs(error).max(axis=0)
    rest = np.array(rig.head_pose(MotionTrack(*np.zeros((8, 1)))))[:, 0]
    still = head_pose(mesh[None])
    np.testing.assert_allclose(rest, [still.yaw[0], still.pitch[0], still.roll[0]], atol=1e-9)
