"""Crops keep the head motion the labels describe (issue 7 sec. 1), and one clip's processing
(preprocessing.process): frame accounting, failures with measured values, errors that never escape.

The synthetic clip is the public-domain astronaut portrait bundled with scikit-image, rotated and
shifted over time with a known roll and translation: it runs everywhere, no fixtures needed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import yaml

from preprocessing import face, schema
from preprocessing.decode import read_frames
from preprocessing.face import box_transform, crop_box, crop_frame, outside_fraction
from preprocessing.media import write_mp4
from preprocessing.pose import head_pose
from preprocessing.process import clean_detail, process_clip
from vasa.core.config import ConfigError, Params, PreprocessConfig, load_params

FPS, RATE, FRAMES, SIDE = 25, 16000, 40, 384
ROLL_DEG = 12.0 * np.sin(2 * np.pi * np.arange(FRAMES) / FRAMES)  # counter-clockwise in the image (cv2)
SHIFT_PX = np.column_stack(
    [25 * np.sin(2 * np.pi * np.arange(FRAMES) / FRAMES + 1), 15 * np.cos(2 * np.pi * np.arange(FRAMES) / FRAMES)]
)
FACE_CENTRE = (192.0, 122.0)  # of the astronaut in the SIDE² canvas, measured once with FaceMesh


def _moving_portrait() -> np.ndarray:
    """(FRAMES, SIDE, SIDE, 3) uint8: the portrait rolled by ROLL_DEG about the face and shifted by SHIFT_PX."""
    canvas = np.ascontiguousarray(skimage.data.astronaut()[:SIDE, 32 : 32 + SIDE])
    frames = []
    for angle, shift in zip(ROLL_DEG, SHIFT_PX, strict=True):
        matrix = cv2.getRotationMatrix2D(FACE_CENTRE, float(angle), 1.0)
        matrix[:, 2] += shift
        frames.append(
            cv2.warpAffine(canvas, matrix, (SIDE, SIDE), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)
        )
    return np.stack(frames)


def _row(path: Path) -> dict:
    return {"clip_id": f"test:{path.name}", "key": "00112233aabbccdd", "media_path": str(path), "av_offset": None}


def _cfg(params: Params, **changes) -> PreprocessConfig:
    return params.preprocess.replace(**changes)


def _members(sample) -> dict:
    out = {}
    for name, data in sample.members.items():
        out[name] = np.load(io.BytesIO(data), allow_pickle=False) if name.endswith(".npy") else data
    out[schema.JSON] = json.loads(sample.members[schema.JSON])
    return out


def _crop_video(data: bytes, folder: Path) -> np.ndarray:
    path = folder / "crop.mp4"
    path.write_bytes(data)
    return read_frames(path)[0]


@pytest.fixture(scope="module")
def moving_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crop") / "moving.mp4"
    noise = np.random.default_rng(0).normal(0, 0.05, FRAMES * RATE // FPS).astype(np.float32)
    write_mp4(path, _moving_portrait(), FPS, noise, RATE, crf=12, preset="veryfast")
    return path


@pytest.fixture(scope="module")
def box_sample(moving_clip: Path, params: Params):
    outcome = process_clip(_row(moving_clip), _cfg(params, crop_size=256, crop={"mode": "box", "border": "replicate"}))
    assert not outcome.failures and len(outcome.samples) == 1, outcome.failures
    return _members(outcome.samples[0])


def _repose(crops: np.ndarray, params: Params):
    """Pose re-estimated on the crop pixels: FaceMesh + head_pose, as a consumer of the shards would."""
    track = face.get_tracker(params.preprocess.face).track(crops)
    assert (track.faces == 1).all()
    return head_pose(track.landmarks)


# The crop frame


def test_box_crop_keeps_roll_and_translation(box_sample, params, tmp_path):
    """The default crop is one fixed box: the roll and the shift the clip was made with stay in the
    crop pixels, and pose.npy (crop frame) matches the pose re-estimated on those pixels."""
    meta, stored = box_sample[schema.JSON], box_sample[schema.POSE]
    assert meta["pose_frame"] == schema.POSE_FRAME == "crop" and meta["crop_mode"] == "box"
    assert meta["pose_columns"] == list(schema.POSE_COLUMNS) and meta["schema_version"] == schema.SCHEMA_VERSION
    assert stored.shape == (FRAMES, 7) and stored.dtype == np.float32
    transforms = box_sample[schema.CROP_TRANSFORM]
    assert transforms.shape == (FRAMES, 2, 3)
    assert (transforms == transforms[0]).all() and transforms[0, 0, 1] == 0 == transforms[0, 1, 0]  # fixed, unrotated

    yaw, pitch, roll, tx, ty = stored[:, 0], stored[:, 1], stored[:, 2], stored[:, 3], stored[:, 4]
    # The roll really varies in the crop (cv2's angle is counter-clockwise, roll clockwise-positive).
    assert roll.std() > 6 and np.corrcoef(roll, -ROLL_DEG)[0, 1] > 0.99
    assert np.abs((roll - roll.mean()) - (-ROLL_DEG - (-ROLL_DEG).mean())).max() < 1.5
    # Translation in crop pixels follows the shift times the box's scale (the rotation about the
    # face centre moves the template origin a little too, hence the loose bound).
    scale = transforms[0, 0, 0]
    for column, shift in ((tx, SHIFT_PX[:, 0]), (ty, SHIFT_PX[:, 1])):
        assert np.corrcoef(column, shift)[0, 1] > 0.95
        assert np.abs((column - column.mean()) - scale * (shift - shift.mean())).max() < 4

    repose = _repose(_crop_video(box_sample[schema.MP4], tmp_path), params)
    np.testing.assert_allclose(repose.roll, roll, atol=1.5)  # degrees
    np.testing.assert_allclose(repose.translation[:, :2], stored[:, 3:5], atol=0.02 * 256)  # crop pixels
    np.testing.assert_allclose(repose.scale, stored[:, 6], rtol=0.03)
    assert np.median(np.abs(repose.yaw - yaw)) < 3 and np.median(np.abs(repose.pitch - pitch)) < 3
    # Landmarks are stored in crop pixels.
    landmarks = box_sample[schema.LANDMARKS]
    assert landmarks.shape == (FRAMES, schema.N_LANDMARKS, 3) and landmarks.dtype == np.float16
    assert np.allclose(head_pose(landmarks.astype(np.float32)).roll, roll, atol=0.5)


def test_crop_transform_maps_source_landmarks_onto_the_crop(box_sample, moving_clip, params, tmp_path):
    """crop.npy maps source pixels to crop pixels: source landmarks mapped by it land where FaceMesh
    finds them in the crop video."""
    source = face.get_tracker(params.preprocess.face).track(read_frames(moving_clip)[0]).landmarks
    mapped = face.transform_points(source, box_sample[schema.CROP_TRANSFORM].astype(np.float64))
    refound = face.get_tracker(params.preprocess.face).track(_crop_video(box_sample[schema.MP4], tmp_path)).landmarks
    error = np.linalg.norm(mapped[..., :2] - refound[..., :2], axis=-1)  # (T, 478) crop pixels
    assert np.median(error) < 0.01 * 256, np.median(error)


def test_aligned_mode_removes_roll_and_pose_still_describes_the_crop(moving_clip, params, tmp_path):
    """The `aligned` option levels the eyes (roll leaves the pixels); pose.npy, in the crop frame,
    says so, and still matches the pose re-estimated on the crop."""
    outcome = process_clip(
        _row(moving_clip), _cfg(params, crop_size=256, crop={"mode": "aligned", "border": "reflect"})
    )
    assert len(outcome.samples) == 1, outcome.failures
    sample = _members(outcome.samples[0])
    stored, transforms = sample[schema.POSE], sample[schema.CROP_TRANSFORM]
    assert sample[schema.JSON]["crop_mode"] == "aligned"
    assert stored[:, 2].std() < 1.5  # roll removed from the pixels
    assert np.abs(np.degrees(np.arctan2(transforms[:, 1, 0], transforms[:, 0, 0]))).max() > 8  # by rotating
    repose = _repose(_crop_video(sample[schema.MP4], tmp_path), params)
    np.testing.assert_allclose(repose.roll, stored[:, 2], atol=1.5)
    np.testing.assert_allclose(repose.translation[:, :2], stored[:, 3:5], atol=0.02 * 256)


def test_sample_json_is_media_derived_with_crop_measures(box_sample):
    meta = box_sample[schema.JSON]
    assert "provenance" not in meta and "split" not in meta
    assert meta["n_frames"] == FRAMES and meta["segment"] == [0, FRAMES]
    assert meta["outside_fraction"] == 0.0 and 0.5 < meta["upscale"] < 3  # box shifted inside the 384² frame
    assert meta["upscale"] == pytest.approx(box_sample[schema.CROP_TRANSFORM][0, 0, 0], rel=1e-3)
    assert meta["sharpness"] > 20 and meta["frames_bridged"] == [] and meta["frames_rejected"] == {}
    assert meta["gaze_columns"] == list(schema.GAZE_COLUMNS)
    assert meta["expression_columns"] == list(schema.EXPRESSION_COLUMNS)
    assert meta["source_size"] == meta["decoded_size"] == [SIDE, SIDE]


def test_sharpness_does_not_depend_on_the_crop_size(moving_clip, params, box_sample):
    """Measured on the source face at a fixed size: the same at 512² as at 256² (a crop-pixel
    measure failed a segment at 512² that passed at 128²)."""
    filters = params.preprocess.filters.model_dump() | {"max_upscale": 10.0}
    outcome = process_clip(_row(moving_clip), _cfg(params, crop_size=512, filters=filters))
    assert len(outcome.samples) == 1, outcome.failures
    assert json.loads(outcome.samples[0].members[schema.JSON])["sharpness"] == box_sample[schema.JSON]["sharpness"]


def test_same_clip_gives_the_same_bytes(moving_clip, params, box_sample):
    again = process_clip(_row(moving_clip), _cfg(params, crop_size=256, crop={"mode": "box", "border": "replicate"}))
    first = {name: data for name, data in again.samples[0].members.items()}
    assert first[schema.MP4] == box_sample[schema.MP4]
    assert json.loads(first[schema.JSON]) == box_sample[schema.JSON]


# Box placement and borders (pure functions)


def test_crop_box_fills_outside_by_the_edge_never_black():
    rng = np.random.default_rng(1)
    frame = rng.integers(40, 250, size=(60, 80, 3), dtype=np.uint8)
    box = (-20, 30, 50)  # 20 px left of the frame, 20 px below it
    for border in ("replicate", "reflect"):
        crop = crop_box(frame, box, 50, border)
        assert crop.shape == (50, 50, 3) and crop.min() >= 40  # no black pixels
        np.testing.assert_array_equal(crop[:30, 20:], frame[30:60, 0:30])  # the inside is copied exactly
    replicated = crop_box(frame, box, 50, "replicate")
    np.testing.assert_array_equal(replicated[:30, :20], np.repeat(frame[30:60, :1], 20, axis=1))
    transform = np.array([[1.0, 0, 20], [0, 1.0, -30]])
    assert outside_fraction(transform[None], 50, frame.shape[:2])[0] == pytest.approx(1 - 30 * 30 / 2500, abs=0.02)
    np.testing.assert_array_equal(crop_frame(frame, transform, 50), replicated)


def test_box_transform_holds_the_moving_face_and_stays_in_the_frame():
    from preprocessing.pose import load_template

    template = load_template().points
    path = np.column_stack([np.linspace(100, 160, 50), np.linspace(120, 130, 50)])  # centre moves 60 px
    landmarks = np.stack([template * 50 + [x, y, 0] for x, y in path])  # face ~100 px high
    height = float(np.median(face.face_height(landmarks)))
    transform = box_transform(landmarks, 128, crop_scale=1.9)
    x0, y0, side = face.box_of(transform, 128)
    assert side >= 1.9 * height * 0.99
    boxes = face.landmark_boxes(landmarks)
    assert (boxes[:, 0] >= x0).all() and (boxes[:, 2] <= x0 + side).all()  # the face never leaves the box
    assert (boxes[:, 1] >= y0).all() and (boxes[:, 3] <= y0 + side).all()
    # In a small frame the box is narrowed toward the frame and shifted in: nothing outside.
    inside = box_transform(landmarks, 128, crop_scale=1.9, frame_hw=(250, 300))
    assert outside_fraction(inside[None], 128, (250, 300))[0] == 0
    x0, y0, side = face.box_of(inside, 128)
    assert (boxes[:, 0] >= x0).all() and (boxes[:, 2] <= x0 + side).all()
    with pytest.raises(ValueError, match="no frame with a face"):
        box_transform(np.full((3, 478, 3), np.nan), 128, 1.9)


# Failures: recorded with their measured values, nothing escapes


def test_frames_of_rejected_segments_are_accounted(tmp_path, params):
    """40 sharp frames, 10 without a face, 40 blurred: one sample, and every frame accounted for."""
    frames = _moving_portrait()
    blank = np.full((10, SIDE, SIDE, 3), 128, np.uint8)
    blurred = np.stack([cv2.GaussianBlur(frame, (0, 0), 6) for frame in frames])
    path = tmp_path / "mixed.mp4"
    # Lossless (CRF 0): the counts below are of the frames built here, not of what a lossy encoder makes of the
    # cut from grey to a blurred face (at CRF 18 its first frames lose the face: 12 without one, 38 blurry).
    sound = np.zeros(90 * RATE // FPS, np.float32)
    write_mp4(path, np.concatenate([frames, blank, blurred]), FPS, sound, RATE, crf=0)
    outcome = process_clip(_row(path), _cfg(params, crop_size=128))
    assert [sample.frames for sample in outcome.samples] == [FRAMES]
    assert outcome.frame_rejections == {"blurry": 40, "no_face": 10}
    (failure,) = outcome.failures
    assert failure["reason"] == "blurry" and failure["status"] == "rejected" and failure["key"].endswith("_00050")
    assert "min_sharpness 20.0" in failure["detail"] and "sharpness " in failure["detail"]
    assert set(failure) == {"clip_id", "key", "status", "reason", "detail"}  # no split: the writer joins it


def test_clip_without_a_face_is_one_failure_with_its_limits(tmp_path, params):
    path = tmp_path / "empty.mp4"
    write_mp4(path, np.full((30, 96, 96, 3), 90, np.uint8), FPS, np.zeros(30 * RATE // FPS, np.float32), RATE)
    outcome = process_clip(_row(path), _cfg(params, crop_size=128))
    assert not outcome.samples and outcome.frame_rejections == {"no_face": 30} and not outcome.transient
    (failure,) = outcome.failures
    assert failure["reason"] == "no_face" and failure["status"] == "rejected"
    assert "min_face_px 40.0" in failure["detail"] and "max_gap_frames" in failure["detail"]


def test_exceptions_become_failures_and_environment_ones_are_transient(moving_clip, params, tmp_path, monkeypatch):
    cfg = _cfg(params, crop_size=128)
    missing = process_clip(_row(tmp_path / "gone.mp4"), cfg)
    assert missing.failures[0]["reason"] == "missing_media" and missing.transient and not missing.samples
    assert missing.failures[0]["detail"].startswith("FileNotFoundError: No such file or directory")
    folder = process_clip(_row(tmp_path), cfg)  # a directory: not the environment's fault
    assert folder.failures[0]["reason"] == "unreadable_media" and not folder.transient

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    broken = process_clip(_row(garbage), cfg)
    assert broken.failures[0]["reason"] == "decode_error" and not broken.transient

    def boom(*args, **kwargs):
        raise RuntimeError("[23:18:45] graph failed at 0x7f3a2b1c9d40")

    monkeypatch.setattr(face, "box_transform", boom)
    crashed = process_clip(_row(moving_clip), cfg)
    (failure,) = crashed.failures
    assert failure["reason"] == "internal_error" and failure["status"] == "error" and not crashed.transient
    assert failure["detail"] == "RuntimeError: graph failed at 0x?"

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(face, "box_transform", no_memory)
    starved = process_clip(_row(moving_clip), cfg)
    assert starved.failures[0]["reason"] == "internal_error" and starved.transient
    assert starved.failures[0]["detail"].startswith("MemoryError")


def test_clean_detail_strips_volatile_text():
    noisy = "[23:18:45] /src/video_reader.cc:83: ERROR opening x.mp4\n  at 2026-11-22T01:02:03.5Z (obj 0x55d1c0ffee00)"
    assert clean_detail(noisy) == "/src/video_reader.cc:83: ERROR opening x.mp4 at <time> (obj 0x?)"
    assert clean_detail(noisy) == clean_detail(noisy.replace("23:18:45", "07:00:01"))
    assert len(clean_detail("x" * 2000)) == 500


# Params that load but cannot work are rejected at load, naming the key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["preprocess"].update(crop_size=255), "crop_size must be even"),
        (lambda p: p["preprocess"]["audio"].update(fmax=9000.0), "Nyquist"),
        (lambda p: p["preprocess"]["audio"].update(encoder_dir="/no/such/encoder"), "encoder_dir"),
        (lambda p: p["preprocess"]["crop"].update(mode="rotated"), "preprocess.crop.mode"),
    ],
)
def test_params_that_cannot_work_are_rejected(tmp_path, change, message):
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    change(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as caught:
        load_params(path)
    assert "preprocess" in str(caught.value)


# Bounded memory (issue 8 sec. 3)


_MEASURE_RSS = """
import json, resource, sys
from preprocessing.process import process_clip
from vasa.core.config import PreprocessConfig
cfg = PreprocessConfig.model_validate_json(sys.argv[1])
peaks = []
for path in sys.argv[2:]:
    outcome = process_clip({"clip_id": path, "key": "0" * 16, "media_path": path, "av_offset": None}, cfg)
    peaks.append([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, [s.frames for s in outcome.samples]])
