"""One clip through the preprocessing steps: decode -> face -> crop -> pose/gaze -> audio -> filter.

`process_clip` takes a manifest row and the stage config and returns the training samples (one per
usable face segment) and the failures, each with a reason. Nothing here writes files: the flow
caches and shards the result. Any problem with the clip's media is a recorded failure, never an
exception.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from preprocessing import audio, face, filters, pose
from preprocessing.decode import DecodeError, load_clip
from preprocessing.media import write_mp4
from preprocessing.shards import Sample
from vasa.config import PreprocessConfig

POSE_COLUMNS = ("yaw_deg", "pitch_deg", "roll_deg", "tx_px", "ty_px", "tz_px", "scale_px")
PROVENANCE_COLUMNS = (
    "clip_id",
    "key",
    "speaker_id",
    "source_kind",
    "source_url",
    "youtube_id",
    "utterance",
    "licence",
    "sha256",
    "split",
    "frame_start",
    "frame_end",
    "av_offset",
)
# Failure statuses: the media could not be used at all, or a segment was filtered out.
ERROR, REJECTED = "error", "rejected"


@dataclass
class Outcome:
    """What became of one clip: samples to shard and failures to report."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    frame_rejections: dict[str, int] = field(default_factory=dict)  # frames dropped per reason


def process_clip(row: dict, cfg: PreprocessConfig) -> Outcome:
    outcome = Outcome()
    try:
        clip = load_clip(row["media_path"], fps=cfg.fps, sample_rate=cfg.sample_rate)
    except DecodeError as err:
        outcome.failures.append(_failure(row, ERROR, "decode_error", str(err)))
        return outcome
    min_frames = max(1, int(np.ceil(cfg.filters.min_seconds * cfg.fps)))
    if len(clip.frames) < min_frames:
        outcome.failures.append(_failure(row, REJECTED, filters.TOO_SHORT, f"{len(clip.frames)} frames"))
        return outcome
    track = face.get_tracker(cfg.face).track(clip.frames)
    segments, rejected = face.find_segments(track, cfg.face, min_frames)
    outcome.frame_rejections = {reason: count for reason, count in rejected.items() if count}
    if not segments:
        reason = max(rejected, key=lambda r: rejected[r]) if any(rejected.values()) else filters.TOO_SHORT
        outcome.failures.append(_failure(row, REJECTED, reason, f"no usable face segment: {outcome.frame_rejections}"))
        return outcome
    for start, end in segments:
        _process_segment(row, cfg, clip, track, start, end, outcome)
    return outcome


def _process_segment(row, cfg: PreprocessConfig, clip, track, start: int, end: int, outcome: Outcome) -> None:
    key = f"{row['key']}_{start:05d}"
    landmarks = track.landmarks[start:end]  # (T, 478, 3) source pixels
    transforms = face.crop_transforms(landmarks, cfg.crop_size, cfg.face)  # (T, 2, 3)
    crops = face.apply_crops(clip.frames[start:end], transforms, cfg.crop_size)  # (T, S, S, 3)
    head = pose.head_pose(landmarks)
    problems = filters.segment_problems(
        end - start, cfg.fps, filters.sharpness(crops), head.yaw, head.pitch, row.get("av_offset"), cfg.filters
    )
    if problems:
        outcome.failures.append(_failure(row, REJECTED, problems[0], ", ".join(problems), key=key))
        return
    hop = cfg.sample_rate // cfg.fps
    sound = clip.audio[start * hop : end * hop]  # (T * hop,) float32
    gaze = pose.gaze(landmarks, head)  # (T, 2) degrees
    pose_array = np.column_stack([head.yaw, head.pitch, head.roll, head.translation, head.scale]).astype(np.float32)
    members = {
        "mp4": _mp4_bytes(crops, cfg),
        "wav": _wav_bytes(sound, cfg.sample_rate),
        "pose.npy": _npy(pose_array),  # (T, 7) POSE_COLUMNS
        "landmarks.npy": _npy(face.transform_points(landmarks, transforms).astype(np.float16)),  # (T, 478, 3) crop px
        "gaze.npy": _npy(gaze.astype(np.float32)),  # (T, 2) theta, phi degrees, relative to the head
        "expression.npy": _npy(pose.expression(landmarks, head).astype(np.float32)),
        "mel.npy": _npy(audio.log_mel(sound, cfg.sample_rate, cfg.fps, cfg.audio)),  # (T * k, n_mels)
    }
    if cfg.audio.encoder_dir:
        encoder = audio.get_encoder(cfg.audio.encoder_dir)
        members["speech.npy"] = _npy(encoder.encode(sound, cfg.sample_rate, cfg.fps))  # (T, D)
    meta = {
        "key": key,
        "segment": [start, end],
        "n_frames": end - start,
        "fps": cfg.fps,
        "sample_rate": cfg.sample_rate,
        "crop_size": cfg.crop_size,
        "mel_frames_per_video_frame": audio.mel_frames_per_video_frame(cfg.sample_rate, cfg.fps, cfg.audio.hop_length),
        "pose_columns": list(POSE_COLUMNS),
        "expression_columns": list(pose.EXPRESSION_COLUMNS),
        "main_gaze_deg": [round(float(v), 4) for v in pose.main_gaze(gaze)],
        # VASA-1's head distance d: face scale (eye-corner distance, px) relative to the source frame's
        # shorter side; larger = closer to the camera.
        "head_distance": round(float(np.nanmedian(head.scale)) / min(clip.frames.shape[1:3]), 6),
        "frames_rejected": outcome.frame_rejections,
        "provenance": {column: row.get(column) for column in PROVENANCE_COLUMNS},
    }
    members["json"] = json.dumps(meta, sort_keys=True, default=_plain).encode()
    outcome.samples.append(Sample(key, members, frames=end - start, seconds=(end - start) / cfg.fps))


def _failure(row: dict, status: str, reason: str, detail: str, key: str | None = None) -> dict:
    return {
        "clip_id": row["clip_id"],
        "key": key or row["key"],
        "status": status,
        "reason": reason,
        "detail": detail,
        "split": row["split"],
    }


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _wav_bytes(sound: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV (lossless for training, readable by every audio library)."""
    import wave

    pcm = np.clip(np.round(sound * 32767), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _mp4_bytes(crops: np.ndarray, cfg: PreprocessConfig) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "crop.mp4"
        write_mp4(path, crops, cfg.fps, crf=cfg.crop_crf, preset=cfg.crop_preset)
        return path.read_bytes()


def _plain(value):
    """JSON for numpy scalars in provenance (parquet ints come back as numpy types)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
