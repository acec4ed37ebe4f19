"""Export and generate (vasa/stages/export.py, vasa/inference/, vasa/labelling/): a bundle of freshly initialised
`tiny` networks animates real portraits with real speech; streaming equals offline; bad inputs fail clearly
and leave nothing behind. The trained path runs in tests/test_dvc_pipeline.py (stages export and demo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from preprocessing import face as face_mod
from preprocessing.audio import log_mel
from preprocessing.decode import read_frames
from vasa.cli import main as cli_main
from vasa.core.errors import InputError
from vasa.inference.bundle import bundle_meta, load_bundle, write_bundle
from vasa.inference.generate import (
    AudioFeatures,
    chunks,
    conditions_for,
    generate_file,
    open_session,
    prepare_portrait,
    smooth_motion,
    stream,
)
from vasa.labelling.verify import verify_file
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_dit import MotionDiT
from vasa.models.motion_encoder import POSE_DIM
from vasa.models.presets import get_motion_preset, get_preset
from vasa.stages.demo import reencode

PORTRAIT = "img01_float_sam_altman_512x512.jpg"
SPEECH = "aud01_sadtalker_RD_Radio31_000.wav"
RATE, FPS, MELS, K = 16000, 25, 80, 4


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, params) -> Path:
    """A bundle of untrained tiny networks (seeded), with the sample corpus's audio settings."""
    torch.manual_seed(0)
    face = FaceLatent(get_preset("tiny"), n_speakers=2)
    motion_dim = 7 + face.preset.dynamics_dim
    task = {
        "preset": get_motion_preset("tiny").describe(),
        "motion_dim": motion_dim, "audio_dim": K * MELS, "emotion_dim": 2, "window": 25, "context": 5,
        "diffusion": params.train_motion.diffusion.model_dump(), "guidance": params.train_motion.guidance.model_dump(),
    }  # fmt: skip
    dit = MotionDiT(get_motion_preset("tiny"), motion_dim, K * MELS, 2, 25, 5)
    torch.nn.init.normal_(dit.out.weight, std=0.02)  # zero-initialised head: make the motion move
    normalisation = {
        "motion": {"mean": [0.0] * motion_dim, "std": [0.3] * 3 + [0.02] * 4 + [0.5] * (motion_dim - 7)},
        "audio": {"mean": [-8.0] * (K * MELS), "std": [3.0] * (K * MELS)},
    }
    folder = tmp_path_factory.mktemp("bundle")
    write_bundle(folder, face, dit, bundle_meta(params, face, 2, task, normalisation, {"test": True}))
    return folder


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


def speech_clip(fixtures_dir: Path, tmp_path: Path, seconds: float, name: str = SPEECH) -> Path:
    audio, rate = soundfile.read(fixtures_dir / name, dtype="float32", always_2d=True)
    path = tmp_path / f"speech_{seconds:g}.wav"
    soundfile.write(path, audio[: int(seconds * rate), 0], rate)
    return path


# --- fast: no fixtures needed -------------------------------------------------------------------------