print(json.dumps(peaks))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_clip_length(tmp_path, params):
    """process_clip holds a chunk of frames, never the clip. In a fresh process, after a short clip
    has loaded every model, a 5x longer 512² clip raises the peak RSS by far less than its extra
    frames would take (120 x 768 KiB = 90 MiB); what does grow is the landmarks (~40 KiB a frame)."""
    import subprocess
    import sys

    portrait = skimage.data.astronaut()
    paths = []
    for frames in (8, 30, 150):
        path = tmp_path / f"long_{frames}.mp4"
        clip = np.stack([np.roll(portrait, (t % 16) - 8, axis=1) for t in range(frames)])
        write_mp4(path, clip, FPS, np.zeros(frames * RATE // FPS, np.float32), RATE, preset="ultrafast")
        paths.append(str(path))
    filters = params.preprocess.filters.model_dump() | {"min_seconds": 0.3}
    cfg = _cfg(params, crop_size=128, decode={"max_side": None, "chunk_frames": 8}, filters=filters)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_RSS, cfg.model_dump_json(), *paths], capture_output=True, text=True, check=True
    )
    (_, warm), (short, short_frames), (long, long_frames) = json.loads(result.stdout.strip().splitlines()[-1])
    assert (warm, short_frames, long_frames) == ([8], [30], [150])
    growth = long - short
    assert growth < 0.25 * 120 * portrait.nbytes, (short, long)
