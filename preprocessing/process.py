"""One clip through the preprocessing steps: decode -> face -> crop -> pose/gaze -> audio -> filter.

`process_clip` takes a manifest row and the stage config and returns the training samples (one per
usable face segment) and the failures, each with a reason. Nothing here writes files: the flow
caches and shards the result, and joins the manifest's provenance and split when it writes shards
(so what is returned is derived from the media alone and never goes stale). No exception escapes:
anything that goes wrong with one clip is a recorded failure, flagged `transient` when the
environment caused it (missing file, permission, memory), so a cache does not keep it.

Memory is bounded by the chunk size, not the clip length: the clip is decoded twice, chunk by chunk.
Pass 1 tracks the face (FaceMesh state carried across chunks) and keeps only landmarks and a
sharpness per frame; segments, crop boxes, pose and filters are decided from those; pass 2 decodes
again and streams each accepted segment's crops into its own H.264 encoder.
"""

from __future__ import annotations

import errno
import io
import json
import re
import wave
from dataclasses import dataclass, field

import numpy as np

from preprocessing import audio, decode, face, filters, pose, schema
from preprocessing.media import VideoWriter
from preprocessing.shards import Sample
from vasa.core.config import PreprocessConfig

# Failure statuses: the media could not be used at all, or a segment was filtered out.
ERROR, REJECTED = "error", "rejected"
DECODE_ERROR, MISSING_MEDIA, UNREADABLE_MEDIA, INTERNAL_ERROR = (
    "decode_error",
    "missing_media",
    "unreadable_media",
    "internal_error",
)
# errno values of an OSError that say the environment (disk, mount, permissions, limits) failed,
# not the media: such an outcome may heal on a re-run, so it must not be cached.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
    | {errno.ESTALE, errno.EROFS, errno.ETIMEDOUT, errno.EAGAIN}
)
MAX_DETAIL = 500  # characters of a failure detail
# Decoder for the two streaming passes. decord's threaded decoder reads ahead without bound while
# its consumer is slower than it (FaceMesh always is): measured on a 400-frame 512² clip, peak RSS
# grew by ~230 MB over a 40-frame one with decord and by ~7 MB with PyAV. Decoding is a small part
# of the per-frame cost next to FaceMesh (docs/BENCHMARKS.md), so bounded memory wins.
BACKEND = "pyav"


