"""The evaluation judges and metric functions (vasa/evaluation): S_C/S_D, ΔP, CAPP and the Fréchet distance on
hand-made inputs whose answer is known; mouth crops from landmarks; the sync expert and CAPP learning, through
the shared engine, on synthetic talking clips (mouth opening and nods follow the loudness), judged on held-out
clips; and the sync expert on real speech (fixtures) when they are present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_extract_motion import _one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from vasa.core.config import Params
from vasa.evaluation import capp as capp_mod
from vasa.evaluation import sync as sync_mod
from vasa.evaluation.metrics import (
    cosine,
    delta_pose,
    frechet_distance,
    offset_distances,
    shift_audio,
    sync_score,
)
from vasa.loaders.judge_clips import LIP_CORNERS, MOUTH_H, MOUTH_W, OUTER_LIP, JudgeClip, mel_stats, mouth_crops
from vasa.stages.train_judges import capp_check, sync_check
from vasa.training.engine import train

# --- metric functions on inputs with a known answer ---------------------------------------------------------


def test_sync_score_reads_min_and_median_over_offsets():
    # 3 frames x 5 offsets (-2..2); frame means per offset: [3, 2, 1, 2, 4] -> S_D 1, median 2, S_C 1, offset 0
    distances = np.array([[3, 2, 1, 2, 4], [2, 1, 0, 1, 5], [4, 3, 2, 3, 3]], np.float64)
    score = sync_score(distances)
    assert score.distance == pytest.approx(1.0)
    assert score.confidence == pytest.approx(1.0)
    assert score.offset == 0
    # the best offset one step later: +1
    assert sync_score(distances[:, [4, 0, 3, 1, 2]]).offset == 2
    with pytest.raises(ValueError):
        sync_score(np.zeros((3, 4)))


def test_offset_search_finds_a_known_shift():
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(60, 8))
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    visual = np.roll(audio, -3, axis=0)  # frame t looks like the audio of t + 3
    distances = offset_distances(visual, audio, max_offset=5)
    assert distances.shape == (60, 11)
    assert np.allclose(distances[:50, 5 + 3], 0, atol=1e-5)  # zero distance at offset +3 (before the wrap)
    assert np.allclose(distances[0, :5], 1.0, atol=1e-5)  # zero-padded audio: |v - 0| = 1 for unit v
    score = sync_score(distances)
    assert score.offset == 3
    assert score.distance < 0.2 < score.confidence


def test_delta_pose_on_a_known_sequence():
    t = np.arange(10, dtype=np.float64)
    angles = np.stack([t, np.zeros(10), -2 * t], axis=1)  # |Δyaw| 1, |Δpitch| 0, |Δroll| 2 per frame
    assert delta_pose(angles) == pytest.approx(1.0)
    angles[4] = np.nan  # pairs (3, 4) and (4, 5) are not measured
    assert delta_pose(angles) == pytest.approx(1.0)
    assert np.isnan(delta_pose(np.full((5, 3), np.nan)))


def test_cosine_frechet_and_shift():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert np.allclose(cosine(a, np.array([[2.0, 0.0], [1.0, 0.0]])), [1.0, 0.0])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 3))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + np.array([3.0, 0.0, 4.0])) == pytest.approx(25.0, rel=1e-6)
    features = np.arange(10)[:, None]
    assert shift_audio(features, 3)[3, 0] == 0 and shift_audio(features, 3)[0, 0] == 7


def test_mouth_crop_centres_the_lips():
    frames = np.full((2, 128, 128, 3), 90, np.uint8)
    frames[:, 80:90, 50:78] = 250  # a bright mouth at x 50..78, y 80..90
    landmarks = np.full((2, 478, 3), np.nan, np.float32)
    ring = np.linspace(0, 2 * np.pi, len(OUTER_LIP), endpoint=False)
    landmarks[:, list(OUTER_LIP), 0] = 64 + 14 * np.cos(ring)
    landmarks[:, list(OUTER_LIP), 1] = 85 + 5 * np.sin(ring)
    landmarks[:, LIP_CORNERS[0], :2] = (50, 85)
    landmarks[:, LIP_CORNERS[1], :2] = (78, 85)
    landmarks[1] = np.nan  # no face in frame 1: the nearest measured box
    mouths = mouth_crops(frames, landmarks)
    assert mouths.shape == (2, MOUTH_H, MOUTH_W)
    centre = mouths[0, MOUTH_H // 2 - 2 : MOUTH_H // 2 + 2, MOUTH_W // 2 - 6 : MOUTH_W // 2 + 6]
    assert centre.min() > 200 and mouths[0, :3].max() < 120  # lips in the middle, skin at the top
    assert np.array_equal(mouths[0], mouths[1])
    with pytest.raises(ValueError):
        mouth_crops(frames, np.full((2, 478, 3), np.nan, np.float32))


def test_capp_windows_and_pose_input():
    assert capp_mod.window_starts(100, 75, 10) == [0, 10, 20, 25]
    assert capp_mod.window_starts(50, 75, 10) == []
    angles = np.stack([np.arange(5.0), np.zeros(5), np.full(5, 7.0)], axis=1)
    change = capp_mod.pose_window(angles)
    assert np.allclose(change[1:, 0], 1 / capp_mod.POSE_UNIT_DEG) and np.allclose(change[0], 0)


# --- the judges learn on synthetic talking clips -------------------------------------------------------------

FRAMES, K_MEL, MELS = 150, 4, 80


def _envelope(rng: np.random.Generator, n: int) -> np.ndarray:
    """Speech-like loudness in [0, 1]: bursts of a few frames with pauses."""
    raw = np.convolve(rng.normal(size=n + 8), np.ones(5) / 5, mode="same")[4:-4]
    return np.clip(raw * 2.5, 0, 1)


def synthetic_clip(seed: int, speaker: int) -> JudgeClip:
    """Mouth opening follows the loudness; pitch nods follow it smoothed (the sample corpus's relations)."""
    rng = np.random.default_rng(seed)
    e = _envelope(rng, FRAMES)
    spectrum = np.linspace(1.0, 0.3, MELS) * (1 + 0.3 * speaker)
    mel = -8 + 6 * e[:, None, None] * spectrum[None, None, :] + rng.normal(0, 0.3, (FRAMES, K_MEL, MELS))
    mouths = np.full((FRAMES, MOUTH_H, MOUTH_W), 110, np.uint8)
    yy, xx = np.mgrid[:MOUTH_H, :MOUTH_W]
    for t in range(FRAMES):
        height = 1.5 + 10 * e[t]
        dx, dy = rng.integers(-1, 2, 2)
        inside = ((xx - 24 - dx) / 13) ** 2 + ((yy - 16 - dy) / height) ** 2 <= 1
        mouths[t][inside] = 30
    nod = np.convolve(e, np.ones(6) / 6, mode="same")
    drift = np.cumsum(rng.normal(0, 0.15, (FRAMES, 3)), axis=0)
    angles = drift + np.stack([np.zeros(FRAMES), 4 * nod, np.zeros(FRAMES)], axis=1)
    return JudgeClip(f"c{seed}", f"clip{seed}", f"spk{speaker}", mouths, mel.reshape(FRAMES, -1).astype(np.float32),
                     angles.astype(np.float32))  # fmt: skip


def _short(cfg, steps: int):
    return cfg.replace(steps=steps, checkpoint_every=steps, image_every=steps, log_every=steps, warmup_steps=10)


@pytest.mark.slow
def test_judges_learn_timing_on_synthetic_clips(tmp_path: Path, params: Params):
    train_clips = [synthetic_clip(seed, seed % 2) for seed in range(6)]
    heldout = [synthetic_clip(100 + seed, seed % 2) for seed in range(2)]
    stats = mel_stats(train_clips)
    judges, evaluate = params.judges, params.evaluate

    sync_task = sync_mod.SyncTask(sync_mod.SYNC_PRESETS["tiny"], K_MEL, MELS, judges.sync.negatives,
                                  judges.sync.temperature)  # fmt: skip
    cfg = _short(judges.sync.train, 150)
    source = sync_mod.sync_batches(train_clips, stats, K_MEL, judges.sync, cfg.batch_size, cfg.seed)
    result = train(sync_task, cfg, source, tmp_path / "sync", meta={}, resume=False, progress=False,
                   evaluate=lambda m: sync_check(m[sync_mod.SYNC], heldout, stats, evaluate))  # fmt: skip
    sync = result.evaluation
    assert sync["margin/S_C"] >= 0.15 and sync["margin/S_D"] >= 0.15, sync  # aligned beats shifted audio

    capp_task = capp_mod.CappTask(capp_mod.CAPP_PRESETS["tiny"], judges.capp.window, K_MEL * MELS)
    cfg = _short(judges.capp.train, 150)
    source = capp_mod.capp_batches(train_clips, stats, judges.capp.window, cfg.batch_size, cfg.seed)
    result = train(capp_task, cfg, source, tmp_path / "capp", meta={}, resume=False, progress=False,
                   evaluate=lambda m: capp_check(m[capp_mod.CAPP], heldout, stats, evaluate))  # fmt: skip
    capp = result.evaluation
    assert capp["margin/shuffled"] >= 0.1 and capp["margin/shifted"] >= 0.1, capp  # true pairs score highest

    # Same inputs, same seed: the same weights (CPU determinism of the checkpoint format).
    again = train(capp_task, cfg, source, tmp_path / "capp2", meta={}, resume=False, progress=False)
    first = (tmp_path / "capp" / "model" / "capp.safetensors").read_bytes()
    assert (tmp_path / "capp2" / "model" / "capp.safetensors").read_bytes() == first
    assert again.step == cfg.steps


def test_sync_expert_shapes():
    torch.manual_seed(0)
    model = sync_mod.SyncExpert(sync_mod.SYNC_PRESETS["tiny"], K_MEL, MELS)
    clip = synthetic_clip(0, 0)
    v, a = sync_mod.embed_clip(model, clip.mouths, clip.mel)
    assert v.shape == a.shape == (FRAMES - sync_mod.FRAMES + 1, sync_mod.SYNC_PRESETS["tiny"].dim)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


# --- real speech (fixtures): the sync expert on real talking heads ---------------------------------------------

FIXTURE_VIDEOS = (
    "vid01_sadtalker_WDA_KatieHill_000.mp4",
    "vid02_sadtalker_WDA_AlexandriaOcasioCortez_000.mp4",
    "vid04_retalking_face2.mp4",
    "vid05_retalking_face5.mp4",
    "vid06_liveportrait_d20.mp4",
    "vox2_681100216.mp4",
    "vox2_517600055.mp4",
    "vox2_620900105.mp4",
    "vox2_731200067.mp4",
    "vox2_796100172.mp4",
)  # the 25 fps fixtures with speech (vid03 is 30 fps)
CROP = 128


def fixture_clip(path: Path, params: Params) -> JudgeClip:
    """A fixture video as the shards would hold it: FaceMesh, the box crop, landmarks in crop pixels, log-mel."""
    from preprocessing import face as face_mod
    from preprocessing.audio import log_mel
    from preprocessing.decode import read_audio, read_frames

    frames, _ = read_frames(path)
    track = face_mod.get_tracker(params.preprocess.face).track(frames)
    landmarks = face_mod.fill_gaps(track.landmarks)
    transform = face_mod.box_transform(landmarks, CROP, params.preprocess.face.crop_scale, frames.shape[1:3])
    transforms = np.repeat(transform[None], len(frames), 0)
    crops = face_mod.apply_crops(frames, transforms, CROP)
    in_crop = face_mod.transform_points(landmarks, transforms)
    audio = read_audio(path, params.preprocess.sample_rate)
    mel = log_mel(audio, params.preprocess.sample_rate, 25, params.preprocess.audio)
    t = min(len(frames), len(mel) // K_MEL)
    return JudgeClip(path.stem, path.stem, path.stem, mouth_crops(crops[:t], in_crop[:t]),
                     mel[: t * K_MEL].reshape(t, -1), np.zeros((t, 3), np.float32))  # fmt: skip


@pytest.mark.slow
def test_real_talking_heads_become_judge_inputs(params: Params, fixtures_dir: Path):
    """The judges' inputs from real video (the path evaluate runs on generated frames): a mouth crop for every
    frame, the mel frames of the same frames, and a mouth that moves. (Training the tiny sync expert on these
    ten short clips does not generalise: docs/BENCHMARKS.md.)"""
    for name in FIXTURE_VIDEOS[:3]:
        clip = fixture_clip(fixtures_dir / name, params)
        assert clip.mouths.shape[1:] == (MOUTH_H, MOUTH_W) and len(clip.mouths) >= 100
        assert clip.mel.shape == (len(clip.mouths), K_MEL * MELS) and np.isfinite(clip.mel).all()
        centre = clip.mouths[:, 8:24, 12:36].astype(np.float64)  # the lips
        assert centre.std(axis=0).mean() > 4, name  # the mouth opens and closes over the clip
