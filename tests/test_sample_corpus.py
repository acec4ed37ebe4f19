"""The embedded sample corpus: reproducible, one face per frame, mouth that follows the speech."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from preprocessing.decode import read_audio, read_frames
from preprocessing.sample import tts
from preprocessing.sample.animate import speech_envelope
from preprocessing.sample.corpus import INDEX_NAME, plan_corpus, write_corpus
from preprocessing.sample.portraits import PORTRAITS, measure_mesh, stored_mesh

pytestmark = pytest.mark.slow


def _clips(folder: Path) -> list[dict]:
    return json.loads((folder / INDEX_NAME).read_text())["clips"]


def _faces_and_mouth(frames: np.ndarray) -> tuple[list[int], np.ndarray]:
    """FaceMesh in tracking mode: faces found per frame, inner-lip gap / face height per frame."""
    import mediapipe as mp

    counts, opening = [], []
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True, max_num_faces=2) as mesh:
        for frame in frames:
            faces = mesh.process(frame).multi_face_landmarks or []
            counts.append(len(faces))
            if faces:
                points = np.array([(p.x, p.y) for p in faces[0].landmark])
                opening.append(np.linalg.norm(points[13] - points[14]) / np.linalg.norm(points[10] - points[152]))
            else:
                opening.append(np.nan)
    return counts, np.array(opening)


def test_corpus_shape_matches_params(sample_corpus, params):
    cfg = params.sample
    clips = _clips(sample_corpus)
    assert len(clips) == len(cfg.identities) * cfg.clips_per_identity >= 8  # the fixture: no held-out clips
    assert len({clip["speaker_id"] for clip in clips}) >= 2
    splits = {json.loads((sample_corpus / f"{c['clip_id']}.json").read_text())["split"] for c in clips}
    assert splits == {"train"}
    for clip in clips:
        assert cfg.min_seconds <= clip["duration_s"] <= cfg.max_seconds
        record = json.loads((sample_corpus / f"{clip['clip_id']}.json").read_text())
        data = (sample_corpus / record["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"] == clip["sha256"]
        assert record["size_bytes"] == len(data)
        assert record["licence"] == record["portrait"]["licence"] == "public-domain"
        assert record["portrait"]["package_version"] and record["speech"]["package_version"]
        assert record["speech"]["text"].endswith(".")


def test_heldout_clips_say_sentences_no_training_clip_of_their_speaker_says(params):
    plans = plan_corpus(params.sample)
    assert params.sample.heldout_clips_per_identity >= 1
    for identity in params.sample.identities:
        mine = [p for p in plans if p.identity.name == identity.name]
        trained = {s for p in mine if not p.heldout for s in p.sentences}
        heldout = [p for p in mine if p.heldout]
        assert len(heldout) == params.sample.heldout_clips_per_identity
        assert all(not set(p.sentences) & trained for p in heldout)  # unseen speech of a known face
        assert max(p.clip_id for p in mine) in {p.clip_id for p in heldout}  # the last clip: the demo's


def test_same_seed_gives_identical_bytes(sample_corpus, params, tmp_path):
    write_corpus(params.sample.model_copy(update={"heldout_clips_per_identity": 0}), tmp_path)  # as the fixture
    first = sorted(p.name for p in sample_corpus.iterdir())
    assert first == sorted(p.name for p in tmp_path.iterdir())
    for name in first:
        assert (sample_corpus / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_other_seed_gives_other_clips(params):
    other = params.sample.model_copy(update={"seed": 1})
    assert [p.sentences for p in plan_corpus(other)] != [p.sentences for p in plan_corpus(params.sample)]


def test_streams_are_h264_aac_25fps_16k_and_durations_agree(sample_corpus, params):
    import av

    for clip in _clips(sample_corpus):
        path = sample_corpus / clip["file"]
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
            assert video.average_rate == params.sample.fps and audio.sample_rate == params.sample.sample_rate
        frames, fps = read_frames(path)
        samples = read_audio(path, params.sample.sample_rate)
        video_s, audio_s = len(frames) / fps, len(samples) / params.sample.sample_rate
        assert abs(video_s - audio_s) <= 1 / fps, (clip["clip_id"], video_s, audio_s)


def test_one_face_every_frame_and_mouth_follows_speech(sample_corpus, params):
    cfg = params.sample
    for clip in _clips(sample_corpus):
        path = sample_corpus / clip["file"]
        frames, _ = read_frames(path)
        counts, opening = _faces_and_mouth(frames)
        assert set(counts) == {1}, f"{clip['clip_id']}: faces per frame {sorted(set(counts))}"
        envelope = speech_envelope(read_audio(path, cfg.sample_rate), cfg.sample_rate, cfg.fps)
        n = min(len(envelope), len(opening))
        r = np.corrcoef(opening[:n], envelope[:n])[0, 1]
        assert r > 0.5, f"{clip['clip_id']}: mouth/audio Pearson r = {r:.2f}"


def test_interrupted_run_resumes(sample_corpus, params, tmp_path):
    for item in sample_corpus.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    clips = _clips(sample_corpus)
    missing, damaged = clips[0], clips[-1]
    (tmp_path / missing["file"]).unlink()
    (tmp_path / damaged["file"]).write_bytes(b"truncated")
    (tmp_path / INDEX_NAME).unlink()
    untouched = tmp_path / clips[1]["file"]
    before = untouched.stat().st_mtime_ns
    write_corpus(params.sample.model_copy(update={"heldout_clips_per_identity": 0}), tmp_path)  # as the fixture
    assert untouched.stat().st_mtime_ns == before  # kept, not rewritten
    for name in (missing["file"], damaged["file"], INDEX_NAME):
        assert (tmp_path / name).read_bytes() == (sample_corpus / name).read_bytes()


def test_tts_is_reproducible_and_real_speech():
    voice = tts.Voice("en-us+f1", 160, 55, 60)
    first, rate = tts.synthesize("The birch canoe slid on the smooth planks.", voice)
    time.sleep(1.1)  # the clock must not leak into the audio
    second, _ = tts.synthesize("The birch canoe slid on the smooth planks.", voice)
    assert rate == 22050
    assert np.array_equal(first, second)
    assert 1.5 < len(first) / rate < 4.0
    assert np.abs(first).max() > 0.1
    with pytest.raises(tts.TTSError, match="voice"):
        tts.synthesize("hello", tts.Voice("no-such-voice", 160, 50, 50))
    with pytest.raises(tts.TTSError, match="breath"):
        tts.Voice("en-us+f3", 160, 50, 50)
    with pytest.raises(tts.TTSError, match="unknown espeak-ng voice variant"):
        tts.Voice("en-us+nonexistent", 160, 50, 50)


def test_portrait_meshes_match_facemesh():
    """The stored meshes (meshes.py) are what FaceMesh measures on the portraits today."""
    for name, asset in PORTRAITS.items():
        measured = measure_mesh(asset.load())
        error = np.linalg.norm(measured - stored_mesh(name), axis=1)  # (478,) pixels, x, y and z
        assert error.max() < 2.0, (name, int(error.argmax()), float(error.max()))


def test_truth_states_its_convention_and_matches_the_clip(sample_corpus):
    for clip in _clips(sample_corpus):
        truth = json.loads((sample_corpus / f"{clip['clip_id']}.truth.json").read_text())
        record = json.loads((sample_corpus / f"{clip['clip_id']}.json").read_text())
        assert truth["convention"]["schema"].startswith("preprocessing/schema.py")
        assert "degrees" in truth["convention"]["angles"] and "clockwise" in truth["convention"]["roll"]
        for name in ("yaw", "pitch", "roll", "drive_yaw", "drive_pitch", "drive_roll", "mouth", "blink"):
            assert len(truth[name]) == record["n_frames"], name
        # The head pose is the drive composed with the rest pose: equal to their sum to first order.
        for name in ("yaw", "pitch", "roll"):
            summed = np.array(truth[f"drive_{name}"]) + truth["rest_pose"][name]
            assert np.abs(np.array(truth[name]) - summed).max() < 3.0, name
            assert np.std(truth[name]) > 1.0, name  # the head really moves