@dataclass
class Outcome:
    """What became of one clip: samples to shard and failures to report."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # clip_id, key, status, reason, detail
    frame_rejections: dict[str, int] = field(default_factory=dict)  # frames left out per reason
    transient: bool = False  # the failure came from the environment: do not cache this outcome


@dataclass(frozen=True)
class _Segment:
    """One face segment, decided from pass 1 (everything but its pixels)."""

    start: int
    end: int  # exclusive
    transforms: np.ndarray  # (T, 2, 3) decoded pixels -> crop pixels
    landmarks: np.ndarray  # (T, 478, 3) crop pixels, bridged frames interpolated
    head: pose.Pose  # crop frame
    meta: dict  # sample JSON fields measured from the landmarks


def process_clip(row: dict, cfg: PreprocessConfig) -> Outcome:
    """Samples and failures of one manifest row (needs clip_id, key, media_path, av_offset)."""
    try:
        return _process(row, cfg)
    except decode.DecodeError as err:
        outcome = Outcome(transient=is_environmental(err.__cause__))
        outcome.failures.append(_failure(row, ERROR, DECODE_ERROR, clean_detail(str(err))))
        return outcome
    # Anything else (an odd crop size, a MediaPipe or encoder error, out of memory) is a failure of
    # this clip only: one bad item must never abort the run (issue 8 sec. 2). BaseExceptions such as
    # KeyboardInterrupt still propagate.
    except Exception as err:  # noqa: BLE001
        outcome = Outcome(transient=is_environmental(err))
        detail = f"{type(err).__name__}: {clean_detail(str(err))}"
        outcome.failures.append(_failure(row, ERROR, INTERNAL_ERROR, detail))
        return outcome


def is_environmental(err: BaseException | None) -> bool:
    """True when `err` (or what caused it) says the environment failed, not the clip."""
    while err is not None:
        if isinstance(err, MemoryError | FileNotFoundError | PermissionError):
            return True
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            return True
        err = err.__cause__
    return False


_VOLATILE = (
    (re.compile(r"\[\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\]\s*"), ""),  # decord/dmlc log stamps: [23:18:45]
    (re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"), "<time>"),
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "0x?"),  # object addresses
    (re.compile(r"\s+"), " "),
)


def clean_detail(text: str) -> str:
    """A failure detail without volatile text (wall-clock stamps, dates, memory addresses) and
    collapsed whitespace, cut to MAX_DETAIL characters: the same failure gives the same bytes."""
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    text = text.strip()
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _process(row: dict, cfg: PreprocessConfig) -> Outcome:
    outcome = Outcome()
    problem = _unreadable(row["media_path"])
    if problem:
        reason, err = problem
        outcome.transient = is_environmental(err)
        detail = f"{type(err).__name__}: {err.strerror}: {row['media_path']}"
        outcome.failures.append(_failure(row, ERROR, reason, detail))
        return outcome
    min_frames = max(1, int(np.ceil(cfg.filters.min_seconds * cfg.fps)))
    with decode.open_clip(
        row["media_path"], fps=cfg.fps, sample_rate=cfg.sample_rate, max_side=cfg.decode.max_side, backend=BACKEND
    ) as reader:
        if reader.n_frames < min_frames:
            outcome.frame_rejections = {filters.TOO_SHORT: reader.n_frames}
            detail = f"{reader.n_frames} frames < {min_frames} (min_seconds {cfg.filters.min_seconds})"
            outcome.failures.append(_failure(row, REJECTED, filters.TOO_SHORT, detail))
            return outcome
        track, sharpness = _track(reader, cfg)  # pass 1
        spans, rejected = face.find_segments(track, cfg.face, min_frames)
        rejections = {reason: count for reason, count in rejected.items() if count}
        segments = []
        for start, end in spans:
            segment = _plan_segment(cfg, reader, track.landmarks[start:end], sharpness[start:end], start, end)
            problems = filters.segment_problems(
                end - start,
                cfg.fps,
                segment.meta["sharpness"],
                segment.head.yaw,
                segment.head.pitch,
                segment.head.roll,
                row.get("av_offset"),
                segment.meta["outside_fraction"],
                segment.meta["upscale"],
                cfg.filters,
            )
            if problems:
                reason = problems[0][0]
                rejections[reason] = rejections.get(reason, 0) + end - start
                detail = "; ".join(f"{name}: {text}" for name, text in problems)
                outcome.failures.append(_failure(row, REJECTED, reason, detail, key=_key(row, start)))
            else:
                segments.append(segment)
        outcome.frame_rejections = dict(sorted(rejections.items()))
        if not spans:
            reason = max(rejected, key=lambda r: rejected[r]) if any(rejected.values()) else filters.TOO_SHORT
            limits = (
                f"min_face_px {cfg.face.min_face_px}, max_jump {cfg.face.max_jump}, "
                f"max_gap_frames {cfg.face.max_gap_frames}, min_frames {min_frames}"
            )
            detail = f"no usable face segment in {reader.n_frames} frames: {outcome.frame_rejections} ({limits})"
            outcome.failures.append(_failure(row, REJECTED, reason, detail))
            return outcome
        videos = _encode(reader, segments, cfg)  # pass 2
        for segment, video in zip(segments, videos, strict=True):
            outcome.samples.append(_sample(row, cfg, reader, segment, video, outcome.frame_rejections))
    return outcome


def _unreadable(path: str) -> tuple[str, OSError] | None:
    """(reason, error) when the media file cannot be opened at all, usually a problem of the
    environment (a path that no longer resolves, permissions), told apart from bad media before
    decoding."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except FileNotFoundError as err:
        return MISSING_MEDIA, err
    except OSError as err:
        return UNREADABLE_MEDIA, err
    return None


