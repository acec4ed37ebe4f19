"""Issue 24 (parts 1 and 4), `vasa generate` / `vasa verify`: every bad input is refused before any work with
a message naming the option or file (exit 2), the output never replaces an input, images and audio are decoded
safely (orientation, bit depth, pixel and length limits, non-finite samples), nothing non-finite is encoded or
signed, concurrent runs never share a temporary name, and the evaluate side-by-side video is labelled."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from tests.conftest import REPO
from vasa.cli import main
from vasa.core.errors import InputError
from vasa.core.files import unique_temp
from vasa.inference.portrait import MAX_PIXELS, prepare_portrait, read_portrait
from vasa.inference.speech import load_speech

RATE, FPS = 16000, 25
PORTRAIT = "img01_float_sam_altman_512x512.jpg"
SPEECH = "aud01_sadtalker_RD_Radio31_000.wav"


@pytest.fixture
def no_bundle(monkeypatch):
    """Loading a bundle fails the test: the refusal must come before it (and before any other model work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the bundle was loaded before the inputs were checked")

    monkeypatch.setattr("vasa.inference.bundle.load_bundle", refuse)


def _speech(path: Path, seconds: float = 1.0) -> Path:
    noise = np.random.default_rng(0).normal(0, 0.1, int(RATE * seconds)).astype(np.float32)
    soundfile.write(path, noise, RATE)
    return path


def _generate(tmp_path: Path, *options: str, out: Path | None = None, audio: Path | None = None) -> list[str]:
    image = tmp_path / "face.png"
    if not image.exists():
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    audio = audio or (
        tmp_path / "speech.wav" if (tmp_path / "speech.wav").exists() else _speech(tmp_path / "speech.wav")
    )
    out = out or tmp_path / "out.mp4"
    return ["--params", str(REPO / "params.yaml"), "generate", "--bundle", str(tmp_path / "bundle"),
            "--image", str(image), "--audio", str(audio), "--out", str(out), *options]  # fmt: skip


# --- the output never destroys an input ----------------------------------------------------------------


@pytest.mark.parametrize("option", ["--audio", "--driving-video", "--pose-from", "--dynamics-from"])
def test_out_naming_an_input_exits_2_and_leaves_it_unchanged(tmp_path, capsys, no_bundle, option):
    clip = tmp_path / "talk.mp4"
    clip.write_bytes(b"the user's only copy of this recording")
    stamp = clip.stat().st_mtime_ns
    argv = _generate(tmp_path, out=clip, audio=clip) if option == "--audio" else _generate(tmp_path, option, str(clip),
                                                                                          out=clip)  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    assert f"--out {clip}: is the {option} input" in capsys.readouterr().err
    assert clip.read_bytes() == b"the user's only copy of this recording" and clip.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file either


def test_out_naming_an_input_through_a_link_or_another_spelling(tmp_path, capsys, no_bundle):
    clip = tmp_path / "talk.mp4"
    clip.write_bytes(b"audio")
    link = tmp_path / "link.mp4"
    link.symlink_to(clip)
    for out in (link, tmp_path / "sub" / ".." / "talk.mp4"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(_generate(tmp_path, out=out, audio=clip)) == 2
        assert "is the --audio input" in capsys.readouterr().err
    assert clip.read_bytes() == b"audio"


def test_out_that_is_a_folder_or_not_writable_is_refused_first(tmp_path, capsys, no_bundle):
    folder = tmp_path / "video.mp4"
    folder.mkdir()
    assert main(_generate(tmp_path, out=folder)) == 2
    assert f"--out {folder}: is a folder" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert main(_generate(tmp_path, out=blocker / "x.mp4")) == 2
    assert f"cannot write in {blocker} (Not a directory)" in capsys.readouterr().err
    # A folder still to be made is checked where it would be made, and not made for a refused run.
    assert main(_generate(tmp_path, "--cfg-audio", "1e9", out=tmp_path / "new" / "deeper" / "x.mp4")) == 2
    assert not (tmp_path / "new").exists()


def _others_can_read(path: Path) -> bool:
    """Whether a user other than the owner can reach `path` (o+x on it and every folder above it)."""
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root writes anywhere")
@pytest.mark.skipif(
    os.geteuid() == 0 and not _others_can_read(REPO),
    reason=f"{REPO} sits in a folder other users cannot enter (mktemp -d: 0700): the CLI cannot run as `nobody`",
)
def test_read_only_output_folder_is_refused_before_work():
    """As a user who may not write there (root writes anywhere, so the CLI runs as `nobody` when this is root)."""
    shared = Path(tempfile.mkdtemp(prefix="vasa-ro-"))
    try:
        shared.chmod(0o755)
        _speech(shared / "speech.wav")
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(shared / "face.png")
        locked = shared / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        argv = ["--params", str(REPO / "params.yaml"), "generate", "--bundle", str(shared / "nowhere"),
                "--image", str(shared / "face.png"), "--audio", str(shared / "speech.wav"),
                "--out", str(locked / "out.mp4")]  # fmt: skip
        prefix = []
        if os.geteuid() == 0:
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        env = os.environ | {"PYTHONPATH": str(REPO), "HOME": str(shared), "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        result = subprocess.run([*prefix, sys.executable, "-m", "vasa.cli", *argv], capture_output=True, text=True,
                                cwd=shared, env=env, timeout=120)  # fmt: skip
        elapsed = time.perf_counter() - start
        assert result.returncode == 2, result.stderr
        assert f"--out {locked / 'out.mp4'}: cannot write in {locked} (Permission denied)" in result.stderr
        assert "Traceback" not in result.stderr and list(locked.iterdir()) == []
        assert elapsed < 30  # refused before the bundle (which does not even exist here) or any work
    finally:
        (shared / "locked").chmod(0o755)
        for path in sorted(shared.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        shared.rmdir()


# --- numeric options: finite, in range, checked before the bundle is loaded ----------------------------


def test_cfg_audio_nan_exits_2_within_seconds_in_a_fresh_process(tmp_path):
    argv = _generate(tmp_path, "--cfg-audio", "nan")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vasa.cli", *argv], capture_output=True, text=True, timeout=60,
                            env=os.environ | {"PYTHONPATH": str(REPO)})  # fmt: skip
    elapsed = time.perf_counter() - start
    assert result.returncode == 2 and "argument --cfg-audio: expected a finite number, got 'nan'" in result.stderr
    assert elapsed < 3.0, f"{elapsed:.1f} s"
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cfg-audio", "nan"], "argument --cfg-audio: expected a finite number"),
        (["--cfg-gaze", "inf"], "argument --cfg-gaze: expected a finite number"),
        (["--gaze", "nan,inf"], "argument --gaze: expected THETA,PHI in finite degrees"),
        (["--distance", "nan"], "argument --distance: expected a finite number"),
        (["--emotion", "0.1,-inf"], "argument --emotion: expected comma-separated finite numbers"),
    ],
)
def test_non_finite_options_are_refused_while_parsing(tmp_path, capsys, no_bundle, options, message):
    with pytest.raises(SystemExit) as exit_:
        main(_generate(tmp_path, *options))
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cfg-audio", "1e9"], "--cfg-audio must be finite and within [0, 10], got 1000000000.0"),
        (["--cfg-audio", "-0.5"], "--cfg-audio must be finite and within [0, 10]"),
        (["--cfg-gaze", "11"], "--cfg-gaze must be finite and within [0, 10]"),
        (["--gaze", "1e6,-1e6"], "--gaze must be finite and within [-90, 90], got 1e+06,-1e+06"),
        (["--distance", "1e30"], "--distance must be finite and within [0, 7], got 1e+30"),
        (["--emotion", "0.1,0.2,0.3"], "--emotion takes 2 values (smile,brow_raise), got 3"),
        (["--emotion", "5,0"], "--emotion must be finite and within [-1, 1]"),
        (["--steps", "0"], "--steps must be finite and within [1, inf], got 0"),
        (["--steps", "-1"], "--steps must be finite and within [1, inf], got -1"),
        (["--seed", str(2**70)], f"--seed must be finite and within [0, {2**63 - 1}], got {2**70}"),
        (["--seed", "-1"], "--seed must be finite and within [0, "),
    ],
)
def test_out_of_range_options_exit_2_before_the_bundle(tmp_path, capsys, no_bundle, options, message):
    import vasa.inference.generate  # noqa: F401  warm imports: the time measured is the check's

    start = time.perf_counter()
    assert main(_generate(tmp_path, *options)) == 2
    assert time.perf_counter() - start < 3.0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.mp4").exists()


