from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from scipy import ndimage

from preprocessing.media import write_mp4
from vasa.labelling import watermark
from vasa.labelling.watermark import PAYLOAD_BYTES, Watermarker, WatermarkReading, detect, detect_file, embed

PAYLOAD = bytes.fromhex("5a17c0ffee0b4d1e")
assert len(PAYLOAD) == PAYLOAD_BYTES


def moving_clip(frames: int = 50, size: int = 160, seed: int = 0) -> np.ndarray:
    """(T, size, size, 3) uint8, laid out like a talking-face crop: a still textured background, a
    textured "head" swaying a few pixels, a dark "mouth" opening and closing, a slow brightness drift."""
    rng = np.random.default_rng(seed)

    def texture(side: int, sigma: float, spread: float) -> np.ndarray:
        noise = ndimage.gaussian_filter(rng.normal(size=(side, side, 3)), (sigma, sigma, 0))
        return noise / noise.std() * spread

    background = np.clip(120 + texture(size, 4, 35), 0, 255)
    skin = np.clip(np.array([200, 160, 140]) + texture(size, 3, 12), 0, 255)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        dy, dx = 3 * np.sin(t / 9), 5 * np.sin(t / 7)
        head = ((yy - size * 0.5 - dy) / (size * 0.35)) ** 2 + ((xx - size * 0.5 - dx) / (size * 0.27)) ** 2 < 1
        frame = np.where(head[..., None], np.roll(skin, (round(dy), round(dx)), (0, 1)), background)
        opening = size * (0.02 + 0.04 * abs(np.sin(t / 2)))
        mouth = ((yy - size * 0.68 - dy) / opening) ** 2 + ((xx - size * 0.5 - dx) / (size * 0.1)) ** 2 < 1
        frame[mouth] = (90, 30, 40)
        out[t] = np.clip(frame * (1 + 0.02 * np.sin(t / 11)), 0, 255)
    return out