def _track(reader, cfg: PreprocessConfig) -> tuple[face.FaceTrack, np.ndarray]:
    """Pass 1: FaceMesh over the clip chunk by chunk, duplicates merged as they come (the merge's
    state carried across chunks like the tracker's) -> (FaceTrack, (T,) sharpness).

    Only the kept face's landmarks (5.6 KB a frame) and the counts are kept, never frames.
    """
    tracker = face.get_tracker(cfg.face)
    tracker.reset()
    n = reader.n_frames
    landmarks = np.full((n, face.N_LANDMARKS, 3), np.nan, dtype=np.float32)  # (T, 478, 3) decoded pixels
    counts = np.zeros(n, dtype=np.int64)
    sharpness = np.full(n, np.nan)  # (T,) variance of the Laplacian of the face at a fixed size
    previous = None  # (2,) face centre of the last frame with one face
    for start, frames in reader.chunks(cfg.decode.chunk_frames):
        found, number = tracker.detect(frames)
        chunk = face.merge_duplicates(face.FaceTrack.from_detections(found, number), cfg.face.duplicate_iou, previous)
        previous = face.last_centre(chunk, previous)
        landmarks[start : start + len(frames)], counts[start : start + len(frames)] = chunk.landmarks, chunk.faces
        first = found[:, 0]  # (n, 478, 3): any detection measures the source's focus
        heights, centres = face.face_height(first), face.face_centre(first)
        for offset, frame in enumerate(frames):
            if number[offset]:
                sharpness[start + offset] = filters.face_sharpness(frame, centres[offset], heights[offset])
    return face.FaceTrack(landmarks=landmarks, faces=counts), sharpness


def _plan_segment(cfg: PreprocessConfig, reader, landmarks, sharpness, start: int, end: int) -> _Segment:
    """Crop transforms, crop-frame landmarks and pose, and the measured quality of one segment."""
    bridged = np.flatnonzero(~np.isfinite(landmarks).all(axis=(1, 2)))  # frames of bridged gaps
    source = face.fill_gaps(landmarks)  # (T, 478, 3) decoded pixels
    if cfg.crop.mode == "box":
        box = face.box_transform(source, cfg.crop_size, cfg.face.crop_scale, (reader.height, reader.width))
        transforms = np.repeat(box[None], end - start, axis=0)  # (T, 2, 3): one box for the segment
    else:
        transforms = face.crop_transforms(source, cfg.crop_size, cfg.face)
    crop_landmarks = face.transform_points(source, transforms)  # (T, 478, 3) crop pixels
    head = pose.head_pose(crop_landmarks)  # pose.npy is in the crop frame (schema.POSE_FRAME)
    scale = face.transform_scale(transforms)  # (T,) crop pixels per decoded pixel
    meta = {
        "sharpness": round(float(np.nanmedian(sharpness)), 3) if np.isfinite(sharpness).any() else float("nan"),
        "outside_fraction": round(
            float(np.mean(face.outside_fraction(transforms, cfg.crop_size, (reader.height, reader.width)))), 4
        ),
        "upscale": round(float(np.median(scale)), 4),
        "frames_bridged": bridged.tolist(),
        # VASA-1's head distance d (sec. 3.2): face scale (eye-corner distance) relative to the decoded
        # frame's shorter side; larger = closer to the camera. Independent of the crop.
        "head_distance": round(float(np.nanmedian(head.scale / scale)) / min(reader.height, reader.width), 6),
    }
    return _Segment(start, end, transforms, crop_landmarks, head, meta)


def _encode(reader, segments: list[_Segment], cfg: PreprocessConfig) -> list[bytes]:
    """Pass 2: decode again and stream each segment's crops into its own encoder -> mp4 bytes each.

    Segments are disjoint and in order, so at most one encoder is open at a time.
    """
    videos: list[bytes] = []
    queue = list(segments)
    writer, buffer, segment = None, None, None
    try:
        for start, frames in reader.chunks(cfg.decode.chunk_frames):
            for index, frame in enumerate(frames, start):
                if segment is None and queue and index == queue[0].start:
                    segment, buffer = queue.pop(0), io.BytesIO()
                    writer = VideoWriter(buffer, cfg.crop_size, cfg.crop_size, cfg.fps, cfg.crop_crf, cfg.crop_preset)
                if segment is None:
                    continue
                writer.write(
                    face.crop_frame(frame, segment.transforms[index - segment.start], cfg.crop_size, cfg.crop.border)
                )
                if index == segment.end - 1:
                    writer.close()
                    videos.append(buffer.getvalue())
                    writer, segment = None, None
            if segment is None and not queue:
                break  # the rest of the clip is in no segment: stop decoding
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if len(videos) != len(segments):
        if writer is not None:
            writer.abort()
        raise decode.DecodeError(f"the second decoding pass ended before frame {reader.n_frames} of the first")
    return videos


