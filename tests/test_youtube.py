"""High-resolution re-download of face tracks, against synthetic reference videos served on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from preprocessing.decode import DecodeError, read_audio, read_frames
from preprocessing.ingest import youtube
from preprocessing.ingest.youtube import UnavailableError, cut_and_crop, fetch_reference, smooth_track
from preprocessing.media import write_mp4
from tests.http_server import running_server

FPS, WIDTH, HEIGHT, SECONDS, RATE = 25, 640, 360, 4, 16000
RECT_W, RECT_H = 80, 100  # the moving "face", in pixels
VIDEO_ID = "aB3_-xYz09Q"
WHOLE_FRAME = np.array([[0.0, 0.0, 1.0, 1.0]] * 2)  # (2, 4): a track box covering the frame


def _rect_centre(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) in pixels of the rectangle in frame `index`: a straight, steady walk."""
    return 200.0 + 2.5 * index, 150.0 + 0.8 * index


def _chirp(n: int) -> np.ndarray:
    """A rising tone: unlike a pure sine it never repeats, so a shifted cut cannot match."""
    t = np.arange(n) / RATE
    return (0.5 * np.sin(2 * np.pi * (300 * t + 50 * t * t))).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A folder with `<VIDEO_ID>.mp4` (white rectangle walking over grey, chirp audio), served over HTTP."""
    root = tmp_path_factory.mktemp("served")
    frames = np.full((FPS * SECONDS, HEIGHT, WIDTH, 3), 40, dtype=np.uint8)  # (T, H, W, 3)
    for index, frame in enumerate(frames):
        cx, cy = _rect_centre(index)
        x0, y0 = round(cx - RECT_W / 2), round(cy - RECT_H / 2)
        frame[y0 : y0 + RECT_H, x0 : x0 + RECT_W] = 230
    write_mp4(root / f"{VIDEO_ID}.mp4", frames, FPS, _chirp(RATE * SECONDS), RATE)

    with running_server() as server:
        server.serve(f"/{VIDEO_ID}.mp4", (root / f"{VIDEO_ID}.mp4").read_bytes())
        yield root, int(server.base.rsplit(":", 1)[1])


def _track(first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """The rectangle's boxes as VoxCeleb2 fractions, with frames first+10..first+14 missing."""
    frames = np.array([f for f in range(first, last + 1) if not first + 10 <= f < first + 15])  # (N,)
    cx, cy = _rect_centre(frames)
    boxes = np.stack(
        [
            (cx - RECT_W / 2) / WIDTH,
            (cy - RECT_H / 2) / HEIGHT,
            np.full_like(cx, RECT_W / WIDTH),
            np.full_like(cy, RECT_H / HEIGHT),
        ],
        axis=1,
    )  # (N, 4)
    return frames, boxes


def test_fetch_reference_downloads_the_served_file_and_reuses_it(served, tmp_path, capfd):
    root, port = served
    path = fetch_reference(VIDEO_ID, f"http://127.0.0.1:{port}/{{youtube_id}}.mp4", tmp_path, ytdlp_format="best")
    assert capfd.readouterr() == ("", "")  # quiet: progress and messages go to `logging` only
    assert path == tmp_path / f"{VIDEO_ID}.mp4"
    assert path.read_bytes() == (root / f"{VIDEO_ID}.mp4").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .part or cache files left
    # A second call finds the finished file and never touches the network (this port is closed).
    assert fetch_reference(VIDEO_ID, "http://127.0.0.1:9/{youtube_id}.mp4", tmp_path, ytdlp_format="best") == path


