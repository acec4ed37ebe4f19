"""Issue 22 (parts 2, 4, 5), `vasa generate` in real time: everything after the renderer is pipelined beside it
with the same output bytes and cheaper arithmetic (uint8 paste-back, OpenCV's colour conversion), the H.264
encoder is chosen (libx264 or NVENC), the device is resolved (cuda, mps, cpu) and the user's audio keeps its own
rate and channels in the video while the model hears its 16 kHz mono copy."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import soundfile
import torch

from tests.conftest import REPO
from vasa.cli import main
from vasa.core.errors import InputError
from vasa.inference.generate import generate_file, limit_threads, resolve_device
from vasa.inference.portrait import Paster, Portrait
from vasa.inference.postprocess import (
    BoxComposer,
    VideoCodec,
    choose_codec,
    mark_frames,
    nvenc_available,
    run_stages,
    write_video,
)
from vasa.inference.speech import ArrayTrack, audio_track, load_speech
from vasa.labelling.watermark import Watermarker
from vasa.models.motion_encoder import EXPRESSION_DIMS

FPS = 25
PORTRAIT = "img01_float_sam_altman_512x512.jpg"
SPEECH = "aud01_sadtalker_RD_Radio31_000.wav"
TAGS = {"comment": "test"}


def _portrait(side: int = 160, crop: int = 96) -> Portrait:
    """A synthetic portrait whose central box of `crop` pixels, turned by 10 degrees, is the face crop."""
    rng = np.random.default_rng(0)
    frame = cv2.resize(rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8), (side, side))
    transform = cv2.getRotationMatrix2D((side / 2, side / 2), 10, 1.0)
    transform[:, 2] -= (side - crop) / 2
    return _cropped(frame, transform, crop)


def _cropped(frame: np.ndarray, transform: np.ndarray, crop: int) -> Portrait:
    """A portrait of `frame` whose face crop is `transform` (frame -> crop pixels) at side `crop`."""
    full = cv2.warpAffine(frame, transform, (crop, crop))
    zeros = np.zeros(2, np.float32)
    return Portrait(frame=frame, transform=transform, crop=full, crop_full=full, full_transform=transform,
                    gaze=zeros, distance=0.0, emotion=zeros, faces=1,
                    expression=np.full(EXPRESSION_DIMS, np.nan, np.float32))  # fmt: skip


def _noise_frame(side: int) -> np.ndarray:
    return cv2.resize(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8), (side, side))


def _crops(count: int, side: int = 96) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


# --- paste-back in uint8 ---------------------------------------------------------------------------------------


def test_uint8_paste_back_stays_within_one_grey_level_of_the_float_blend():
    portrait, crops = _portrait(), _crops(4)
    paster = Paster(portrait, 0.12)
    got = paster(crops)
    top, bottom, left, right = paster.box
    alpha = paster.alpha[..., None]
    for index, crop in enumerate(crops):
        placed = cv2.warpAffine(crop, paster.warp, (right - left, bottom - top), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        blend = alpha * placed + (1 - alpha) * portrait.frame[top:bottom, left:right].astype(np.float32)
        expected = portrait.frame.copy()
        expected[top:bottom, left:right] = np.clip(blend, 0, 255).round().astype(np.uint8)
        difference = np.abs(got[index].astype(int) - expected.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    outside = np.ones(portrait.frame.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert (got[:, outside] == portrait.frame[outside]).all()  # the still portrait, untouched


@pytest.mark.parametrize(("corner", "inside"), [((40, 22), True), ((-12, 30), True), ((7, 9), False)])
def test_a_whole_pixel_shift_is_pasted_without_a_warp_and_gives_the_warps_bytes(corner, inside):
    """The crop of `native_crop` (scale 1, whole-pixel corner, here also one reaching past the frame's left
    edge) is pasted by reading the crop in place; the result is byte-identical to the bilinear warp's. A crop
    at a fractional scale still goes through the warp."""
    x0, y0 = corner
    transform = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]]) if inside else cv2.getRotationMatrix2D((80, 80), 0, 1.01)
    portrait = _cropped(_noise_frame(160), transform, 96)
    paster = Paster(portrait, 0.12)
    assert (paster.window is not None) == inside
    crops = _crops(3)
    got = paster(crops)
    paster.window = None  # the warp's path on the same portrait
    np.testing.assert_array_equal(got, paster(crops))


@pytest.mark.parametrize(("corner", "side"), [(None, 160), ((41, 23), 160), ((7, 3), 120)])
def test_the_box_composer_gives_the_planes_of_paste_back_watermark_and_conversion_of_whole_frames(corner, side):
    """Only the paste-back's box (widened to even rows and columns) is blended, marked and converted per
    frame; the rest is the portrait's planes per watermark gain: byte-identical to the whole-frame path, at
    odd box corners, through the warp (a turned crop) or the whole-pixel shift, over chunk boundaries."""
    crop = 96
    if corner is None:
        portrait = _portrait(side, crop)
    else:
        transform = np.array([[1.0, 0.0, -corner[0]], [0.0, 1.0, -corner[1]]])
        portrait = _cropped(_noise_frame(side), transform, crop)
    paster = Paster(portrait, 0.12)
    assert (paster.window is not None) == (corner is not None)
    assert corner is None or paster.box[0] % 2 or paster.box[2] % 2  # an odd corner to widen
    crops = _crops(40, crop)
    composer, whole = BoxComposer(Paster(portrait, 0.12), Watermarker(b"\x05" * 8)), Watermarker(b"\x05" * 8)
    for start in range(0, 40, 13):
        chunk = crops[start : start + 13]
        np.testing.assert_array_equal(composer(chunk), mark_frames(whole, paster(chunk)))
    assert len(composer._backgrounds) >= 2  # the modulation took several gains over these frames
    unmarked = BoxComposer(Paster(portrait, 0.12), None)
    np.testing.assert_array_equal(unmarked(crops[:5]), mark_frames(None, paster(crops[:5])))


# --- the pipeline ------------------------------------------------------------------------------------------------


def _write(path: Path, threaded: bool, cfg, audio: ArrayTrack, chunks: list[np.ndarray], paster,
           split: bool | None = None) -> bytes:  # fmt: skip
    count = write_video(path, iter(chunks), audio, FPS, cfg, TAGS, watermark=Watermarker(b"\x01" * 8), paster=paster,
                        threaded=threaded, split=split)  # fmt: skip
    assert count == sum(len(c) for c in chunks)
    return path.read_bytes()


@pytest.mark.parametrize("encoder_threads", [1, 2])
def test_pipelined_output_is_byte_identical_to_the_sequential_path(params, tmp_path, encoder_threads):
    cfg = params.generate.model_copy(update={"encoder_threads": encoder_threads})
    portrait, crops = _portrait(), _crops(30)
    chunks = [crops[i : i + 7] for i in range(0, 30, 7)]  # uneven chunks, as a stream's last window gives
    audio = ArrayTrack(np.random.default_rng(2).normal(0, 0.1, (int(1.3 * 48000), 2)).astype(np.float32), 48000)
    sequential = _write(tmp_path / "sequential.mp4", False, cfg, audio, chunks, Paster(portrait, 0.12))
    for split in (False, True):  # one post-processing thread (beside a CPU renderer), or a thread per stage
        split_bytes = _write(tmp_path / f"split{split}.mp4", True, cfg, audio, chunks, Paster(portrait, 0.12), split)
        assert split_bytes == sequential, split
    with av.open(str(tmp_path / "splitTrue.mp4")) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert (video.width, video.height) == (160, 160) and video.frames == 30
        assert sound.codec_context.sample_rate == 48000 and sound.codec_context.layout.nb_channels == 2
        decoded = sum(frame.samples for frame in container.decode(sound))
    assert abs(decoded - 30 / FPS * 48000) <= 1024  # cut at the last frame's end (AAC frames of 1024)


def test_the_renderer_runs_beside_the_post_processing():
    """Three stages of 50 ms per chunk behind a renderer of 50 ms per chunk: threaded, the chunks overlap."""

    def renderer():
        for index in range(6):
            time.sleep(0.05)
            yield np.full((1, 2, 2, 3), index, np.uint8)

    def stage(chunk: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return chunk

    seen: list[int] = []
    timings = {}
    for threaded in (False, True):
        seen.clear()
        start = time.perf_counter()
        run_stages(renderer(), [stage, stage], lambda c: (time.sleep(0.05), seen.append(int(c[0, 0, 0, 0]))),
                   threaded=threaded)  # fmt: skip
        timings[threaded] = time.perf_counter() - start
        assert seen == list(range(6))  # every chunk, in order
    assert timings[False] > 1.1 and timings[True] < 0.75 * timings[False], timings


@pytest.mark.parametrize("where", ["renderer", "stage"])
def test_a_failure_anywhere_stops_the_pipeline_and_leaves_no_file(params, tmp_path, where):
    portrait, crops = _portrait(), _crops(10)
    before = threading.active_count()

    def renderer():
        yield crops[:5]
        if where == "renderer":
            raise InputError("the renderer drew non-finite pixels")
        yield crops[5:]

    pasted: list[int] = []

    def broken(chunk: np.ndarray) -> np.ndarray:  # the second chunk fails (the first reached the encoder)
        if pasted:
            raise InputError("the paste-back failed")
        pasted.append(len(chunk))
        return Paster(portrait, 0.12)(chunk)

    audio = ArrayTrack(np.zeros(16000, np.float32), 16000)
    with pytest.raises(InputError, match="non-finite pixels" if where == "renderer" else "paste-back failed"):
        write_video(tmp_path / "out.mp4", renderer(), audio, FPS, params.generate, TAGS, paster=broken)
    assert not list(tmp_path.iterdir())  # no file, no .partial
    deadline = time.perf_counter() + 5
    while threading.active_count() > before and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before  # every stage thread has ended


# --- encoder and device -------------------------------------------------------------------------------------------


def test_the_encoder_is_libx264_unless_nvenc_opens_beside_a_cuda_renderer(params):
    cfg = params.generate.model_copy(update={"encoder": "auto", "crf": 20, "preset": "superfast", "encoder_threads": 3})
    x264 = VideoCodec("libx264", {"crf": "20", "preset": "superfast"}, 3)
    assert choose_codec(cfg, "cpu", nvenc=lambda: True) == x264
    assert choose_codec(cfg, "cuda", nvenc=lambda: False) == x264
    nvenc = choose_codec(cfg, "cuda", nvenc=lambda: True)
    assert nvenc.name == "h264_nvenc" and nvenc.options["cq"] == "20" and nvenc.options["preset"] == cfg.nvenc_preset
    named = cfg.model_copy(update={"encoder": "h264_nvenc"})
    with pytest.raises(InputError, match="NVENC does not open here"):
        choose_codec(named, "cuda", nvenc=lambda: False)
    assert choose_codec(cfg.model_copy(update={"encoder": "libx264"}), "cuda", nvenc=lambda: True) == x264
    if not torch.cuda.is_available():
        assert nvenc_available() is False  # PyAV has the wrapper; without a GPU it must not open


def test_the_thread_count_reaches_torch_opencv_and_every_blas_pool():
    """generate.threads also caps numpy's and scipy's OpenBLAS pools, whose spare workers otherwise spin after
    each call (2 CPU-ms per frame of the 512² post-processing on the 2-core VM)."""
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads(), cv2.getNumThreads()
    limiter = limit_threads(1)
    try:
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and all(pool["num_threads"] == 1 for pool in blas), blas
    finally:
        limiter.restore_original_limits()
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_devices_resolve_to_cuda_then_mps_then_cpu_and_a_missing_one_is_refused():
    both, mac, none = {"cuda": True, "mps": True}, {"cuda": False, "mps": True}, {"cuda": False, "mps": False}
    assert resolve_device("auto", both).type == "cuda"
    assert resolve_device("auto", mac).type == "mps"
    assert resolve_device("auto", none).type == "cpu"
    assert resolve_device("mps", mac).type == "mps" and resolve_device("cpu", both).type == "cpu"
    with pytest.raises(InputError, match="mps but MPS is not available"):
        resolve_device("mps", none)
    with pytest.raises(InputError, match="cuda but no GPU"):
        resolve_device("cuda", mac)


def test_the_device_option_overrides_params_before_the_bundle_loads(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the bundle was loaded")

    monkeypatch.setattr("vasa.inference.bundle.load_bundle", refuse)
    image, audio = tmp_path / "face.png", tmp_path / "speech.wav"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    soundfile.write(audio, np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    argv = ["--params", str(REPO / "params.yaml"), "generate", "--bundle", str(tmp_path), "--image", str(image),
            "--audio", str(audio), "--out", str(tmp_path / "out.mp4")]  # fmt: skip
    if not torch.backends.mps.is_available():
        assert main([*argv, "--device", "mps"]) == 2
        assert "generate.device is mps but MPS is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


# --- the user's audio ------------------------------------------------------------------------------------------------


def test_the_muxed_track_keeps_the_files_rate_and_channels(tmp_path):
    noise = np.random.default_rng(0).normal(0, 0.1, (4800, 6)).astype(np.float32)
    cases = [(22050, 1, 22050, "mono"), (44100, 2, 44100, "stereo"), (48000, 6, 48000, "stereo"),
             (192000, 2, 48000, "stereo")]  # fmt: skip
    for rate, channels, muxed, layout in cases:
        path = tmp_path / f"{rate}_{channels}.wav"
        soundfile.write(path, noise[:, :channels], rate)
        track = audio_track(path)
        assert (track.rate, track.layout) == (muxed, layout)
        samples = np.concatenate(list(track.chunks()))
        assert samples.shape[1] == track.channels and abs(len(samples) - 4800 * muxed / rate) < 64


@pytest.mark.slow
def test_a_48k_stereo_input_gives_a_48k_stereo_video_and_the_same_motion(tiny_bundle, params, fixtures_dir, tmp_path):
    """48 kHz stereo in -> 48 kHz stereo AAC out, its channels kept apart; the model hears the 16 kHz mono copy,
    so the frames equal those of the same speech given as 16 kHz mono."""
    from vasa.inference.bundle import load_bundle

    speech, rate = soundfile.read(fixtures_dir / SPEECH, dtype="float32", always_2d=True)
    mono = speech[: int(1.2 * rate), 0]
    import librosa

    left = librosa.resample(mono, orig_sr=rate, target_sr=48000)
    stereo = tmp_path / "stereo48k.wav"
    soundfile.write(stereo, np.stack([left, 0.25 * left], axis=1), 48000, subtype="FLOAT")
    model_copy = tmp_path / "mono16k.wav"
    soundfile.write(model_copy, load_speech(stereo, 16000, FPS, params.generate), 16000, subtype="FLOAT")
    bundle = load_bundle(tiny_bundle)
    cfg = params.generate.model_copy(update={"steps": 2, "max_side": 256})
    outs = {}
    for name, audio in (("stereo", stereo), ("mono", model_copy)):
        outs[name] = tmp_path / f"{name}.mp4"
        generate_file(bundle, fixtures_dir / PORTRAIT, audio, outs[name], cfg, params.preprocess.face)
    with av.open(str(outs["stereo"])) as container:
        sound = container.streams.audio[0]
        assert sound.codec_context.sample_rate == 48000 and sound.codec_context.layout.name == "stereo"
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(sound)], axis=1)  # (2, n) planar
    with av.open(str(outs["stereo"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    ratio = np.sqrt(np.mean(decoded[1] ** 2) / np.mean(decoded[0] ** 2))
    assert abs(ratio - 0.25) < 0.02  # left and right kept apart, not downmixed
    assert abs(decoded.shape[1] - len(frames) / FPS * 48000) <= 1024
    with av.open(str(outs["mono"])) as container:
        assert container.streams.audio[0].codec_context.sample_rate == 16000
        mono_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == len(mono_frames) == int(1.2 * FPS)
    assert all(np.array_equal(a, b) for a, b in zip(frames, mono_frames, strict=True))  # the same motion


# --- start-up ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loading_a_bundle_imports_no_compiler(tiny_bundle):
    """The meta-device skeleton used to import torch._dynamo (a second of every run's start-up), and the
    networks were built twice; now the checked skeleton takes the weights."""
    code = (
        "import sys; from pathlib import Path; from vasa.inference.bundle import load_bundle; "
        f"b = load_bundle(Path({str(tiny_bundle)!r})); "
        "assert not any(p.is_meta for p in b.face.parameters()); print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