def test_steps_beyond_the_bundles_noise_levels_exit_2_before_any_work(tiny_bundle, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the portrait was read before the options were checked")

    monkeypatch.setattr("vasa.inference.generate.prepare_portrait", no_work)
    for steps in ("1001", "100000"):
        argv = _generate(tmp_path, "--steps", steps)
        argv[argv.index("--bundle") + 1] = str(tiny_bundle)
        assert main(argv) == 2
        assert f"steps must be finite and within [1, 1000], got {steps}" in capsys.readouterr().err


# --- images: orientation, modes, pixel limit ------------------------------------------------------------


def _pattern(height: int = 60, width: int = 40) -> np.ndarray:
    """An image whose every right-angle rotation and mirror differs: a gradient and a block in one corner."""
    y, x = np.mgrid[:height, :width]
    image = np.stack([y * 255 // height, x * 255 // width, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    image[:10, :6] = 255
    return image


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_6_is_applied(tmp_path, suffix):
    """A phone stores the sensor's pixels sideways and says "rotate 90° clockwise to view" (orientation 6)."""
    upright = _pattern()
    stored = np.rot90(upright, 1)  # what the sensor wrote: the upright picture turned 90° anticlockwise
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / f"phone{suffix}"
    image.save(path, exif=exif, quality=98)
    got = read_portrait(path, 1024)
    assert got.shape == upright.shape  # 60 high, 40 wide: upright, not the stored 40 x 60
    tolerance = 0 if suffix == ".png" else 12  # JPEG's loss
    assert np.abs(got.astype(int) - upright).mean() <= tolerance / 4 and got[:10, :6].min() >= 255 - tolerance


def test_a_sideways_phone_portrait_gives_an_upright_face(params, fixtures_dir, tmp_path):
    upright = np.asarray(Image.open(fixtures_dir / PORTRAIT).convert("RGB"))
    image = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    face = params.preprocess.face
    sideways = prepare_portrait(tmp_path / "phone.jpg", 64, params.preprocess.crop_size, face, 512)
    reference = prepare_portrait(tmp_path / "upright.jpg", 64, params.preprocess.crop_size, face, 512)
    assert sideways.faces == 1 and sideways.frame.shape == upright.shape
    assert np.abs(sideways.crop.astype(int) - reference.crop).mean() < 3  # the same upright face crop


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")  # really 16-bit on disk
    got = read_portrait(path, 1024)
    expected = np.round(ramp / 257).astype(np.uint8)
    assert got.shape == (48, 64, 3) and (got == expected[..., None]).all()  # not white: 0..255 like the source


def test_sixteen_bit_grey_portrait_still_has_its_face(params, fixtures_dir, tmp_path):
    grey = np.asarray(Image.open(fixtures_dir / PORTRAIT).convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    portrait = prepare_portrait(tmp_path / "grey16.png", 64, params.preprocess.crop_size, params.preprocess.face, 512)
    assert portrait.faces == 1


def test_other_modes_become_rgb(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[:10, :, 3] = 200, 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    got = read_portrait(tmp_path / "alpha.png", 1024)
    assert (got[:10] == [200, 0, 0]).all() and (got[10:] == 255).all()  # transparency over white
    floats = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    Image.fromarray(floats, "F").save(tmp_path / "float.tif")
    got = read_portrait(tmp_path / "float.tif", 1024)
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255
    Image.fromarray(np.eye(20, dtype=bool)).save(tmp_path / "bits.png")
    assert read_portrait(tmp_path / "bits.png", 1024).shape == (20, 20, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 8-bit grey pixels but holds one row: tens of bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height"), [(60000, 60000), (12000, 9000)])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, width, height):
    """60000² is over Pillow's own limit (its error, caught); 12000 x 9000 only over ours (Pillow would warn)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    assert path.stat().st_size < 100
    assert width * height > MAX_PIXELS
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"over the portrait limit of 100,000,000"):
        read_portrait(path, 1024)
    assert time.perf_counter() - start < 1.0  # nothing decoded


def test_decompression_bomb_via_the_cli(tmp_path, capsys, monkeypatch):
    """Through `vasa generate` (the bundle loaded as a stub: only the portrait is under test)."""
    from types import SimpleNamespace

    stub = SimpleNamespace(meta={"audio": {"sample_rate": RATE}, "fps": FPS, "crop": {"crop_size": 128},
                                 "sampling": {"train_steps": 1000}},
                           dit=SimpleNamespace(emotion_dim=2), resolution=64)  # fmt: skip
    monkeypatch.setattr("vasa.inference.bundle.load_bundle", lambda *a, **k: stub)
    argv = _generate(tmp_path)
    image = Path(argv[argv.index("--image") + 1])
    image.write_bytes(_png_header_only(60000, 60000))
    assert main(argv) == 2
    assert f"{image}: over the portrait limit" in capsys.readouterr().err


# --- audio: streamed, limited while reading, finite ------------------------------------------------------


def _long_wav(path: Path, seconds: int) -> Path:
    """A PCM-16 mono WAV of `seconds` of silence, written sparse: 4 h is 460 MB on paper and nothing on disk."""
    size = seconds * RATE * 2
    header = (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, RATE,
              RATE * 2, 2, 16) + b"data" + struct.pack("<I", size))  # fmt: skip
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + size)
    return path


def test_four_hours_of_audio_are_refused_at_the_limit_with_bounded_memory(params, tmp_path):
    path = _long_wav(tmp_path / "four_hours.wav", 4 * 3600)
    cfg = params.generate.model_copy(update={"max_audio_seconds": 600.0})
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError, match=r"more than 600 s of audio \(generate.max_audio_seconds\)"):
            load_speech(path, RATE, FPS, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    limit_bytes = 600 * RATE * 4  # float32 samples up to the limit: 38 MB
    whole_bytes = 4 * 3600 * RATE * 4  # what decoding it all would hold: 922 MB
    assert peak < 1.5 * limit_bytes < whole_bytes / 10, f"peak {peak / 1e6:.0f} MB"
    assert elapsed < 60, f"{elapsed:.1f} s: the decode went on past the limit"


def test_streamed_speech_equals_the_preprocessing_decoder(params, fixtures_dir):
    """The same samples as preprocessing.decode.read_audio (so the demo's videos keep their bytes)."""
    from preprocessing.decode import read_audio

    for name in (SPEECH, "vid01_sadtalker_WDA_KatieHill_000.mp4"):
        expected = read_audio(fixtures_dir / name, RATE)
        np.testing.assert_array_equal(load_speech(fixtures_dir / name, RATE, FPS, params.generate), expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rate", [RATE, 44100])
def test_non_finite_audio_is_refused(params, tmp_path, bad, rate):
    audio = np.random.default_rng(0).normal(0, 0.1, rate).astype(np.float32)
    audio[rate // 2] = bad
    path = tmp_path / "float.wav"
    soundfile.write(path, audio, rate, subtype="FLOAT")
    with pytest.raises(InputError, match="NaN or infinite samples"):
        load_speech(path, RATE, FPS, params.generate)


def test_non_finite_wav_via_the_cli(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    stub = SimpleNamespace(meta={"audio": {"sample_rate": RATE}, "fps": FPS, "crop": {"crop_size": 128},
                                 "sampling": {"train_steps": 1000}},
                           dit=SimpleNamespace(emotion_dim=2), resolution=64)  # fmt: skip
    monkeypatch.setattr("vasa.inference.bundle.load_bundle", lambda *a, **k: stub)
    monkeypatch.setattr("vasa.inference.generate.prepare_portrait", lambda *a, **k: None)
    audio = np.full(RATE, np.nan, np.float32)
    soundfile.write(tmp_path / "nan.wav", audio, RATE, subtype="FLOAT")
    assert main(_generate(tmp_path, audio=tmp_path / "nan.wav")) == 2
    assert "nan.wav: the audio holds NaN or infinite samples" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


# --- verify ----------------------------------------------------------------------------------------------


def test_verify_on_a_wav_says_it_is_not_a_video(tmp_path, capsys):
    wav = _speech(tmp_path / "speech.wav")
    assert main(["--params", str(REPO / "params.yaml"), "verify", str(wav)]) == 2
    err = capsys.readouterr().err
    assert f"vasa verify: {wav}: not a video (audio streams only)" in err and "Traceback" not in err
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    assert main(["--params", str(REPO / "params.yaml"), "verify", str(text)]) == 2
    assert "not a readable video" in capsys.readouterr().err


# --- what is written: unique temporary names, labels, nothing non-finite --------------------------------

BUNDLE_SHA = "ab" * 32


def _frames(count: int = 50, side: int = 128) -> np.ndarray:
    t = np.arange(count)[:, None, None]
    y, x = np.mgrid[:side, :side]
    grey = 128 + 60 * np.sin(x / 9.0 + t / 5.0) * np.cos(y / 13.0)
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)


def test_concurrent_runs_to_one_output_use_distinct_temporary_names(params, tmp_path, monkeypatch):
    from vasa.inference import generate

    used: list[Path] = []

    def recording(path: Path, suffix: str) -> Path:
        used.append(unique_temp(path, suffix))
        return used[-1]

    monkeypatch.setattr(generate, "unique_temp", recording)
    out = tmp_path / "same.mp4"
    audio = np.random.default_rng(0).normal(0, 0.1, 2 * RATE).astype(np.float32)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate.write_labelled(out, [_frames()], audio, RATE, FPS, params.generate, BUNDLE_SHA)
        except BaseException as err:  # noqa: BLE001  reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(used) == 2 and used[0] != used[1] and all(p.name.startswith(".same.mp4.") for p in used)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.mp4"]  # no temporary file left behind


def test_evaluate_side_by_side_video_is_labelled(params, tmp_path):
    from vasa.labelling.verify import verify_file
    from vasa.stages.evaluate import side_by_side

    audio = np.random.default_rng(1).normal(0, 0.1, 2 * RATE).astype(np.float32)
    wav = io.BytesIO()
    soundfile.write(wav, audio, RATE, format="WAV")
    side_by_side(tmp_path, _frames(), _frames()[::-1], wav.getvalue(), FPS, BUNDLE_SHA, params.generate)
    report = verify_file(tmp_path / "side_by_side.mp4")
    assert report["labelled"] and report["container"]["ai_generated"]
    assert report["c2pa"]["valid"] and report["c2pa"]["ai_generated"]
    assert report["container"]["bundle_sha256"] == BUNDLE_SHA == report["c2pa"]["bundle_sha256"]
    assert report["watermark"]["detected"] and report["watermark"]["payload"] == BUNDLE_SHA[:16]
    assert (tmp_path / "side_by_side.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side_by_side.mp4", "side_by_side.png"]


@pytest.mark.parametrize("part", ["dit", "face"])
def test_non_finite_motion_or_pixels_are_never_encoded_or_signed(tiny_bundle, params, fixtures_dir, tmp_path, part):
    """A bundle whose weights hold NaN (made here in memory, after loading): refused, and no file written."""
    from vasa.inference.bundle import load_bundle
    from vasa.inference.generate import NonFiniteError, generate_file

    bundle = load_bundle(tiny_bundle)
    network = bundle.dit if part == "dit" else bundle.face.decoder
    with torch.no_grad():
        next(p for p in network.parameters() if p.ndim > 1).fill_(float("nan"))
    cfg = params.generate.model_copy(update={"steps": 2})
    out = tmp_path / "out.mp4"
    message = "non-finite motion" if part == "dit" else "non-finite pixels"
    with pytest.raises(NonFiniteError, match=message):
        generate_file(bundle, fixtures_dir / PORTRAIT, _speech(tmp_path / "s.wav"), out, cfg, params.preprocess.face)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.wav"]