def read(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def encode(frames: np.ndarray, crf: int, path: Path) -> np.ndarray:
    write_mp4(path, frames, fps=25, crf=crf)
    return read(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return moving_clip()


@pytest.fixture(scope="module")
def first_encode(clip: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The marked clip after a first libx264 encode at CRF 18."""
    return encode(embed(clip, PAYLOAD), 18, tmp_path_factory.mktemp("wm") / "first.mp4")


def assert_reads(reading: WatermarkReading) -> None:
    assert reading.detected, reading
    assert reading.score > reading.threshold
    assert reading.payload == PAYLOAD
    assert reading.verified


def test_round_trip_after_first_encode(first_encode: np.ndarray) -> None:
    reading = detect(first_encode)
    assert_reads(reading)
    assert reading.frames == len(first_encode)
    assert reading.bit_agreement is not None and reading.bit_agreement > 0.5


def test_round_trip_after_reencode_crf28(first_encode: np.ndarray, tmp_path: Path) -> None:
    assert_reads(detect(encode(first_encode, 28, tmp_path / "crf28.mp4")))


def test_round_trip_after_half_resize(first_encode: np.ndarray, tmp_path: Path) -> None:
    small = np.stack([cv2.resize(f, (80, 80), interpolation=cv2.INTER_AREA) for f in first_encode])
    assert_reads(detect(encode(small, 23, tmp_path / "half.mp4")))


def test_round_trip_after_ten_percent_crop(first_encode: np.ndarray, tmp_path: Path) -> None:
    # 90 % of each side kept, off centre: 4 px off the top, 12 px off the left of 160.
    cropped = np.ascontiguousarray(first_encode[:, 4:148, 12:156])
    assert_reads(detect(encode(cropped, 23, tmp_path / "crop.mp4")))


def test_portrait_frames_and_half_size(tmp_path: Path) -> None:
    """Normalised coordinates: a 144 x 256 portrait clip, and a half-size copy of it, read alike."""
    portrait = np.stack([cv2.resize(f, (144, 256)) for f in moving_clip(50, 240)])
    encoded = encode(embed(portrait, PAYLOAD), 23, tmp_path / "portrait.mp4")
    assert_reads(detect(encoded))
    assert_reads(detect(cv2.resize(f, (72, 128), interpolation=cv2.INTER_AREA) for f in encoded))


def test_unmarked_and_other_key_not_detected(clip: np.ndarray, first_encode: np.ndarray, tmp_path: Path) -> None:
    unmarked = detect(encode(clip, 18, tmp_path / "plain.mp4"))
    assert not unmarked.detected and unmarked.payload is None and unmarked.bit_agreement is None
    assert unmarked.score < watermark.CRC_GATE
    other = detect(first_encode, key="another-key")
    assert not other.detected and other.payload is None
    # Marked with another key: this key finds nothing either.
    assert not detect(embed(clip, PAYLOAD, key="another-key")).detected


def test_streaming_equals_whole_clip(clip: np.ndarray) -> None:
    whole = embed(clip, PAYLOAD)
    marker = Watermarker(PAYLOAD)
    chunks = [marker.apply(clip[a:b]) for a, b in ((0, 7), (7, 8), (8, 21), (21, len(clip)))]
    streamed = np.concatenate(chunks)
    assert streamed.dtype == np.uint8 and streamed.shape == clip.shape
    assert streamed.tobytes() == whole.tobytes()
    assert not np.array_equal(whole, clip)


def test_invisible_psnr(clip: np.ndarray) -> None:
    marked = embed(clip, PAYLOAD)
    assert psnr(marked, clip) >= 40.0
    assert np.array_equal(embed(clip, PAYLOAD), marked)  # deterministic
    # Only luma moves: the same step on R, G and B wherever nothing clipped.
    delta = marked.astype(int) - clip
    inside = (clip > 20).all(-1) & (clip < 235).all(-1)
    assert np.array_equal(delta[..., 0][inside], delta[..., 2][inside])


def test_inputs_checked(clip: np.ndarray) -> None:
    with pytest.raises(ValueError, match="payload"):
        Watermarker(b"short")
    with pytest.raises(ValueError, match="uint8"):
        embed(clip.astype(np.float32), PAYLOAD)


def test_chase_corrects_weak_bits_and_rejects_noise() -> None:
    z = (watermark._code_bits(PAYLOAD).astype(float) * 2 - 1) * 4
    z[[3, 40, 90]] *= -0.1  # three bits read wrong, with little confidence
    assert watermark._correct(z) == (PAYLOAD, True)
    noise = np.random.default_rng(0).normal(size=watermark.CODE_BITS)
    assert watermark._correct(noise)[1] is False


@pytest.mark.slow
def test_real_footage_crf23_and_unmarked(fixtures_dir: Path, tmp_path: Path) -> None:
    source = fixtures_dir / "vid01_sadtalker_WDA_KatieHill_000.mp4"
    with av.open(str(source)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == 100:
                break
    clip = np.stack(frames)
    marked = embed(clip, PAYLOAD)
    assert psnr(marked, clip) >= 40.0
    first = tmp_path / "first.mp4"
    write_mp4(first, marked, fps=25, crf=18)
    again = tmp_path / "again.mp4"
    write_mp4(again, read(first), fps=25, crf=23)
    assert_reads(detect_file(again))
    for name in ("vid01_sadtalker_WDA_KatieHill_000.mp4", "vox2_681100216.mp4"):
        reading = detect_file(fixtures_dir / name, max_frames=150)
        assert not reading.detected, (name, reading)
        assert reading.frames == 150


def test_saturating_embedding_equals_the_int16_sum() -> None:
    """The uint8 saturating add/subtract gives exactly clip(frame + rint(gain x field), 0, 255), black and
    white pixels (where it saturates) included."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    frames[:, :8] = 0
    frames[:, -8:] = 255
    marker = Watermarker(b"payload!")
    got = marker.apply(frames)
    field, gains = marker._field(48, 64), watermark.modulation(marker._key.seed, 0, 4)
    for i in range(4):
        delta = np.rint(gains[i] * field).astype(np.int16)[..., None]
        np.testing.assert_array_equal(got[i], np.clip(frames[i] + delta, 0, 255))
    assert np.abs(np.rint(gains[:, None, None] * field)).max() > 0  # the mark is not empty
    # Frames that are a strided view (rendered crops come as permuted tensors' arrays): the same bytes.
    view = np.ascontiguousarray(frames.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(Watermarker(b"payload!").apply(view), got)
