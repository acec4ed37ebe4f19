"""What the evaluation judges see of a clip, read from the shards: mouth crops, log-mel and head pose.

    shard sample -> crop mp4 (crop pixels) + landmarks.npy (FaceMesh, crop pixels) -> one mouth box per
    frame (lip landmarks; one box size per clip) -> (T, MOUTH_H, MOUTH_W) grey uint8
                 -> mel.npy (T * k, n_mels) -> (T, k * n_mels) float32, frame t's mel frames in row t
                 -> pose.npy yaw/pitch/roll (T, 3) degrees

The same functions turn a generated video into judge inputs (FaceMesh landmarks and
`preprocessing.pose` run on its frames), so real and generated video are measured alike.

Which clips are evaluation clips: the test split (held-out speakers), else val; a corpus with a train
split only (the sample corpus) holds out the last clip (by clip id) of every speaker, as the demo stage
picks them. The judges never train on evaluation clips.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from preprocessing import schema
from vasa.core.errors import InputError
from vasa.loaders.shards import ShardSet, decode_frames, read_samples

log = logging.getLogger(__name__)

MOUTH_H, MOUTH_W = 32, 48  # judge input: grey mouth crop, pixels
MOUTH_BOX_SCALE = 1.8  # mouth box width / lip-corner distance (room for an open mouth and the chin line)
# FaceMesh's outer lip contour (mediapipe FACEMESH_LIPS, outer ring); 61 and 291 are the corners.
OUTER_LIP = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIP_CORNERS = (61, 291)


@dataclass
class JudgeClip:
    """One clip as the judges read it (T frames each)."""

    key: str
    clip_id: str
    speaker: str
    mouths: np.ndarray  # (T, MOUTH_H, MOUTH_W) uint8 grey
    mel: np.ndarray  # (T, k * n_mels) float32 raw log-mel
    angles: np.ndarray  # (T, 3) yaw, pitch, roll in degrees (NaN where no face)
    frames: np.ndarray | None = None  # (T, S, S, 3) uint8 crop frames, kept when asked for
    wav: bytes | None = None  # the sample's wav member, kept when asked for


def mouth_crops(frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames + (T, 478, 3) landmarks in their pixels -> (T, MOUTH_H, MOUTH_W) grey
    uint8 mouth crops. The box follows the lip centre per frame; its size is one per clip (median lip
    width), so mouth opening shows as shape, not as zoom. Frames without landmarks take the nearest
    measured box. ValueError when no frame has lips."""
    lips = landmarks[:, list(OUTER_LIP), :2].astype(np.float64)  # (T, L, 2)
    centre = lips.mean(axis=1)  # (T, 2)
    width = np.linalg.norm(landmarks[:, LIP_CORNERS[0], :2] - landmarks[:, LIP_CORNERS[1], :2], axis=-1)
    valid = np.isfinite(centre).all(axis=1) & np.isfinite(width)
    if not valid.any():
        raise ValueError("no frame with lip landmarks")
    index = np.arange(len(frames))
    centre = np.stack([np.interp(index, index[valid], centre[valid, i]) for i in range(2)], axis=1)
    box_w = MOUTH_BOX_SCALE * float(np.median(width[valid]))
    scale = MOUTH_W / box_w
    out = np.empty((len(frames), MOUTH_H, MOUTH_W), np.uint8)
    for t, frame in enumerate(frames):
        x0, y0 = centre[t, 0] - MOUTH_W / scale / 2, centre[t, 1] - MOUTH_H / scale / 2
        warp = np.array([[scale, 0, -scale * x0], [0, scale, -scale * y0]], np.float64)
        grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        out[t] = cv2.warpAffine(grey, warp, (MOUTH_W, MOUTH_H), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    return out


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_judge_clip(sample: dict[str, bytes], keep_media: bool = False) -> JudgeClip:
    """A shard sample -> JudgeClip (mouth crops from its own landmarks). KeyError/ValueError when a member
    is missing or unusable."""
    meta = json.loads(sample[schema.JSON])
    provenance = meta.get("provenance") or {}
    mp4 = sample[schema.MP4]
    frames = decode_frames(mp4, crop_side(mp4))
    landmarks = _npy(sample[schema.LANDMARKS]).astype(np.float32)
    pose = _npy(sample[schema.POSE]).astype(np.float32)
    mel = _npy(sample[schema.MEL]).astype(np.float32)
    per_frame = max(1, round(len(mel) / max(len(pose), 1)))
    t = min(len(frames), len(landmarks), len(pose), len(mel) // per_frame)
    if t < 1:
        raise ValueError("no frame with video, landmarks, pose and mel")
    return JudgeClip(
        key=sample["__key__"],
        clip_id=str(provenance.get("clip_id", sample["__key__"])),
        speaker=str(provenance.get("speaker_id", "")),
        mouths=mouth_crops(frames[:t], landmarks[:t]),
        mel=mel[: t * per_frame].reshape(t, per_frame * mel.shape[1]),
        angles=pose[:t, :3].copy(),
        frames=frames[:t] if keep_media else None,
        wav=sample.get(schema.WAV) if keep_media else None,
    )


def crop_side(mp4: bytes) -> int:
    """The coded frame side of a crop mp4 (square): decoding at it keeps the landmarks' pixel frame."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return int(container.streams.video[0].codec_context.width)


def evaluation_set(shard_set: ShardSet) -> tuple[str, str, tuple[Path, ...], set[str]]:
    """(name, why, shards to read, sample keys) of the evaluation clips (see the module docstring)."""
    for split in (schema.TEST, schema.VAL):
        shards = shard_set.splits.get(split, ())
        if shards:
            keys = {sample["__key__"] for path in shards for sample in _keys_only(path)}
            return split, f"the {split} split (clips never trained on)", shards, keys
    last: dict[str, tuple[str, str]] = {}
    for path in shard_set.train:
        for sample in _keys_only(path):
            speaker, clip_id = sample["speaker"], sample["clip_id"]
            if speaker not in last or clip_id > last[speaker][0]:
                last[speaker] = (clip_id, sample["__key__"])
    keys = {key for _, key in last.values()}
    why = (
        "no test/val split: the last clip of every train speaker (the demo stage's clips); the judges never "
        "train on them, the bundle did"
    )
    return "train_last_clip_per_speaker", why, shard_set.train, keys


def _keys_only(path: Path):
    """{__key__, speaker, clip_id} of each sample of a shard, without decoding media."""
    import tarfile

    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(f".{schema.JSON}"):
                meta = json.loads(tar.extractfile(member).read())
                provenance = meta.get("provenance") or {}
                key = member.name[: -len(schema.JSON) - 1]
                yield {
                    "__key__": key,
                    "speaker": str(provenance.get("speaker_id", "")),
                    "clip_id": str(provenance.get("clip_id", key)),
                }


def load_clips(shards: tuple[Path, ...], keys: set[str] | None, exclude: set[str], keep_media: bool = False):
    """JudgeClips of the given shards, in shard and tar order: only `keys` (None = all), never `exclude`.
    Unusable samples are logged and skipped."""
    clips = []
    for path in shards:
        for sample in read_samples(path):
            key = sample["__key__"]
            if key in exclude or (keys is not None and key not in keys):
                continue
            try:
                clips.append(read_judge_clip(sample, keep_media))
            except (KeyError, ValueError) as err:
                log.warning("%s: sample %s left out of the judges' data: %s", path.name, key, err)
    if not clips:
        raise InputError(f"no usable clips in {[p.name for p in shards][:5]}")
    return clips


def mel_stats(clips: list[JudgeClip]) -> dict[str, list[float]]:
    """Mean/std of every (k * n_mels) audio column over the clips' frames (float64 sums: deterministic)."""
    stacked = np.concatenate([c.mel for c in clips]).astype(np.float64)
    std = stacked.std(0)
    return {"mean": stacked.mean(0).tolist(), "std": np.where(std < 1e-4, 1.0, std).tolist()}


def normalise_mel(mel: np.ndarray, stats: dict) -> np.ndarray:
    return ((mel - np.asarray(stats["mean"])) / np.asarray(stats["std"])).astype(np.float32)
