"""Streaming decode (`open_clip`): upright frames from both decoders for video with a display matrix
(issue 7 sec. 1), memory bounded by the chunk size rather than the clip length (issue 8 sec. 3), the
`max_side` cap, and PyAV taking over when decord fails part way."""

from __future__ import annotations

import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from preprocessing import decode
from preprocessing.decode import DecodeError, load_clip, open_clip
from preprocessing.media import write_mp4

FPS, RATE = 25, 16000


def _upright(height: int = 64, width: int = 96) -> np.ndarray:
    """(height, width, 3) uint8: a picture whose orientation is unambiguous (three coloured corners)."""
    img = np.full((height, width, 3), 40, np.uint8)
    img[: height // 4, : width // 4] = (255, 0, 0)  # top-left red
    img[: height // 4, -width // 4 :] = (0, 0, 255)  # top-right blue
    img[-height // 4 :, : width // 4] = (0, 255, 0)  # bottom-left green
    return img


def _write_rotated(path: Path, upright: np.ndarray, degrees: int, hflip: bool, frames: int = 6) -> None:
    """An mp4 whose coded pictures are turned so that its display matrix shows `upright`.

    PyAV's `set_display_rotation(degrees, hflip)` means: shown = mirror(rotate_ccw(coded, degrees)),
    so the coded picture is the inverse of that applied to `upright` (what a phone held sideways writes).
    """
    coded = upright[:, ::-1] if hflip else upright
    coded = np.ascontiguousarray(np.rot90(coded, -(degrees // 90)))
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = coded.shape[1], coded.shape[0], "yuv420p"
        video.options = {"crf": "10"}
        video.set_display_rotation(degrees, hflip=hflip)
        sound = container.add_stream("aac", rate=RATE)
        sound.layout = "mono"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = np.zeros(frames * RATE // FPS + 1024, np.float32)
        for start in range(0, len(samples), 1024):
            chunk = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = RATE, start, Fraction(1, RATE)
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))


ORIENTATIONS = [(0, False), (90, False), (180, False), (270, False), (0, True), (90, True), (180, True), (270, True)]


@pytest.mark.parametrize(("degrees", "hflip"), ORIENTATIONS)
def test_rotated_clip_is_upright_through_decord_and_pyav(degrees: int, hflip: bool, tmp_path: Path) -> None:
    path = tmp_path / f"rot{degrees}{'h' if hflip else ''}.mp4"
    upright = _upright()
    _write_rotated(path, upright, degrees, hflip)
    with av.open(str(path)) as container:  # the metadata really is there (and the coded picture is turned)
        first = next(container.decode(video=0))
        assert (first.rotation != 0 or hflip) == (degrees != 0 or hflip)
        assert (first.height, first.width) == (upright.shape[:2] if degrees % 180 == 0 else upright.shape[1::-1])
    by_decord = load_clip(path, fps=FPS, sample_rate=RATE)
    by_pyav = load_clip(path, fps=FPS, sample_rate=RATE, backend="pyav")
    assert (by_decord.backend, by_pyav.backend) == ("decord", "pyav")
    for clip in (by_decord, by_pyav):
        assert clip.frames.shape == (6, 64, 96, 3)  # landscape, as displayed
        error = np.abs(clip.frames.astype(np.int16) - upright).mean(axis=(1, 2, 3))
        assert error.max() < 3.0, error  # codec noise only; a wrong turn or mirror gives ~50
    assert np.abs(by_decord.frames.astype(np.int16) - by_pyav.frames).mean() < 2.0


def test_decord_applies_the_rotation_but_not_the_mirror(tmp_path: Path) -> None:
    """decode.decord_orientation models what decord 0.6.0 does itself; if a decord release changes
    that, this fails (and the residual orientation in decode.py must change with it)."""
    decord = pytest.importorskip("decord")
    upright = _upright()
    for degrees, hflip in ORIENTATIONS:
        path = tmp_path / f"d{degrees}{hflip}.mp4"
        _write_rotated(path, upright, degrees, hflip, frames=1)
        with av.open(str(path)) as container:
            first = next(container.decode(video=0))
            coded, matrix = first.to_ndarray(format="rgb24"), decode.display_matrix(first)
        raw = decord.VideoReader(str(path))[0].asnumpy()
        expected = decode.decord_orientation(matrix).apply(coded)
        assert raw.shape == expected.shape and np.abs(raw.astype(np.int16) - expected).mean() < 2.0, (degrees, hflip)


def test_upright_orientation_of_the_matrices_phones_write() -> None:
    def matrix(a: int, b: int, c: int, d: int) -> np.ndarray:
        return np.array([a * 65536, b * 65536, 0, c * 65536, d * 65536, 0, 0, 0, 1 << 30], dtype=np.int32)

    assert decode.upright_orientation(None) == decode.IDENTITY
    assert decode.upright_orientation(matrix(1, 0, 0, 1)) == decode.IDENTITY
    # iPhone portrait: ffprobe "rotation of -90.00 degrees" = turn the coded picture clockwise.
    assert decode.upright_orientation(matrix(0, 1, -1, 0)) == decode.Orientation(3, False)
    assert decode.upright_orientation(matrix(-1, 0, 0, -1)) == decode.Orientation(2, False)
    assert decode.upright_orientation(matrix(-1, 0, 0, 1)) == decode.Orientation(0, True)  # selfie mirror
    tilted = np.array([56756, -32768, 0, 32768, 56756, 0, 0, 0, 1 << 30], dtype=np.int32)  # 30 degrees
    assert decode.upright_orientation(tilted) == decode.IDENTITY  # snaps to the nearest right angle


# --- Streaming: chunks, passes, the resolution cap ----------------------------------------------------


def _ramp_clip(path: Path, frames: int, height: int, width: int) -> np.ndarray:
    """A clip of moving diagonal ramps (every frame differs) with a tone; returns the frames."""
    y, x = np.mgrid[0:height, 0:width]
    pictures = np.stack([((x + y + 7 * k) % 256) for k in range(frames)]).astype(np.uint8)
    pictures = np.repeat(pictures[..., None], 3, axis=3)
    pictures[..., 1] = 255 - pictures[..., 1]
    t = np.arange(frames * RATE // FPS) / RATE
    write_mp4(path, pictures, FPS, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE, preset="ultrafast")
    return pictures


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_chunks_cover_the_clip_in_order_and_repeat_exactly(backend: str, tmp_path: Path) -> None:
    _ramp_clip(tmp_path / "ramp.mp4", 40, 48, 80)
    whole = load_clip(tmp_path / "ramp.mp4", fps=30, sample_rate=RATE, backend=backend)  # 25 -> 30 fps: repeats
    with open_clip(tmp_path / "ramp.mp4", fps=30, sample_rate=RATE, backend=backend) as reader:
        assert (reader.n_frames, reader.height, reader.width, reader.scale) == (len(whole.frames), 48, 80, 1.0)
        np.testing.assert_array_equal(reader.audio, whole.audio)
        for size in (7, 1, 1000):
            starts, parts = zip(*reader.chunks(size), strict=True)
            assert all(0 < len(p) <= size for p in parts)
            assert list(starts) == list(np.cumsum([0] + [len(p) for p in parts[:-1]]))
            np.testing.assert_array_equal(np.concatenate(parts), whole.frames)  # a second pass equals the first
        half = next(iter(reader.chunks(5)))  # an abandoned pass does not disturb the next one
        assert half[0] == 0 and len(half[1]) == 5
        np.testing.assert_array_equal(next(iter(reader.chunks(3)))[1], whole.frames[:3])


def test_max_side_caps_the_decoded_size(tmp_path: Path) -> None:
    _ramp_clip(tmp_path / "wide.mp4", 10, 170, 300)
    full = load_clip(tmp_path / "wide.mp4", fps=FPS, sample_rate=RATE)
    for backend in ("auto", "pyav"):
        with open_clip(tmp_path / "wide.mp4", fps=FPS, sample_rate=RATE, max_side=128, backend=backend) as reader:
            # 300x170 * 128/300 = 128x72.5: sides rounded to even, scale along the longer side.
            assert (reader.width, reader.height, reader.scale) == (128, 72, 128 / 300)
            assert reader.source_size == (300, 170)
            frames = np.concatenate([chunk for _, chunk in reader.chunks(4)])
            reference = load_clip(tmp_path / "wide.mp4", fps=FPS, sample_rate=RATE, backend=backend).frames
        expected = np.stack([cv2.resize(f, (128, 72), interpolation=cv2.INTER_AREA) for f in reference])
        np.testing.assert_array_equal(frames, expected)
    with open_clip(tmp_path / "wide.mp4", fps=FPS, sample_rate=RATE, max_side=300) as reader:
        assert (reader.width, reader.height, reader.scale) == (300, 170, 1.0)
    assert full.frames.shape[1:3] == (170, 300)
    with pytest.raises(ValueError, match="max_side"):
        open_clip(tmp_path / "wide.mp4", fps=FPS, sample_rate=RATE, max_side=127)


def test_max_side_on_a_rotated_clip(tmp_path: Path) -> None:
    _write_rotated(tmp_path / "portrait.mp4", _upright(160, 96), 270, False)  # coded 160 wide, shown 96x160
    for backend in ("auto", "pyav"):
        with open_clip(tmp_path / "portrait.mp4", fps=FPS, sample_rate=RATE, max_side=80, backend=backend) as reader:
            assert (reader.width, reader.height, reader.scale) == (48, 80, 0.5)
            frame = next(iter(reader.chunks(2)))[1][0]
        assert frame[:10, :10, 0].mean() > 200 and frame[:10, :10, 1].mean() < 60  # red stays top-left


def test_decord_failing_part_way_hands_over_to_pyav(tmp_path: Path, monkeypatch) -> None:
    _ramp_clip(tmp_path / "ramp.mp4", 30, 48, 80)
    reference = load_clip(tmp_path / "ramp.mp4", fps=FPS, sample_rate=RATE, backend="pyav")
    original = decode._DecordFrames._decode

    def fails_later(self, position):
        if position >= 15:  # a corrupt packet half way
            raise decode._DecordFailed("simulated corrupt packet")
        return original(self, position)

    monkeypatch.setattr(decode._DecordFrames, "_decode", fails_later)
    with open_clip(tmp_path / "ramp.mp4", fps=FPS, sample_rate=RATE) as reader:
        assert reader.backend == "decord"
        parts = [chunk for _, chunk in reader.chunks(10)]
        assert reader.backend == "pyav" and reader.fell_back
    assert np.abs(np.concatenate(parts).astype(np.int16) - reference.frames).mean() < 1.0
    clip = load_clip(tmp_path / "ramp.mp4", fps=FPS, sample_rate=RATE)  # never a mix of decoders in one array
    assert clip.backend == "pyav"
    np.testing.assert_array_equal(clip.frames, reference.frames)
    forced = open_clip(tmp_path / "ramp.mp4", fps=FPS, sample_rate=RATE, backend="decord")
    with pytest.raises(DecodeError, match="decord cannot read the video: simulated"), forced:
        list(forced.chunks(10))


# --- Memory: bounded by the chunk, not the clip ----------------------------------------------------


def _peak_bytes(fn) -> int:
    """Peak of memory allocated through Python and numpy (tracemalloc) while `fn` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HEIGHT, WIDTH = 270, 480  # 389 kB a frame
SHORT, LONG = 50, 150  # frames: 2 s and 6 s


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("lengths")
    for frames in (SHORT, LONG):
        _ramp_clip(folder / f"clip{frames}.mp4", frames, HEIGHT, WIDTH)
    return {frames: folder / f"clip{frames}.mp4" for frames in (SHORT, LONG)}


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_reading_memory_does_not_grow_with_clip_length(backend: str, clips: dict[int, Path]) -> None:
    size, frame_bytes = 8, HEIGHT * WIDTH * 3

    def stream(path: Path) -> None:
        with open_clip(path, fps=FPS, sample_rate=RATE, backend=backend) as reader:
            for _, chunk in reader.chunks(size):
                assert len(chunk) <= size and chunk.shape[1:] == (HEIGHT, WIDTH, 3)

    short, long = _peak_bytes(lambda: stream(clips[SHORT])), _peak_bytes(lambda: stream(clips[LONG]))
    # The chunk the caller still holds, the one being filled, the frame being decoded and the last
    # frame (kept for repeats across chunks); the audio is the only part that grows (~4 x 64 kB per
    # second at 16 kHz while it is decoded and resampled).
    audio = 4 * 64_000 * LONG / FPS
    assert long <= (3 * size + 2) * frame_bytes + audio, (long, frame_bytes)
    assert long - short < frame_bytes + 4 * 64_000 * (LONG - SHORT) / FPS, (short, long)
    # The same measurement catches a reader that holds the clip: loading it whole grows with it.
    whole = _peak_bytes(lambda: load_clip(clips[LONG], fps=FPS, sample_rate=RATE, backend=backend))
    assert whole > LONG * frame_bytes > 4 * long