def _sample(row, cfg: PreprocessConfig, reader, segment: _Segment, video: bytes, frame_rejections) -> Sample:
    start, end, head = segment.start, segment.end, segment.head
    hop = cfg.sample_rate // cfg.fps
    sound = reader.audio[start * hop : end * hop]  # (T * hop,) float32
    gaze = pose.gaze(segment.landmarks, head)  # (T, 2) degrees, relative to the head
    pose_array = np.column_stack([head.yaw, head.pitch, head.roll, head.translation, head.scale]).astype(np.float32)
    # crop.npy maps the ORIGINAL (upright) source pixels: decoded = scale * original when max_side capped it.
    transforms = segment.transforms.astype(np.float64).copy()
    transforms[:, :, :2] *= reader.scale
    members = {
        schema.MP4: video,
        schema.WAV: _wav_bytes(sound, cfg.sample_rate),
        schema.POSE: _npy(pose_array),  # (T, 7) POSE_COLUMNS, crop frame
        schema.CROP_TRANSFORM: _npy(transforms.astype(np.float32)),  # (T, 2, 3) source -> crop pixels
        schema.LANDMARKS: _npy(segment.landmarks.astype(np.float16)),  # (T, 478, 3) crop pixels
        schema.GAZE: _npy(gaze.astype(np.float32)),  # (T, 2) theta, phi degrees
        schema.EXPRESSION: _npy(pose.expression(segment.landmarks, head).astype(np.float32)),
        schema.MEL: _npy(audio.log_mel(sound, cfg.sample_rate, cfg.fps, cfg.audio)),  # (T * k, n_mels)
    }
    if cfg.audio.encoder_dir:
        encoder = audio.get_encoder(cfg.audio.encoder_dir)
        members[schema.SPEECH] = _npy(encoder.encode(sound, cfg.sample_rate, cfg.fps))  # (T, D)
    key = _key(row, start)
    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "key": key,
        "segment": [start, end],
        "n_frames": end - start,
        "fps": cfg.fps,
        "sample_rate": cfg.sample_rate,
        "crop_size": cfg.crop_size,
        "crop_mode": cfg.crop.mode,
        "crop_border": cfg.crop.border,
        "pose_frame": schema.POSE_FRAME,
        "pose_columns": list(schema.POSE_COLUMNS),
        "gaze_columns": list(schema.GAZE_COLUMNS),
        "expression_columns": list(schema.EXPRESSION_COLUMNS),
        "source_size": [round(reader.width / reader.scale), round(reader.height / reader.scale)],
        "decoded_size": [reader.width, reader.height],
        "mel_frames_per_video_frame": audio.mel_frames_per_video_frame(cfg.sample_rate, cfg.fps, cfg.audio.hop_length),
        "main_gaze_deg": [round(float(v), 4) for v in pose.main_gaze(gaze)],
        "frames_rejected": frame_rejections,
        **segment.meta,
    }
    members[schema.JSON] = json.dumps(meta, sort_keys=True).encode()
    return Sample(key, members, frames=end - start, seconds=(end - start) / cfg.fps)


def _key(row: dict, start: int) -> str:
    return f"{row['key']}_{start:05d}"


def _failure(row: dict, status: str, reason: str, detail: str, key: str | None = None) -> dict:
    return {"clip_id": row["clip_id"], "key": key or row["key"], "status": status, "reason": reason, "detail": detail}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _wav_bytes(sound: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV (lossless for training, readable by every audio library)."""
    pcm = np.clip(np.round(sound * 32767), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return buffer.getvalue()
