"""High-resolution re-download of VoxCeleb-style face tracks.

VoxCeleb2 ships 224x224 crops; VASA-1 trains at 512x512, so each track is cut again from its
reference YouTube video (REFERENCE.md section 3): download the video with yt-dlp, resample it to
the 25 fps grid the track's FRAME indices live on, crop every frame by the smoothed, enlarged
square box and cut the matching audio.

A reference video that cannot be fetched is a recorded status (`UnavailableError`), not a crash:
many VoxCeleb videos have been removed or made private since the dataset was built.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import imageio_ffmpeg
import numpy as np
import yt_dlp
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.postprocessor import FFmpegMergerPP
from yt_dlp.utils import ExtractorError, YoutubeDLError

from preprocessing.decode import DecodeError, read_audio
from preprocessing.media import write_mp4

log = logging.getLogger(__name__)

YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
# Containers yt-dlp may leave behind for a finished download (merged formats pick mkv or webm);
# `.part`/`.ytdl` files and per-format `<id>.f137.mp4` pieces are never mistaken for one.
MEDIA_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".m4v")
SEEK_MARGIN_S = 1.0  # seek this far before the first wanted frame, so a keyframe precedes it


class UnavailableError(RuntimeError):
    """The reference video cannot be fetched (removed, private, 404, network).

    A recorded status for the caller (STYLE 8), not a crash: `youtube_id` and `reason` go into the
    clip's metadata.
    """

    def __init__(self, youtube_id: str, reason: str, *, transient: bool = False) -> None:
        super().__init__(f"{youtube_id}: {reason}")
        self.youtube_id = youtube_id
        self.reason = reason
        self.transient = transient  # another attempt may succeed (network trouble, HTTP 5xx)


def _is_transient(err: BaseException) -> bool:
    """Whether a yt-dlp failure may heal on another attempt. A removed, private or region-blocked
    video (yt-dlp's "expected" extractor errors) and HTTP 4xx other than 408/429 will not; network
    errors and HTTP 5xx may. Walks the chain of wrapped errors yt-dlp keeps in `exc_info`."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, HTTPError):
            return err.status >= 500 or err.status in (408, 429)
        if isinstance(err, TransportError):
            return True
        if isinstance(err, ExtractorError) and err.expected:
            return False
        inner = getattr(err, "exc_info", None)
        err = inner[1] if inner and inner[1] is not err else err.__cause__
        seen += 1
    return False


class _YtdlpLog:
    """yt-dlp's logger protocol, routed into `logging`.

    Without a logger yt-dlp prints errors to stderr even when quiet; here an error is already
    raised as `UnavailableError` for the caller to record, so it is only logged at debug level.
    """

    def debug(self, msg: str) -> None:
        log.debug(msg)

    def info(self, msg: str) -> None:
        log.debug(msg)

    def warning(self, msg: str) -> None:
        log.warning(msg)

    def error(self, msg: str) -> None:
        log.debug(msg)


def fetch_reference(youtube_id: str, url_template: str, dest_dir: Path, *, ytdlp_format: str) -> Path:
    """Download the reference video of `youtube_id` into `dest_dir` as `<youtube_id>.<ext>`.

    A finished download already in `dest_dir` is reused (yt-dlp writes `.part` files and renames
    them only when complete, so a file under the final name is whole). Retries are the caller's
    business (one place decides the policy), so yt-dlp's own are switched off. Raises ValueError for
    a malformed id (it ends up in a URL and a file name) and UnavailableError when yt-dlp fails.

    A format that merges separate video and audio streams (`bestvideo+bestaudio`, how YouTube
    serves anything above 360p) needs an ffmpeg executable: the system's if there is one, else the
    one the imageio-ffmpeg wheel ships. Without any, yt-dlp would fail every video alike, so that is
    a RuntimeError about the setup rather than a per-video status.
    """
    if not isinstance(youtube_id, str) or not YOUTUBE_ID.fullmatch(youtube_id):
        raise ValueError(f"not a YouTube id (11 characters of [A-Za-z0-9_-]): {youtube_id!r}")
    dest_dir = Path(dest_dir)
    existing = _downloaded(dest_dir, youtube_id)
    if existing is not None:
        return existing
    dest_dir.mkdir(parents=True, exist_ok=True)
    options = {
        "format": ytdlp_format,
        "outtmpl": {"default": str(dest_dir / f"{youtube_id}.%(ext)s")},
        "noplaylist": True,
        "quiet": True,
        "noprogress": True,
        "color": "no_color",
        "logger": _YtdlpLog(),
        "cachedir": False,
        "retries": 0,
        "fragment_retries": 0,
        "extractor_retries": 0,
        "file_access_retries": 0,
        "ffmpeg_location": shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe(),
    }
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            if "+" in ytdlp_format and not FFmpegMergerPP(ydl).available:
                raise RuntimeError(
                    f"format {ytdlp_format!r} merges video and audio, which needs ffmpeg on PATH; "
                    "install it or choose a single-file format"
                )
            info = ydl.extract_info(url_template.format(youtube_id=youtube_id), download=True)
    except YoutubeDLError as err:  # DownloadError, ExtractorError, networking RequestError, ...
        raise UnavailableError(youtube_id, str(err).removeprefix("ERROR: "), transient=_is_transient(err)) from err
    downloads = (info or {}).get("requested_downloads") or [{}]
    path = downloads[0].get("filepath")
    path = Path(path) if path else _downloaded(dest_dir, youtube_id)
    if path is None or not path.is_file():
        raise UnavailableError(youtube_id, f"yt-dlp reported success but left no media file in {dest_dir}")
    return path


def _downloaded(dest_dir: Path, youtube_id: str) -> Path | None:
    for suffix in MEDIA_SUFFIXES:
        path = dest_dir / f"{youtube_id}{suffix}"
        if path.is_file():
            return path
    return None


def frame_size(video_path: Path) -> tuple[int, int]:
    """(width, height) of the first video stream of `video_path`; DecodeError if there is none."""
    try:
        with av.open(str(video_path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{video_path}: no video stream")
            context = container.streams.video[0].codec_context
            return context.width, context.height
    except av.error.FFmpegError as err:
        raise DecodeError(f"{video_path}: {err}") from err


def smooth_track(frames: np.ndarray, boxes: np.ndarray, *, smooth_frames: int) -> np.ndarray:
    """Boxes for every frame in [frames[0], frames[-1]]: gaps filled, jitter averaged out.

    frames: (N,) int, strictly increasing 25 fps frame indices; boxes: (N, 4) [x, y, w, h] as
    fractions of the frame size. Gaps are filled by linear interpolation, then centre and size are
    averaged over a window of `smooth_frames` (edge-padded, so the ends are not pulled towards
    zero). The average is linear, so averaging (x, y, w, h) is the same as averaging centre and
    size. Returns (frames[-1] - frames[0] + 1, 4) in the same units; inputs are untouched.
    """
    frames = np.asarray(frames)
    boxes = np.asarray(boxes, dtype=np.float64)
    if frames.ndim != 1 or len(frames) == 0 or boxes.shape != (len(frames), 4):
        raise ValueError(f"need frames (N,) and boxes (N, 4) with N >= 1, got {frames.shape} and {boxes.shape}")
    if np.any(np.diff(frames) <= 0):
        raise ValueError("track frame indices must be strictly increasing")
    if smooth_frames < 1:
        raise ValueError(f"smooth_frames must be >= 1, got {smooth_frames}")
    every = np.arange(frames[0], frames[-1] + 1)  # (T,)
    dense = np.stack([np.interp(every, frames, boxes[:, j]) for j in range(4)], axis=1)  # (T, 4)
    before, after = (smooth_frames - 1) // 2, smooth_frames // 2
    padded = np.pad(dense, ((before, after), (0, 0)), mode="edge")  # (T + smooth_frames - 1, 4)
    windows = np.lib.stride_tricks.sliding_window_view(padded, smooth_frames, axis=0)  # (T, 4, smooth_frames)
    return windows.mean(axis=-1)  # (T, 4)


def crop_square(box: np.ndarray, width: int, height: int, enlarge: float) -> tuple[float, float, float]:
    """(cx, cy, side) in pixels: the square around `box` ([x, y, w, h] fractions), enlarged.

    Square, because the model input is square; enlarged, because the detector box hugs the face
    and VASA-1's crops include hair, ears and some background that move with the head.
    """
    x, y, w, h = (float(v) for v in box)
    side = enlarge * max(w * width, h * height)
    return (x + w / 2) * width, (y + h / 2) * height, side


def cut_and_crop(
    video_path: Path,
    frames: np.ndarray,
    boxes: np.ndarray,
    out_path: Path,
    *,
    fps: int = 25,
    size: int = 512,
    enlarge: float = 1.6,
    smooth_frames: int = 5,
    sample_rate: int = 16000,
    crf: int = 18,
) -> dict:
    """Cut the face track (`frames` (N,), `boxes` (N, 4) fractions) out of `video_path` as an mp4.

    The video is resampled to a constant `fps` by timestamp (for each target time k / fps the
    frame shown at that time, i.e. the nearest earlier one), which is how the VoxCeleb FRAME
    indices were defined and which also handles variable-frame-rate sources. Every frame is cropped
    by its smoothed, enlarged square to `size` x `size`; the audio [first / fps, (last + 1) / fps)
    is cut at `sample_rate` mono. Raises ValueError when the track lies outside the video; a
    DecodeError propagates for unreadable files. Returns the clip's metadata.
    """
    video_path, out_path = Path(video_path), Path(out_path)
    track = smooth_track(frames, boxes, smooth_frames=smooth_frames)  # (T, 4)
    first = int(np.asarray(frames)[0])
    if first < 0:
        raise ValueError(f"track starts at negative frame {first}")
    n_frames = len(track)
    times = [Fraction(first + k, fps) for k in range(n_frames)]  # target times, seconds

    video = np.empty((n_frames, size, size, 3), dtype=np.uint8)  # (T, size, size, 3) RGB
    outside = 0.0
    try:
        with av.open(str(video_path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{video_path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            width, height = stream.codec_context.width, stream.codec_context.height
            source_fps = float(stream.average_rate or stream.guessed_rate or 0)
            origin = stream.start_time or 0  # frame 0 is the first video frame, in stream.time_base
            duration = _duration_s(container, stream)
            if duration is not None and times[-1] >= duration:
                raise _outside(video_path, times, fps, duration)
            audio_offset = _audio_offset_s(container, stream)
            for index, rgb in enumerate(_frames_at(container, stream, times, origin, video_path, fps)):
                cx, cy, side = crop_square(track[index], width, height, enlarge)
                video[index] = _warp_square(rgb, cx, cy, side, size)
                outside = max(outside, _outside_fraction(cx, cy, side, width, height))
    except av.error.FFmpegError as err:
        raise DecodeError(f"{video_path}: {err}") from err

    start_s = float(times[0])
    end_s = float(times[-1] + Fraction(1, fps))
    audio = _cut_audio(read_audio(video_path, sample_rate), start_s - audio_offset, n_frames, fps, sample_rate)
    write_mp4(out_path, video, fps, audio, sample_rate, crf)
    return {
        "n_frames": n_frames,
        "fps": fps,
        "size": size,
        "start_s": start_s,
        "end_s": end_s,
        "source_width": width,
        "source_height": height,
        "source_fps": source_fps,
        # Largest share of a crop that fell outside the source frame (black border): lets the
        # filter stage drop clips whose face sits against the frame edge.
        "max_outside_fraction": outside,
    }


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Fraction | None:
    """Length of the video stream from the container metadata, or None when it is not recorded."""
    if stream.duration:
        return stream.duration * stream.time_base
    if container.duration:
        return Fraction(container.duration, av.time_base)
    return None


def _audio_offset_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """When the audio starts relative to the first video frame, in seconds (read_audio starts at 0)."""
    if not container.streams.audio:
        return 0.0
    audio = container.streams.audio[0]
    audio_start = (audio.start_time or 0) * audio.time_base
    video_start = (stream.start_time or 0) * stream.time_base
    return float(audio_start - video_start)


def _outside(video_path: Path, times: list[Fraction], fps: int, duration: Fraction) -> ValueError:
    first, last = round(times[0] * fps), round(times[-1] * fps)
    return ValueError(
        f"track frames {first}..{last} ({float(times[0]):.3f}-{float(times[-1]):.3f} s at {fps} fps) lie outside "
        f"{video_path.name}, whose video lasts {float(duration):.3f} s"
    )


def _frames_at(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    times: list[Fraction],
    origin: int,
    video_path: Path,
    fps: int,
    seek: bool = True,
) -> Iterator[np.ndarray]:
    """For each target time (seconds from the first video frame), the frame shown then: (H, W, 3) RGB.

    Frames are decoded in order and each target takes the last frame whose timestamp is <= the
    target, so duplicated and dropped frames of a variable-rate source land on the fixed grid. The
    decoder first seeks to a keyframe shortly before the track, since tracks are seconds long and
    reference videos minutes long.
    """
    seeked = seek and times[0] > SEEK_MARGIN_S
    if seeked:
        target = origin + math.floor((times[0] - Fraction(SEEK_MARGIN_S)) / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    k, previous, previous_rgb, previous_time = 0, None, None, None
    for frame in container.decode(stream):
        if frame.pts is None:
            raise DecodeError(f"{video_path}: video frame without a timestamp")
        time = (frame.pts - origin) * stream.time_base
        if previous is None and time > times[0]:
            if seeked:
                break
            previous = frame  # the video starts after the first target: show its first frame
        while k < len(times) and times[k] < time:
            if previous_rgb is None:
                previous_rgb = previous.to_ndarray(format="rgb24")
            yield previous_rgb
            k += 1
        if k == len(times):
            return
        previous, previous_rgb, previous_time = frame, None, time
    if previous is None and seeked:  # the seek landed past the track start (or the end): start over
        container.seek(origin, stream=stream, backward=True, any_frame=False)
        yield from _frames_at(container, stream, times, origin, video_path, fps, seek=False)
        return
    if previous is None:
        raise DecodeError(f"{video_path}: no decodable video frames")
    # The last frame is shown for its duration; targets past that lie beyond the end of the video.
    shown = previous.duration * stream.time_base if previous.duration else Fraction(1, fps)
    if times[-1] >= previous_time + shown:
        raise _outside(video_path, times, fps, previous_time + shown)
    last_rgb = previous.to_ndarray(format="rgb24")
    for _ in range(k, len(times)):
        yield last_rgb


def _warp_square(rgb: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """The square of `side` px around (cx, cy) of `rgb` (H, W, 3), resampled to (size, size, 3).

    Pixel i covers [i, i + 1) (box fractions times the frame size), so the centres sit at i + 0.5.
    When the square is shrunk, the warp renders it at an integer multiple m of `size` (never
    minifying, so no aliasing) and an area average brings it down by exactly m.

    Outside the frame the border is constant black rather than replicated: replicated edge pixels
    smear into streaks that move with the head, which the generator would learn as content, while
    black is plainly "no data" and its share is measurable (max_outside_fraction).
    """
    scale = size / side  # output pixels per source pixel
    m = max(1, math.ceil(1 / scale - 1e-9))
    n, s = size * m, scale * m
    matrix = np.array(
        [[s, 0.0, s * (0.5 - cx) + n / 2 - 0.5], [0.0, s, s * (0.5 - cy) + n / 2 - 0.5]],
        dtype=np.float64,
    )
    warped = cv2.warpAffine(
        rgb, matrix, (n, n), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )  # (n, n, 3)
    if m > 1:
        warped = cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)
    return warped  # (size, size, 3)


def _outside_fraction(cx: float, cy: float, side: float, width: int, height: int) -> float:
    """Share of the crop square's area that lies outside the width x height frame."""
    inside_x = max(0.0, min(cx + side / 2, width) - max(cx - side / 2, 0.0))
    inside_y = max(0.0, min(cy + side / 2, height) - max(cy - side / 2, 0.0))
    return 1.0 - inside_x * inside_y / (side * side)


def _cut_audio(audio: np.ndarray, start_s: float, n_frames: int, fps: int, sample_rate: int) -> np.ndarray:
    """Samples [start_s, start_s + n_frames / fps) of `audio` (N,), zero-padded by at most one video frame.

    The encoder's last packet may stop a few samples short of the video; more than one frame
    missing means the audio does not cover the track.
    """
    start = round(start_s * sample_rate)
    length = round(n_frames * sample_rate / fps)
    clip = audio[max(start, 0) : start + length]  # (<= length,)
    front = max(-start, 0)
    back = length - front - len(clip)
    if front + back > sample_rate / fps:
        raise ValueError(
            f"audio ({len(audio) / sample_rate:.3f} s) does not cover "
            f"{start_s:.3f}-{start_s + n_frames / fps:.3f} s of the track"
        )
    return np.pad(clip, (front, back))  # (length,)
