from __future__ import annotations

import numpy as np

from preprocessing.sample.animate import head_homography, motion_track, speech_envelope


def test_envelope_is_zero_in_silence_and_one_per_video_frame():
    rate, fps = 16000, 25
    t = np.arange(rate * 2) / rate
    audio = np.where(t < 1, 0.0, 0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    envelope = speech_envelope(audio, rate, fps)
    assert envelope.shape == (50,)
    assert envelope[:20].max() == 0.0
    assert envelope[30:].min() > 0.9


def test_head_homography_identity_and_yaw_foreshortening():
    centre = np.array([128.0, 120.0])
    still = head_homography(256, centre, 60.0, 0, 0, 0, (0, 0), 1.0)
    np.testing.assert_allclose(still / still[2, 2], np.eye(3), atol=1e-6)
    turned = head_homography(256, centre, 60.0, 20, 0, 0, (0, 0), 1.0)
    left, right = turned @ [96, 120, 1], turned @ [160, 120, 1]
    # A yawed face is narrower in the image than the frontal one.
    assert 0.8 < (right[0] / right[2] - left[0] / left[2]) / 64 < 0.99


def test_motion_track_respects_amplitudes(params):
    cfg = params.sample
    envelope = np.abs(np.sin(np.linspace(0, 20, 250)))
    track = motion_track(envelope, cfg.fps, cfg.motion, cfg.blinks_per_minute, np.random.default_rng(0))
    assert np.abs(track.yaw).max() <= cfg.motion.yaw_deg + 1e-9
    assert np.abs(track.roll).max() <= cfg.motion.roll_deg + 1e-9
    assert track.mouth.min() >= 0 and track.mouth.max() <= 1
    assert np.corrcoef(track.mouth, envelope)[0, 1] > 0.8
    assert track.blink.max() == 1.0  # 10 s at 18 blinks/min: some blink happened