def test_streaming_audio_features_equal_offline_log_mel(params):
    rng = np.random.default_rng(0)
    audio = (rng.normal(size=RATE * 3 + 1234) * 0.1).astype(np.float32)
    offline = log_mel(audio, RATE, FPS, params.preprocess.audio).reshape(-1, K * MELS)
    stats = {"mean": [1.0] * (K * MELS), "std": [2.0] * (K * MELS)}
    for size in (100, 640, 1000, 7777, len(audio)):
        features = AudioFeatures(RATE, FPS, params.preprocess.audio, stats)
        parts = [features.push(c) for c in chunks(audio, size)] + [features.finish()]
        got = np.concatenate(parts)
        assert got.shape == offline.shape == (len(audio) // (RATE // FPS), K * MELS)
        expected = (offline - np.float32(1.0)) / np.float32(2.0)
        np.testing.assert_array_equal(got, expected)  # exactly the offline features, normalised
        assert len(features.buffer) <= 3 * (RATE // FPS) + size  # a few frames of history, not the whole clip
    # Frame t is out as soon as its last mel window (centred 480 samples into it, 200 samples each side) is in:
    # 40 samples (2.5 ms) after the frame's own end, and still exactly the offline features.
    features = AudioFeatures(RATE, FPS, params.preprocess.audio, stats)
    assert features.lookahead == 40
    got, arrived = [], 0
    for piece in chunks(audio[: 3 * RATE // FPS + 100], 20):
        got.append(features.push(piece))
        arrived += len(piece)
        assert features.done == max((arrived - 40) // (RATE // FPS), 0)
    np.testing.assert_array_equal(np.concatenate(got), (offline[: features.done] - np.float32(1.0)) / np.float32(2.0))


def test_bundle_loads_without_pickle_and_refuses_tampering(bundle_dir, tmp_path):
    loaded = load_bundle(bundle_dir)
    assert loaded.meta["format"] == "vasa-bundle" and len(loaded.sha256) == 64
    assert {p.suffix for p in bundle_dir.iterdir()} == {".safetensors", ".json"}
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    weights = broken / "motion_dit.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        load_bundle(broken)
    with pytest.raises(InputError, match="no bundle"):
        load_bundle(tmp_path / "nowhere")


def test_bad_inputs_fail_clearly_and_leave_nothing(bundle, params, tmp_path):
    out = tmp_path / "out.mp4"
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(gray)
    noise = np.random.default_rng(0).normal(0, 0.1, RATE * 2).astype(np.float32)
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, noise, RATE)
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(RATE * 2, np.float32), RATE)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    not_image = tmp_path / "photo.jpg"
    not_image.write_text("not an image")
    face_cfg = params.preprocess.face
    cases = [
        (gray, speech, out, params.generate, "no face"),
        (not_image, speech, out, params.generate, "not a readable image"),
        (tmp_path / "missing.png", speech, out, params.generate, "not found"),
        (gray, tmp_path / "missing.wav", out, params.generate, "not found"),
        (gray, tmp_path / "notes.txt", tmp_path / "out.avi", params.generate, "must be an .mp4"),
    ]
    for image, audio, target, cfg, message in cases:
        with pytest.raises(InputError, match=message):
            generate_file(bundle, image, audio, target, cfg, face_cfg)
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))
    # CLI: exit status 2 and the message, for a bad bundle path.
    assert cli_main(["generate", "--bundle", str(tmp_path), "--image", str(gray), "--audio", str(speech),
                     "--out", str(out)]) == 2  # fmt: skip


# --- real portraits and speech (fixtures) -------------------------------------------------------------


def test_audio_errors_are_clear(bundle, params, fixtures_dir, tmp_path):
    portrait = fixtures_dir / PORTRAIT
    out = tmp_path / "out.mp4"
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(RATE * 2, np.float32), RATE)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    short_limit = params.generate.model_copy(update={"max_audio_seconds": 1.0})
    for audio, cfg, message in (
        (silent, params.generate, "silent"),
        (not_audio, params.generate, "unreadable audio"),
        (speech_clip(fixtures_dir, tmp_path, 2.0), short_limit, "max_audio_seconds"),
    ):
        with pytest.raises(InputError, match=message):
            generate_file(bundle, portrait, audio, out, cfg, params.preprocess.face)
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*.mp4"))


