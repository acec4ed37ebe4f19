"""The ingest manifest: one parquet row per clip, the record every later stage and audit reads.

Rows are keyed by `clip_id`, a readable id derived from the clip's source identity
("voxceleb2:id00017/_mjZ87sK6cA/00001", "local:speaker/file.mp4", "sample:astronaut_000"), never
from its position. The file holds no wall-clock time and no credentials; rows are sorted by clip_id
and written with a fixed schema, so the same inputs give a byte-identical file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Status values. Anything but OK is excluded downstream and explained in `error`.
OK = "ok"
UNREADABLE = "unreadable_media"  # corrupt, truncated, zero bytes, unknown container
NO_VIDEO = "no_video"  # e.g. an audio-only file
MISSING_AUDIO = "missing_audio"  # a video without an audio track: useless for audio-driven training
BAD_METADATA = "bad_metadata"  # unparsable metadata file or CSV row
MISSING_MEDIA = "missing_media"  # metadata points at media that is not there
UNSAFE_MEMBER = "unsafe_archive_member"  # zip-slip path, symlink or device in an archive
UNAVAILABLE = "unavailable"  # YouTube reference video gone or unreachable
DOWNLOAD_FAILED = "download_failed"  # archive part failed after retries (or wrong checksum)
STATUSES = (
    OK,
    UNREADABLE,
    NO_VIDEO,
    MISSING_AUDIO,
    BAD_METADATA,
    MISSING_MEDIA,
    UNSAFE_MEMBER,
    UNAVAILABLE,
    DOWNLOAD_FAILED,
)

SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("key", pa.string()),  # 16 hex chars of sha1(clip_id): file-name and shard-key safe
        ("source_kind", pa.string()),  # sample | local | voxceleb2 | youtube
        ("speaker_id", pa.string()),
        ("source_url", pa.string()),
        ("youtube_id", pa.string()),
        ("utterance", pa.string()),
        ("media_path", pa.string()),
        ("metadata_path", pa.string()),
        ("frame_start", pa.int32()),  # first/last FRAME of the metadata track (25 fps, source video)
        ("frame_end", pa.int32()),
        ("track_frames", pa.int32()),
        ("bbox_x", pa.float32()),  # mean track box; units in bbox_units
        ("bbox_y", pa.float32()),
        ("bbox_w", pa.float32()),
        ("bbox_h", pa.float32()),
        ("bbox_units", pa.string()),  # "fraction" (VoxCeleb2) | "pixel" (VoxCeleb1)
        ("av_offset", pa.int32()),  # VoxCeleb "Offset": audio-video sync offset in frames
        ("licence", pa.string()),
        ("sha256", pa.string()),
        ("size_bytes", pa.int64()),
        ("duration_s", pa.float64()),
        ("n_frames", pa.int32()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("audio_sample_rate", pa.int32()),
        ("audio_channels", pa.int32()),
        ("split", pa.string()),  # train | test
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# Who and where a clip is from, and its metadata face track: carried to derived clips (YouTube re-cuts).
IDENTITY_COLUMNS = ("speaker_id", "youtube_id", "utterance", "source_url", "licence", "split", "metadata_path")
TRACK_COLUMNS = (
    "frame_start",
    "frame_end",
    "track_frames",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "bbox_units",
    "av_offset",
)


def clip_key(clip_id: str) -> str:
    return hashlib.sha1(clip_id.encode()).hexdigest()[:16]


def new_row(clip_id: str, source_kind: str, **fields) -> dict:
    """A manifest row with every column present (None where unknown)."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    row = dict.fromkeys(COLUMNS)
    row.update(clip_id=clip_id, key=clip_key(clip_id), source_kind=source_kind, status=OK, split="train")
    row.update(fields)
    return row


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of an existing manifest; [] if there is none yet."""
    path = Path(path)
    if not path.exists():
        return []
    table = pq.read_table(path)
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a manifest of this version, missing columns {sorted(missing)}")
    return table.select(list(COLUMNS)).to_pylist()


def write_manifest(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows sorted by clip_id with the fixed schema, atomically (a killed run keeps the old file)."""
    rows = sorted(rows, key=lambda row: row["clip_id"])
    ids = [row["clip_id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate clip_id in manifest rows")
    bad = sorted({row["status"] for row in rows} - set(STATUSES))
    if bad:
        raise ValueError(f"unknown statuses {bad}")
    table = pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=SCHEMA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp, compression="zstd", write_statistics=True)
    tmp.replace(path)


def merge(existing: Iterable[dict], fresh: Iterable[dict]) -> list[dict]:
    """Existing rows win unless the fresh row describes changed media (other sha256 or size), a
    changed split, or turns a failure into a success; rows never disappear (an audit must see every
    clip ever ingested).
    """
    merged = {row["clip_id"]: row for row in existing}
    for row in fresh:
        old = merged.get(row["clip_id"])
        if old is None or _changed(old, row):
            merged[row["clip_id"]] = row
    return list(merged.values())


def _changed(old: dict, new: dict) -> bool:
    if (old["sha256"], old["size_bytes"]) != (new["sha256"], new["size_bytes"]):
        return True
    if old["split"] != new["split"]:  # a speaker newly held out must leave training at once
        return True
    return old["status"] != OK and new["status"] == OK
