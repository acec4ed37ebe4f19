"""One person is one face (issue 7 sec. 2): duplicate detections merge, short gaps bridge, a second
person still splits. Pure functions on synthetic detections: no MediaPipe, runs everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.face import (
    SEGMENT_REJECTS,
    FaceTrack,
    box_iou,
    fill_gaps,
    find_segments,
    landmark_boxes,
    last_centre,
    merge_duplicates,
)
from preprocessing.pose import load_template
from vasa.core.config import FaceConfig, Params

T = 200


@pytest.fixture(scope="module")
def face_cfg(params: Params) -> FaceConfig:
    return params.preprocess.face


def _face(x: float, y: float, size: float = 100.0) -> np.ndarray:
    """(478, 3) landmarks of a frontal face `size` px per template unit at (x, y)."""
    return (load_template().points * size + [x, y, 0]).astype(np.float32)


def _track(first: np.ndarray, second: dict[int, np.ndarray], missing=()) -> FaceTrack:
    """Raw detections: `first` (T, 478, 3) in slot 0 on every frame but `missing`, plus a second
    detection on the frames of `second` (frame -> landmarks), put in slot 0 on even frames so the
    merge must pick by position, not by slot."""
    detections = np.full((len(first), 2, 478, 3), np.nan, dtype=np.float32)
    counts = np.ones(len(first), dtype=np.int64)
    detections[:, 0] = first
    for frame, other in second.items():
        detections[frame, 1] = other
        if frame % 2 == 0:
            detections[frame] = detections[frame, ::-1]
        counts[frame] = 2
    for frame in missing:
        detections[frame] = np.nan
        counts[frame] = 0
    return FaceTrack.from_detections(detections, counts)


def _moving_face() -> np.ndarray:
    """(T, 478, 3): a face drifting slowly right and down."""
    return np.stack([_face(300 + 0.5 * t, 250 + 0.2 * t) for t in range(T)])


def test_iou_of_landmark_boxes():
    box = landmark_boxes(_face(300, 250))
    assert box.shape == (4,) and (box[2:] > box[:2]).all()
    assert box_iou(box, box) == pytest.approx(1.0)
    shifted = box + [1000, 0, 1000, 0]
    assert box_iou(box, shifted) == 0.0
    half = box + [(box[2] - box[0]) / 2, 0, (box[2] - box[0]) / 2, 0]
    assert box_iou(box, half) == pytest.approx(1 / 3, abs=1e-6)
    assert np.isnan(box_iou(box, np.full(4, np.nan)))


def test_near_duplicate_on_scattered_frames_keeps_the_face(face_cfg):
    """The phone-video case: a face found twice (IoU 0.67-0.83) on scattered frames."""
    rng = np.random.default_rng(7)
    first = _moving_face()
    scattered = sorted(rng.choice(np.arange(T), size=30, replace=False).tolist())
    duplicates = {}
    for frame in scattered:
        jitter = rng.uniform(8, 14)  # px: IoU of the two boxes ~0.7-0.8
        duplicates[frame] = first[frame] * [1.05, 1.05, 1] + [jitter - 0.05 * 300, jitter - 0.05 * 250, 0]
    raw = _track(first, duplicates)
    iou = box_iou(*np.moveaxis(landmark_boxes(raw.detections[scattered]), 1, 0))
    assert iou.min() > 0.6 and iou.max() < 0.9, iou

    no_bridges = face_cfg.replace(max_gap_frames=0)
    before, _ = find_segments(raw, no_bridges, min_frames=25)  # neither merged nor bridged: shredded
    assert sum(end - start for start, end in before) < 0.6 * T

    merged = merge_duplicates(raw, face_cfg.duplicate_iou)
    assert (merged.faces == 1).all()
    # The kept detection is the tracked one (nearest the previous frame), not whatever sat in slot 0.
    np.testing.assert_allclose(merged.landmarks[scattered[1:]], first[scattered[1:]])
    for cfg in (face_cfg, no_bridges):  # the merge alone keeps the face
        segments, counts = find_segments(merged, cfg, min_frames=25)
        assert sum(end - start for start, end in segments) >= 0.95 * T, (segments, counts)
    assert raw.faces[scattered].tolist() == [2] * len(scattered)  # the input is left untouched


def test_merging_chunk_by_chunk_equals_merging_the_clip(face_cfg):
    """process_clip merges as chunks arrive, carrying the last face centre across them."""
    rng = np.random.default_rng(3)
    first = _moving_face()
    duplicates = {int(f): first[f] + [10, 8, 0] for f in rng.choice(np.arange(1, T), 40, replace=False)}
    raw = _track(first, duplicates, missing=[60, 61])
    whole = merge_duplicates(raw, face_cfg.duplicate_iou)
    parts, previous = [], None
    for start in range(0, T, 7):
        piece = FaceTrack.from_detections(raw.detections[start : start + 7], raw.faces[start : start + 7])
        merged = merge_duplicates(piece, face_cfg.duplicate_iou, previous)
        previous = last_centre(merged, previous)
        parts.append(merged)
    np.testing.assert_array_equal(np.concatenate([part.landmarks for part in parts]), whole.landmarks)
    np.testing.assert_array_equal(np.concatenate([part.faces for part in parts]), whole.faces)


def test_short_gaps_are_bridged_long_ones_split(face_cfg):
    first = _moving_face()
    gap = face_cfg.max_gap_frames
    assert gap >= 1
    short = list(range(50, 50 + gap))
    long = list(range(120, 120 + gap + 1))
    track = merge_duplicates(_track(first, {}, missing=short + long), face_cfg.duplicate_iou)
    segments, counts = find_segments(track, face_cfg, min_frames=25)
    assert segments == [(0, 120), (120 + gap + 1, T)]
    assert counts["no_face"] == gap + 1 and sum(counts.values()) == gap + 1
    filled = fill_gaps(track.landmarks[0:120])
    assert np.isfinite(filled).all()
    np.testing.assert_allclose(filled[short], first[short], atol=1e-3)  # linear motion is interpolated exactly


def test_cut_inside_a_short_gap_is_not_bridged(face_cfg):
    """Two black frames between two different shots: a cut, not a missed detection."""
    first = _moving_face()
    first[102:] += [400, 0, 0]  # the face is somewhere else after the gap
    track = _track(first, {}, missing=[100, 101])
    segments, counts = find_segments(merge_duplicates(track, face_cfg.duplicate_iou), face_cfg, min_frames=25)
    assert segments == [(0, 100), (102, T)]
    assert counts["no_face"] == 2


def test_two_real_people_still_split(face_cfg):
    first = _moving_face()
    other_person = {frame: _face(900, 260) for frame in range(80, 140)}  # far away: IoU 0
    track = merge_duplicates(_track(first, other_person), face_cfg.duplicate_iou)
    assert (track.faces[80:140] == 2).all() and np.isnan(track.landmarks[80:140]).all()
    segments, counts = find_segments(track, face_cfg, min_frames=25)
    assert segments == [(0, 80), (140, T)]
    assert counts["multiple_faces"] == 60
    assert set(counts) == set(SEGMENT_REJECTS)
    assert sum(counts.values()) + sum(end - start for start, end in segments) == T


def test_merge_needs_raw_detections(face_cfg):
    landmarks = _moving_face()[:3]
    with pytest.raises(ValueError, match="raw detections"):
        merge_duplicates(FaceTrack(landmarks=landmarks, faces=np.ones(3, np.int64)), face_cfg.duplicate_iou)