def test_stream_chunks_equal_one_shot_and_start_after_one_window(bundle, params, fixtures_dir, tmp_path):
    portrait = prepare_portrait(fixtures_dir / PORTRAIT, bundle.resolution, params.preprocess.crop_size,
                                params.preprocess.face, 512)  # fmt: skip
    session = open_session(bundle, portrait)
    conditions = conditions_for(portrait, bundle, params.generate, steps=4)
    audio, _ = soundfile.read(speech_clip(fixtures_dir, tmp_path, 2.3), dtype="float32")
    whole = np.concatenate(list(stream(session, [audio], conditions, crop_only=True)))
    pulled = []

    def microphone():  # 100 ms chunks, as a microphone delivers them; records how much audio was read
        for piece in chunks(audio, RATE // 10):
            pulled.append(len(piece))
            yield piece

    frames = stream(session, microphone(), conditions, crop_only=True)
    first = next(frames)
    # The first window is out after one window of audio plus the STFT's look-ahead (40 samples), not the whole clip.
    assert len(first) == bundle.dit.window and sum(pulled) <= bundle.dit.window * RATE // FPS + 40 + RATE // 10
    produced = [first, *frames]
    streamed = np.concatenate(produced)
    assert len(whole) == len(streamed) == int(2.3 * FPS)
    np.testing.assert_array_equal(streamed, whole)


@pytest.fixture
def one_thread():
    """One intra-op thread (as tests/test_motion_dit.py): the low-latency stream's many small calls otherwise
    wait on OpenMP workers spinning against the other jobs of a shared 2-core machine (3-4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_low_latency_stream_starts_after_its_lookahead_frame_by_frame(bundle, params, fixtures_dir, tmp_path,
                                                                      one_thread):  # fmt: skip
    """generate.stream_hop / stream_lookahead / stream_overlap (vasa serve): the first frame after (hop +
    lookahead) frames of audio plus the STFT's 2.5 ms, one frame per chunk, as many frames as offline, whatever
    the chunking; hop = W is the offline stream byte for byte."""
    portrait = prepare_portrait(  # small frames: four streams are drawn
        fixtures_dir / PORTRAIT, bundle.resolution, params.preprocess.crop_size, params.preprocess.face, 160
    )
    session = open_session(bundle, portrait)
    conditions = conditions_for(portrait, bundle, params.generate, steps=2)
    audio, _ = soundfile.read(speech_clip(fixtures_dir, tmp_path, 1.3), dtype="float32")
    hop, lookahead = params.generate.stream_hop, params.generate.stream_lookahead
    assert hop + lookahead <= 5  # the stated look-ahead: <= 200 ms of audio before the first frame
    low = {"hop": hop, "lookahead": lookahead, "overlap": params.generate.stream_overlap}
    offline = list(stream(session, chunks(audio, RATE), conditions, crop_only=True))
    pulled = []

    def microphone():  # 20 ms chunks
        for piece in chunks(audio, RATE // 50):
            pulled.append(len(piece))
            yield piece

    frames = stream(session, microphone(), conditions, crop_only=True, **low)
    first = next(frames)
    assert len(first) == 1 and sum(pulled) == -(-((hop + lookahead) * RATE // FPS + 40) // (RATE // 50)) * RATE // 50
    streamed = [first, *frames]
    assert all(len(chunk) == 1 for chunk in streamed)
    assert len(streamed) == sum(map(len, offline)) == int(1.3 * FPS)
    whole = np.concatenate(list(stream(session, [audio], conditions, crop_only=True, **low)))
    np.testing.assert_array_equal(np.concatenate(streamed), whole)
    again = stream(
        session, chunks(audio, RATE // 50), conditions, crop_only=True, hop=bundle.dit.window, lookahead=2, overlap=5
    )  # whole windows: no look-ahead, no overlap
    np.testing.assert_array_equal(np.concatenate(list(again)), np.concatenate(offline))


@pytest.mark.slow
def test_generate_labels_the_video_and_survives_a_reencode(bundle_dir, params, fixtures_dir, tmp_path, caplog):
    audio = speech_clip(fixtures_dir, tmp_path, 3.0)
    out = tmp_path / "talking.mp4"
    argv = ["generate", "--bundle", str(bundle_dir), "--image", str(fixtures_dir / PORTRAIT), "--audio", str(audio),
            "--out", str(out), "--steps", "4", "--gaze", "5,-3"]  # fmt: skip
    assert cli_main(argv) == 0
    frames, _ = read_frames(out)
    assert len(frames) == 3 * FPS and frames.shape[1:] == (512, 512, 3)
    track = face_mod.get_tracker(params.preprocess.face).track(frames)
    assert (track.faces == 1).all()
    digest = load_bundle(bundle_dir).sha256
    report = verify_file(out)
    assert report["labelled"] and report["consistent"]
    assert report["container"]["bundle_sha256"] == digest == report["c2pa"]["bundle_sha256"]
    assert report["c2pa"]["valid"] and report["c2pa"]["ai_generated"] and not report["c2pa"]["trusted"]
    assert report["watermark"]["payload"] == digest[:16]
    copy = tmp_path / "reencoded.mp4"
    reencode(out, copy, 23, 25)
    again = verify_file(copy)
    assert not again["c2pa"]["present"] and again["watermark"]["payload"] == digest[:16]
    assert cli_main(["verify", str(copy)]) == 0
    # An unlabelled real video: nothing says AI-generated.
    assert cli_main(["verify", str(fixtures_dir / "vid01_sadtalker_WDA_KatieHill_000.mp4")]) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("portrait", "speech"),
    [
        ("img01_float_sam_altman_512x512.jpg", "aud02_hallo_driving1.wav"),
        ("img02_sadtalker_people_0.png", "aud01_sadtalker_RD_Radio31_000.wav"),
        ("img03_hallo_ref6.jpg", "aud02_hallo_driving1.wav"),
    ],
)
def test_every_fixture_portrait_and_speech(bundle, params, fixtures_dir, tmp_path, portrait, speech):
    """Every portrait and every speech file of the fixtures, whole: right length, one face in every frame."""
    out = tmp_path / "out.mp4"
    cfg = params.generate.model_copy(update={"steps": 4, "max_side": 512})  # img03 is 1024² (encode time)
    result = generate_file(bundle, fixtures_dir / portrait, fixtures_dir / speech, out, cfg, params.preprocess.face)
    frames, _ = read_frames(out)
    assert len(frames) == result.frames == int(result.seconds * FPS)
    track = face_mod.get_tracker(params.preprocess.face).track(frames[::5])  # every 5th frame: FaceMesh is slow
    assert (track.faces == 1).all()
    assert json.loads(json.dumps(result.timings))["total_s"] > 0


@pytest.mark.slow
def test_reenactment_takes_pose_and_dynamics_from_a_driving_video(bundle, params, fixtures_dir, tmp_path):
    portrait = fixtures_dir / PORTRAIT
    audio = speech_clip(fixtures_dir, tmp_path, 2.0)
    driving = tmp_path / "driving.mp4"
    frames = read_frames(fixtures_dir / "vid01_sadtalker_WDA_KatieHill_000.mp4")[0][:50]
    from preprocessing.media import write_mp4

    write_mp4(driving, frames, fps=FPS, crf=18, preset="ultrafast")
    cfg = params.generate.model_copy(update={"steps": 4})
    outs = {}
    for name, extra in (("driven", {"driving_video": driving}), ("generated", {}), ("pose", {"pose_from": driving})):
        outs[name] = tmp_path / f"{name}.mp4"
        generate_file(bundle, portrait, audio, outs[name], cfg, params.preprocess.face, crop_only=True, **extra)
    driven, generated, posed = (read_frames(outs[n])[0].astype(np.float32) for n in ("driven", "generated", "pose"))
    # Crops come at the portrait face's own side (>= the shards' crop size), not the model's 64²
    assert driven.shape == generated.shape == posed.shape and driven.shape[:2] == (50, driven.shape[2])
    assert driven.shape[1] >= params.preprocess.crop_size
    assert np.abs(driven - generated).mean() > 1.0  # the driving video's motion, not the DiT's
    assert np.abs(posed - generated).mean() > 1.0 and np.abs(posed - driven).mean() > 0.0
    with pytest.raises(InputError, match="driving video"):
        generate_file(bundle, portrait, audio, tmp_path / "x.mp4", cfg, params.preprocess.face,
                      driving_video=tmp_path / "missing.mp4")  # fmt: skip


def test_several_faces_pick_the_largest_and_say_so(params, fixtures_dir, tmp_path, caplog):
    big = np.asarray(Image.open(fixtures_dir / PORTRAIT).convert("RGB").resize((384, 384)))
    small = np.asarray(Image.open(fixtures_dir / PORTRAIT).convert("RGB").resize((192, 192)))
    canvas = np.full((384, 640, 3), 200, np.uint8)
    canvas[:, :384], canvas[96:288, 432:624] = big, small
    path = tmp_path / "two.png"
    Image.fromarray(canvas).save(path)
    with caplog.at_level("WARNING", logger="vasa.inference.generate"):
        portrait = prepare_portrait(path, 64, params.preprocess.crop_size, params.preprocess.face, 1024)
    assert portrait.faces == 2 and "2 faces found; animating the largest" in caplog.text
    x0 = -portrait.transform[0, 2] / portrait.transform[0, 0]  # crop box left edge, portrait pixels
    assert x0 < 384 / 2  # the box sits on the big face on the left, not the small one on the right


def _encode_audio(path: Path, audio: np.ndarray, rate: int, codec: str) -> None:
    """Write mono float audio with PyAV in the container named by `path`'s suffix."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(audio[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
        for chunk in resampler.resample(frame):
            container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))