def test_missing_reference_is_unavailable_not_a_crash(served, tmp_path):
    _, port = served
    with pytest.raises(UnavailableError, match="Gone_video1") as caught:
        fetch_reference("Gone_video1", f"http://127.0.0.1:{port}/{{youtube_id}}.mp4", tmp_path, ytdlp_format="best")
    assert caught.value.youtube_id == "Gone_video1"
    assert "404" in caught.value.reason
    assert not caught.value.transient  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_merging_formats_without_ffmpeg_is_a_setup_error(served, tmp_path, monkeypatch):
    _, port = served
    monkeypatch.setattr(youtube.FFmpegMergerPP, "available", property(lambda self: False))
    with pytest.raises(RuntimeError, match="ffmpeg") as caught:
        fetch_reference(VIDEO_ID, f"http://127.0.0.1:{port}/{{youtube_id}}.mp4", tmp_path, ytdlp_format="bv+ba/b")
    assert not isinstance(caught.value, UnavailableError)  # not a per-video status: every video would fail


def test_unreachable_host_is_unavailable(tmp_path):
    with pytest.raises(UnavailableError, match=VIDEO_ID) as caught:
        fetch_reference(VIDEO_ID, "http://127.0.0.1:9/{youtube_id}.mp4", tmp_path, ytdlp_format="best")
    assert caught.value.transient  # network trouble may heal: worth another attempt


@pytest.mark.parametrize("bad", ["short", "aB3_-xYz09Q0", "aB3_-xYz0/Q", "../../etc/p", "aB3_-xYz09\n", "aB3 -xYz09Q"])
def test_invalid_ids_are_rejected(bad, tmp_path):
    with pytest.raises(ValueError, match="YouTube id"):
        fetch_reference(bad, "http://127.0.0.1:9/{youtube_id}.mp4", tmp_path, ytdlp_format="best")


def test_smooth_track_fills_gaps_and_averages_jitter():
    frames = np.array([10, 11, 14])
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.3, 0.4], [0.5, 0.2, 0.3, 0.4]])
    filled = smooth_track(frames, boxes, smooth_frames=1)
    np.testing.assert_allclose(filled[:, 0], [0.1, 0.2, 0.3, 0.4, 0.5])  # frames 12, 13 interpolated
    np.testing.assert_allclose(filled[:, 1:], np.tile([0.2, 0.3, 0.4], (5, 1)))

    jitter = np.array([0.5, 0.6, 0.4, 0.6, 0.4, 0.6, 0.4, 0.5])  # x alternates around 0.5
    boxes = np.stack([jitter, jitter, np.full(8, 0.2), np.full(8, 0.3)], axis=1)
    smoothed = smooth_track(np.arange(8), boxes, smooth_frames=5)
    assert smoothed.shape == (8, 4)
    # Edge-padded windows: frame 0 averages (0.5, 0.5, 0.5, 0.6, 0.4), frame 3 (0.6, 0.4, 0.6, 0.4, 0.6),
    # frame 7 (0.6, 0.4, 0.5, 0.5, 0.5).
    np.testing.assert_allclose(smoothed[[0, 3, 7], 0], [0.5, 0.52, 0.5])
    assert np.ptp(smoothed[:, 0]) < 0.05 < np.ptp(jitter)
    np.testing.assert_allclose(smoothed[:, 2:], np.tile([0.2, 0.3], (8, 1)))
    assert boxes[3, 0] == 0.6  # inputs untouched


