"""Decoding clips at a constant frame rate with aligned audio (real fixtures and synthetic files), and
the audio features: log-mel and a tiny randomly initialised speech encoder saved to disk."""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import av
import librosa
import numpy as np
import pytest

from preprocessing import audio, decode
from preprocessing.decode import DecodeError, frame_indices, load_clip
from preprocessing.media import write_mp4
from scripts.build_face_template import SOURCES
from vasa.core.config import Params

VIDEOS = SOURCES  # every real fixture video (the list the face template is built from)
VFR = "vid03_retalking_face1.mp4"  # r_frame_rate 30, average 22.13: frames dropped from a 30 fps grid
FPS, RATE = 25, 16000


def _video_seconds(path: Path) -> float:
    """The video stream's duration from the container header (MEDIAINFO's duration is the whole
    container's, which includes AAC priming and any audio running past the video)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


@pytest.fixture(scope="module")
def mediainfo(fixtures_dir: Path) -> dict[str, dict]:
    with open(fixtures_dir / "MEDIAINFO.csv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def _load(path: Path, **kwargs) -> decode.Clip:
    return load_clip(path, fps=FPS, sample_rate=RATE, **kwargs)


# --- load_clip on real media ----------------------------------------------------------------------


def test_defaults_match_params(params: Params) -> None:
    assert (params.preprocess.fps, params.preprocess.sample_rate) == (FPS, RATE)


@pytest.mark.parametrize("name", VIDEOS)
def test_fixture_clip(name: str, mediainfo: dict, fixtures_dir: Path) -> None:
    clip, info = _load(fixtures_dir / name), mediainfo[name]
    n = len(clip.frames)
    assert clip.frames.dtype == np.uint8
    assert clip.frames.shape == (n, int(info["height"]), int(info["width"]), 3)
    assert abs(n - _video_seconds(fixtures_dir / name) * FPS) <= 1
    assert abs(n - float(info["duration_s"]) * FPS) <= 2
    assert (clip.fps, clip.sample_rate, clip.backend) == (FPS, RATE, "decord")
    assert clip.audio.dtype == np.float32 and clip.audio.shape == (n * RATE // FPS,)
    assert np.isfinite(clip.audio).all() and np.abs(clip.audio).max() <= 1.0
    assert np.sqrt(np.mean(clip.audio**2)) > 1e-3  # speech, not padding
    expected_fps = 1350 / 61 if name == VFR else float(info["fps"])
    assert clip.source_fps == pytest.approx(expected_fps, rel=1e-3)


def test_variable_rate_clip_resampled_by_timestamp(fixtures_dir: Path) -> None:
    import decord

    clip = _load(fixtures_dir / VFR)
    reader = decord.VideoReader(str(fixtures_dir / VFR))
    starts = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
    assert len(starts) == 135 and abs(len(clip.frames) - 6.1 * FPS) <= 1
    index = frame_indices(starts, FPS)
    assert len(index) == len(clip.frames) and index[0] == 0 and index[-1] >= len(starts) - 2
    steps = np.diff(index)
    # Source intervals are 1/30 or 2/30 s: a frame is shown at most twice (2/30 s < 2/25 s), and
    # never are two source frames in a row skipped (3/30 s > 1/25 s).
    assert set(steps.tolist()) <= {0, 1, 2}
    assert not ((steps[:-1] == 0) & (steps[1:] == 0)).any()
    assert (steps == 0).sum() > 10 and (steps == 2).sum() > 5  # both repeats and drops happen
    # Repeated output frames are the very same picture; all others differ.
    same = np.array([np.array_equal(a, b) for a, b in zip(clip.frames[:-1], clip.frames[1:], strict=True)])
    np.testing.assert_array_equal(same, steps == 0)
    np.testing.assert_array_equal(_load(fixtures_dir / VFR, backend="pyav").frames, clip.frames)
    again = _load(fixtures_dir / VFR)  # deterministic
    np.testing.assert_array_equal(again.frames, clip.frames)
    np.testing.assert_array_equal(again.audio, clip.audio)


@pytest.mark.parametrize("name", ["vox2_517600055.mp4", "vid01_sadtalker_WDA_KatieHill_000.mp4"])  # h264, mpeg4
def test_pyav_fallback_agrees_with_decord(name: str, fixtures_dir: Path, monkeypatch) -> None:
    clip = _load(fixtures_dir / name)

    def decord_fails(*args, **kwargs):
        raise decode._DecordFailed("simulated")

    monkeypatch.setattr(decode._DecordFrames, "__init__", decord_fails)
    fallback = _load(fixtures_dir / name)
    assert (clip.backend, fallback.backend) == ("decord", "pyav")
    assert fallback.frames.shape == clip.frames.shape
    assert np.abs(fallback.frames.astype(np.int16) - clip.frames.astype(np.int16)).mean() < 1.0
    np.testing.assert_array_equal(fallback.audio, clip.audio)


def test_forced_decord_reports_its_failure(fixtures_dir: Path, monkeypatch) -> None:
    def decord_fails(*args, **kwargs):
        raise decode._DecordFailed("boom")

    monkeypatch.setattr(decode._DecordFrames, "__init__", decord_fails)
    with pytest.raises(DecodeError, match="decord cannot read the video: boom"):
        load_clip(fixtures_dir / VIDEOS[6], fps=FPS, sample_rate=RATE, backend="decord")


def test_other_output_rates(fixtures_dir: Path) -> None:
    clip = load_clip(fixtures_dir / "vox2_620900105.mp4", fps=30, sample_rate=24000)  # 108 frames at 25 fps
    assert len(clip.frames) == 129  # 4.28 s of frame starts * 30 + 1
    assert clip.audio.shape == (129 * 800,)


# --- frame_indices on synthetic timestamps --------------------------------------------------------


def test_frame_indices_constant_rates() -> None:
    np.testing.assert_array_equal(frame_indices(np.arange(10) / 25, 25), np.arange(10))
    np.testing.assert_array_equal(frame_indices(np.arange(5) / 12.5, 25), np.repeat(np.arange(5), 2)[:-1])
    np.testing.assert_array_equal(frame_indices(np.arange(6) / 50, 25), [0, 2, 4])
    np.testing.assert_array_equal(frame_indices(np.array([3.0]), 25), [0])  # a single frame, any start


def test_frame_indices_tolerate_float_timestamps() -> None:
    starts = (np.arange(250) / 25).astype(np.float32) + np.float32(0.5)  # decord-style float32, offset start
    np.testing.assert_array_equal(frame_indices(starts, 25), np.arange(250))
    jitter = np.arange(250) / 25 + np.tile([2e-5, -2e-5], 125)
    np.testing.assert_array_equal(frame_indices(jitter, 25), np.arange(250))


# --- bad and unusual inputs -----------------------------------------------------------------------


def _speech_like(n: int) -> np.ndarray:
    t = np.arange(n) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)


def _frames(n: int, size: int = 64) -> np.ndarray:
    """(n, size, size, 3) uint8: a horizontal grey ramp that shifts by 10 levels per frame."""
    ramp = np.linspace(0, 200, size)[None, None, :, None] + 10 * np.arange(n)[:, None, None, None]
    return np.broadcast_to(ramp % 256, (n, size, size, 3)).astype(np.uint8)


def _write_aac_only(path: Path, samples: np.ndarray) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=RATE)
        stream.layout = "mono"
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, start, Fraction(1, RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_files_raise_decode_error(backend: str, tmp_path: Path) -> None:
    cases = {"empty": b"", "random": np.random.default_rng(0).bytes(50_000)}
    for name, data in cases.items():
        (tmp_path / f"{name}.mp4").write_bytes(data)
    write_mp4(tmp_path / "silent.mp4", _frames(10), FPS, audio=None)
    _write_aac_only(tmp_path / "aac_only.mp4", _speech_like(RATE))
    expected = {
        "empty.mp4": "empty file",
        "random.mp4": "not a readable media file",
        "missing.mp4": "not a readable media file",
        "silent.mp4": "no audio stream",
        "aac_only.mp4": "no video stream",
    }
    for name, message in expected.items():
        with pytest.raises(DecodeError, match=message) as caught:
            load_clip(tmp_path / name, fps=FPS, sample_rate=RATE, backend=backend)
        assert name in str(caught.value)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_truncated_and_audio_only_fixtures(backend: str, fixtures_dir: Path, tmp_path: Path) -> None:
    cases = {
        "vox2_517600055.mp4": "cut off before its index",  # index (moov) at the end: the half has none
        "vid06_liveportrait_d20.mp4": "truncated",  # index first: frames run out half way
    }
    for name, message in cases.items():
        data = (fixtures_dir / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(DecodeError, match=message):
            load_clip(tmp_path / name, fps=FPS, sample_rate=RATE, backend=backend)
    (tmp_path / "speech.mp4").write_bytes((fixtures_dir / "aud01_sadtalker_RD_Radio31_000.wav").read_bytes())
    with pytest.raises(DecodeError, match="no video stream"):
        load_clip(tmp_path / "speech.mp4", fps=FPS, sample_rate=RATE, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_one_frame_video_loads(backend: str, tmp_path: Path) -> None:
    write_mp4(tmp_path / "one.mp4", _frames(1), FPS, _speech_like(RATE // FPS), RATE)
    clip = load_clip(tmp_path / "one.mp4", fps=FPS, sample_rate=RATE, backend=backend)
    assert clip.frames.shape == (1, 64, 64, 3) and clip.audio.shape == (RATE // FPS,)


def test_synthetic_clip_round_trip(tmp_path: Path) -> None:
    frames, sound = _frames(50), _speech_like(2 * RATE)
    write_mp4(tmp_path / "clip.mp4", frames, FPS, sound, RATE)
    clip = load_clip(tmp_path / "clip.mp4", fps=FPS, sample_rate=RATE)
    assert clip.frames.shape == frames.shape and clip.backend == "decord"
    assert np.abs(clip.frames.astype(np.int16) - frames).mean() < 8  # lossy H.264 of sharp ramps
    assert np.corrcoef(clip.audio, sound)[0, 1] > 0.99  # aligned: no lag from AAC priming


def test_short_audio_is_an_error(tmp_path: Path) -> None:
    write_mp4(tmp_path / "short.mp4", _frames(50), FPS, _speech_like(RATE), RATE)  # 2 s video, 1 s audio
    with pytest.raises(DecodeError, match="short by more than one frame"):
        load_clip(tmp_path / "short.mp4", fps=FPS, sample_rate=RATE)


def test_audio_short_by_less_than_a_frame_is_padded(tmp_path: Path) -> None:
    write_mp4(tmp_path / "nearly.mp4", _frames(50), FPS, _speech_like(2 * RATE - 1024), RATE)
    clip = load_clip(tmp_path / "nearly.mp4", fps=FPS, sample_rate=RATE)
    assert clip.audio.shape == (2 * RATE,) and not clip.audio[-10:].any()


# --- log-mel --------------------------------------------------------------------------------------


def test_mel_frames_per_video_frame() -> None:
    assert audio.mel_frames_per_video_frame(16000, 25, 160) == 4
    assert audio.mel_frames_per_video_frame(16000, 25, 320) == 2
    for sample_rate, fps, hop in [(16000, 30, 160), (16000, 25, 300)]:
        with pytest.raises(ValueError, match="whole multiple"):
            audio.mel_frames_per_video_frame(sample_rate, fps, hop)


def test_log_mel_shape_and_determinism(params: Params) -> None:
    cfg = params.preprocess.audio
    sound = _speech_like(50 * 640 + 300)  # 50 whole video frames and a remainder
    mel = audio.log_mel(sound, RATE, FPS, cfg)
    assert mel.shape == (50 * 4, cfg.n_mels) == (200, 80) and mel.dtype == np.float32
    np.testing.assert_array_equal(audio.log_mel(sound, RATE, FPS, cfg), mel)
    np.testing.assert_array_equal(audio.log_mel(sound.astype(np.float64), RATE, FPS, cfg), mel)
    assert audio.log_mel(sound[:639], RATE, FPS, cfg).shape == (0, 80)


def test_log_mel_sine_lands_in_its_band(params: Params) -> None:
    cfg = params.preprocess.audio
    t = np.arange(RATE) / RATE
    mel = audio.log_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), RATE, FPS, cfg)
    centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.fmin, fmax=cfg.fmax)[1:-1]
    profile = mel[4:-4].mean(axis=0)  # away from the edges
    assert abs(int(profile.argmax()) - int(np.abs(centres - 1000).argmin())) <= 1
    assert profile.max() - np.median(profile) > 10  # > 43 dB above the typical band


def test_log_mel_silence_is_a_constant_floor(params: Params) -> None:
    mel = audio.log_mel(np.zeros(25 * 640, dtype=np.float32), RATE, FPS, params.preprocess.audio)
    np.testing.assert_allclose(mel, np.log(audio.LOG_FLOOR), rtol=1e-6)


# --- speech encoder -------------------------------------------------------------------------------

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32, 32),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_feat_extract_layers=2,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


@pytest.fixture(scope="module", params=["wav2vec2", "hubert"])
def encoder_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config_class, model_class = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "hubert": (HubertConfig, HubertModel),
    }[request.param]
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(request.param)
    model_class(config_class(**TINY)).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True).save_pretrained(directory)
    return directory


def test_speech_encoder_one_vector_per_video_frame(encoder_dir: Path) -> None:
    encoder = audio.SpeechEncoder(encoder_dir)
    sound = _speech_like(30 * 640 + 100)  # 30 video frames
    states = encoder.encode(sound, RATE, FPS)
    assert states.shape == (30, 32) and states.dtype == np.float32 and np.isfinite(states).all()
    np.testing.assert_array_equal(encoder.encode(sound, RATE, FPS), states)
    assert not np.allclose(states[0], states[-1])
    resampled = encoder.encode(librosa.resample(sound, orig_sr=RATE, target_sr=48000), 48000, FPS)
    assert resampled.shape == (30, 32)
    assert encoder.encode(sound[:640], RATE, FPS).shape == (1, 32)  # shorter than 1 s still works
    assert encoder.encode(sound[:100], RATE, FPS).shape == (0, 32)


def test_get_encoder_is_cached(encoder_dir: Path) -> None:
    assert audio.get_encoder(encoder_dir) is audio.get_encoder(str(encoder_dir))


def test_speech_encoder_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        audio.SpeechEncoder(tmp_path / "nowhere")


def test_state_times_interpolate_to_frame_centres() -> None:
    times = np.array([0.0125, 0.0325, 0.0525])  # state centres, 20 ms apart
    values = np.array([[0.0], [1.0], [2.0]])
    out = audio._interpolate(values, times, np.array([0.0, 0.0225, 0.04, 1.0]))
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 1.375, 2.0])


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_write_mp4_bytes_do_not_depend_on_the_cpus_instruction_set(tmp_path):
    """The sample corpus's clips are DVC artifacts: their bytes must not change with the machine. libx264's
    macroblock-tree rate control does (its float kernels differ between AVX-512 and AVX2: these frames encode
    differently under the two with it on); write_mp4 turns it off, says so in the stream, and the same frames
    give the same bytes under every x264 kernel this CPU can run."""
    import inspect

    import cv2

    from preprocessing.media import MACHINE_INDEPENDENT_X264, VideoWriter, write_mp4

    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    moving = np.stack([np.roll(base, (t, t), axis=(0, 1)) for t in range(24)]).astype(int)
    frames = np.clip(moving + rng.integers(-8, 9, moving.shape), 0, 255).astype(np.uint8)

    def encode(name: str, x264_params: str) -> bytes:
        defaults = inspect.signature(write_mp4).parameters  # the same rate control as write_mp4's
        crf, preset = str(defaults["crf"].default), defaults["preset"].default
        options = {"crf": crf, "preset": preset, "x264-params": x264_params}
        writer = VideoWriter(tmp_path / name, 96, 96, FPS, codec_options=options)
        for rgb in frames:
            writer.write(rgb)
        writer.close(None)
        return (tmp_path / name).read_bytes()

    write_mp4(tmp_path / "default.mp4", frames, FPS)
    data = (tmp_path / "default.mp4").read_bytes()
    assert b"mbtree=0" in data  # x264 writes its settings into the stream's SEI
    flags = _cpu_flags()
    levels = [level for level, flag in (("SSSE3", "ssse3"), ("AVX2", "avx2"), ("AVX512", "avx512f")) if flag in flags]
    if not levels:
        pytest.skip("no /proc/cpuinfo x86 flags: x264's kernels cannot be chosen here")
    for level in levels:
        assert encode(f"{level}.mp4", f"{MACHINE_INDEPENDENT_X264['x264-params']}:asm={level}") == data, level
    if {"AVX2", "AVX512"} <= set(levels):  # the reason for the option, where this CPU can show it
        assert encode("mbtree_avx2.mp4", "mbtree=1:asm=AVX2") != encode("mbtree_avx512.mp4", "mbtree=1:asm=AVX512")