FORMATS = [("mp3", "libmp3lame", 44100), ("m4a", "aac", 48000), ("flac", "flac", 22050), ("ogg", "libopus", 48000)]


@pytest.mark.parametrize(("suffix", "codec", "rate"), FORMATS)
def test_common_audio_formats_and_rates_load_as_speech(params, tmp_path, suffix, codec, rate):
    from vasa.inference.generate import load_speech

    t = np.arange(int(2.0 * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    path = tmp_path / f"speech.{suffix}"
    _encode_audio(path, tone, rate, codec)
    speech = load_speech(path, RATE, 25, params.generate)
    assert abs(len(speech) / RATE - 2.0) < 0.1  # resampled to 16 kHz, codec padding aside
    assert 0.1 < np.sqrt(np.mean(speech**2)) < 0.3


def test_smooth_motion_removes_flicker_keeps_motion_and_joins_windows():
    """Pose columns low-passed, dynamics untouched at sigma 0; a 2 Hz nod survives, an every-other-frame flicker
    does not; windows smoothed one after another with the previous window as halo equal the whole sequence
    smoothed at once, except the last 4 sigma frames of each window (which cannot see the next window)."""
    t = np.arange(100) / 25.0
    nod = np.sin(2 * np.pi * 2.0 * t)
    flicker = np.where(np.arange(100) % 2 == 0, 1.0, -1.0)
    units = torch.zeros(100, POSE_DIM + 4, dtype=torch.float64)
    units[:, 0] = torch.from_numpy(nod + flicker)
    units[:, POSE_DIM] = torch.from_numpy(flicker)
    assert smooth_motion(units, None, 0.0, 0.0) is units
    whole = smooth_motion(units, None, 1.0, 0.0)
    torch.testing.assert_close(whole[:, POSE_DIM:], units[:, POSE_DIM:])
    inner = slice(10, 90)
    left = whole[inner, 0].numpy() - nod[inner]
    assert np.abs(left).max() < 0.15  # flicker gone (0.7 % of it), nod kept to 88 %
    assert np.corrcoef(whole[inner, 0].numpy(), nod[inner])[0, 1] > 0.99
    parts, previous = [], None
    for start in range(0, 100, 25):
        raw = units[start : start + 25]
        parts.append(smooth_motion(raw, previous, 1.0, 0.0))
        previous = raw
    joined = torch.cat(parts)
    exact = np.ones(100, bool)
    for end in (25, 50, 75):
        exact[end - 4 : end] = False
    torch.testing.assert_close(joined[exact], whole[exact])


def test_generated_expression_is_relative_to_the_portrait_at_rest():
    """A bundle whose stage 2 learned the expression relative to a face at rest gets the portrait's own measure
    added on those dims only; a bundle without `expression_rest` keeps the motion as generated."""
    from types import SimpleNamespace

    from vasa.inference.generate import at_rest_of

    own = torch.arange(POSE_DIM + 10, dtype=torch.float32)[None] + 100
    session = SimpleNamespace(own_motion=own)
    units = torch.zeros(5, POSE_DIM + 10)
    dims = list(range(POSE_DIM, POSE_DIM + 6))
    out = at_rest_of(session, units, {"expression_rest": {"motion_dims": dims, "percentiles": [5.0] + [50.0] * 5}})
    torch.testing.assert_close(out[:, dims], own[:, dims].expand(5, -1))
    others = [i for i in range(POSE_DIM + 10) if i not in dims]
    assert not out[:, others].any() and not units.any()  # the input is left as it was
    assert at_rest_of(session, units, {"expression_rest": None}) is units
    assert at_rest_of(session, units, {}) is units
    # A measured-pose bundle: the head pose relative to the clip's median, the portrait's own pose added too.
    pose = {"motion_dims": list(range(POSE_DIM)), "percentiles": [50.0] * POSE_DIM}
    both = at_rest_of(session, units, {"expression_rest": {"motion_dims": dims, "percentiles": [5.0] + [50.0] * 5},
                                       "pose_rest": pose})  # fmt: skip
    torch.testing.assert_close(both[:, : POSE_DIM + 6], own[:, : POSE_DIM + 6].expand(5, -1))
    assert not both[:, POSE_DIM + 6 :].any()
    torch.testing.assert_close(
        at_rest_of(session, units, {"pose_rest": pose})[:, :POSE_DIM], own[:, :POSE_DIM].expand(5, -1)
    )