def test_cut_and_crop_centres_the_track(served, tmp_path):
    root, _ = served
    first, last = 20, 69
    frames, boxes = _track(first, last)
    out = tmp_path / "clip.mp4"
    info = cut_and_crop(root / f"{VIDEO_ID}.mp4", frames, boxes, out, size=256)
    assert info["n_frames"] == last - first + 1 == 50
    assert (info["fps"], info["size"], info["source_width"], info["source_height"]) == (25, 256, WIDTH, HEIGHT)
    assert info["source_fps"] == 25.0
    assert (info["start_s"], info["end_s"]) == (0.8, 2.8)
    assert info["max_outside_fraction"] == pytest.approx(0.0, abs=1e-9)

    video, rate = read_frames(out)
    assert video.shape == (50, 256, 256, 3) and rate == 25.0
    bright = video.mean(axis=-1) > 135  # (T, 256, 256)
    # The rectangle spans 80 x 100 px inside a 160 px square: 0.5 x 0.625 of the crop.
    np.testing.assert_allclose(bright.mean(axis=(1, 2)), 0.5 * 0.625, atol=0.02)
    ys, xs = np.arange(256)[None, :, None], np.arange(256)[None, None, :]
    cx = (bright * xs).sum(axis=(1, 2)) / bright.sum(axis=(1, 2))
    cy = (bright * ys).sum(axis=(1, 2)) / bright.sum(axis=(1, 2))
    # Centred to a pixel inside; the edge-padded average lags the walk by at most 0.6 frame at the
    # two ends (2.5 px/frame x 0.6 x 1.6 zoom = 2.4 px). A one-frame misalignment would be 4 px.
    np.testing.assert_allclose(cx[2:-2], 127.5, atol=1.0)
    np.testing.assert_allclose(cy[2:-2], 127.5, atol=1.0)
    np.testing.assert_allclose(cx, 127.5, atol=3.0)

    audio = read_audio(out, RATE)
    expected = _chirp(RATE * SECONDS)[first * RATE // FPS : (last + 1) * RATE // FPS]  # (32000,)
    assert _audio_seconds(out) == pytest.approx(2.0, abs=1 / FPS)
    assert 0 <= len(audio) - len(expected) <= 1024  # decoding adds the last AAC frame's padding
    assert np.corrcoef(audio[: len(expected)], expected)[0, 1] > 0.95  # the right 2 s, not a shifted cut


def test_crop_past_the_frame_edge_is_black(served, tmp_path):
    root, _ = served
    frames = np.arange(5)
    # A 160 px square box centred on the top-left corner, doubled: only the bottom-right quarter
    # of the crop shows the frame.
    boxes = np.tile([-80 / WIDTH, -80 / HEIGHT, 160 / WIDTH, 160 / HEIGHT], (5, 1))
    info = cut_and_crop(root / f"{VIDEO_ID}.mp4", frames, boxes, tmp_path / "edge.mp4", size=64, enlarge=2.0)
    assert info["max_outside_fraction"] == pytest.approx(0.75)
    video, _ = read_frames(tmp_path / "edge.mp4")
    for outside in (video[:, :28, :28], video[:, :28, 36:], video[:, 36:, :28]):
        assert outside.max() < 12  # black, not smeared edge pixels
    assert video[:, 36:, 36:].mean() > 30  # inside: the grey background


def _index_colour(index: int) -> tuple[int, int, int]:
    """A flat colour naming a frame index below 100, in steps that survive two H.264 encodes."""
    return 20 + 20 * (index % 10), 20 + 20 * (index // 10), 128


def _colour_index(video: np.ndarray) -> np.ndarray:
    """Frame indices from `_index_colour` frames (T, H, W, 3), read in the middle of each frame."""
    red, green = video[:, 16:48, 16:48, 0].mean(axis=(1, 2)), video[:, 16:48, 16:48, 1].mean(axis=(1, 2))  # (T,)
    return (np.round((red - 20) / 20) + 10 * np.round((green - 20) / 20)).astype(int)


def _audio_seconds(path: Path) -> float:
    """The audio stream's duration as the container records it (what players and muxers go by)."""
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        return float(audio.duration * audio.time_base)


def _write_vfr(path: Path, durations_ms: list[int]) -> list[int]:
    """Frame i is flat `_index_colour(i)`, shown for durations_ms[i]; returns the start times in ms."""
    starts = np.concatenate([[0], np.cumsum(durations_ms)[:-1]]).astype(int).tolist()
    time_base = Fraction(1, 1000)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = 10  # keyframes every few frames, so cut_and_crop seeks
        sound = container.add_stream("aac", rate=RATE)  # every stream before the first packet
        sound.layout = "mono"
        for index, start in enumerate(starts):
            frame = av.VideoFrame.from_ndarray(np.full((120, 160, 3), _index_colour(index), np.uint8), format="rgb24")
            frame.pts, frame.time_base = start, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        for start in range(0, RATE * SECONDS, 1024):
            chunk = np.full((1, 1024), 0.1, np.float32)
            audio = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            audio.sample_rate, audio.pts, audio.time_base = RATE, start, Fraction(1, RATE)
            container.mux(sound.encode(audio))
        container.mux(sound.encode(None))
    return starts


def test_variable_frame_rate_source_is_resampled_by_timestamp(tmp_path):
    source = tmp_path / "vfr.mp4"
    # 100 frames over 4 s: 25 fps on average, but off the 40 ms grid, so some frames are shown
    # twice and some never.
    starts = _write_vfr(source, [30, 50, 20, 70, 30] * 20)
    first, last = 40, 79  # 1.6-3.2 s: past the seek margin
    out = tmp_path / "resampled.mp4"
    info = cut_and_crop(source, np.array([first, last]), WHOLE_FRAME, out, size=64, enlarge=1.0)
    assert info["n_frames"] == 40 and info["source_fps"] == pytest.approx(25.0, rel=0.05)

    video, rate = read_frames(out)
    assert len(video) == last - first + 1 and rate == 25.0
    # For target time k / 25 s: the last source frame starting at or before it.
    expected = [np.searchsorted(starts, 40 * k, side="right") - 1 for k in range(first, last + 1)]
    assert _colour_index(video).tolist() == expected
    assert len(set(expected)) < len(expected) and max(np.diff(expected)) == 2  # duplicated and dropped frames
    assert _audio_seconds(out) == pytest.approx(40 / FPS, abs=1 / FPS)


def test_seek_past_the_track_start_falls_back_to_decoding_from_the_start(tmp_path, monkeypatch):
    source = tmp_path / "vfr.mp4"
    starts = _write_vfr(source, [30, 50, 20, 70, 30] * 20)
    monkeypatch.setattr(youtube, "SEEK_MARGIN_S", -1.0)  # seek to 1 s after the track start: keyframe at 2.4 s
    cut_and_crop(source, np.array([40, 49]), WHOLE_FRAME, tmp_path / "o.mp4", size=64, enlarge=1.0)
    expected = [np.searchsorted(starts, 40 * k, side="right") - 1 for k in range(40, 50)]
    assert _colour_index(read_frames(tmp_path / "o.mp4")[0]).tolist() == expected


def test_track_beyond_the_end_is_a_value_error(served, tmp_path):
    source = served[0] / f"{VIDEO_ID}.mp4"
    boxes = np.tile([0.3, 0.3, 0.2, 0.3], (2, 1))
    with pytest.raises(ValueError, match=r"90\.\.120.*4\.000 s"):
        cut_and_crop(source, np.array([90, 120]), boxes, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match=r"95\.\.100"):  # one frame past the last one
        cut_and_crop(source, np.array([95, 100]), boxes, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()
    assert cut_and_crop(source, np.array([95, 99]), boxes, tmp_path / "x.mp4", size=64)["n_frames"] == 5


def test_unreadable_file_is_a_decode_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(DecodeError):
        cut_and_crop(junk, np.array([0, 4]), np.tile([0.3, 0.3, 0.2, 0.3], (2, 1)), tmp_path / "x.mp4")


def test_default_params_format_works_without_system_ffmpeg(served, tmp_path, params):
    """The default format merges streams; the ffmpeg bundled by imageio-ffmpeg makes that possible."""
    import yt_dlp

    with yt_dlp.YoutubeDL({"ffmpeg_location": youtube.imageio_ffmpeg.get_ffmpeg_exe(), "quiet": True}) as ydl:
        assert youtube.FFmpegMergerPP(ydl).available
    _, port = served
    url = f"http://127.0.0.1:{port}/{{youtube_id}}.mp4"
    path = fetch_reference(VIDEO_ID, url, tmp_path, ytdlp_format=params.ingest.youtube.format)
    assert path.stat().st_size > 0
