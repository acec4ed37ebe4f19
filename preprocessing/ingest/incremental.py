"""Re-runs that read only what changed, and never lose a row.

A clip's media is hashed and probed again unless the file is the one recorded last time: same
path, same size AND same modification time (nanoseconds). Size alone is not enough: a file
replaced in place by one of the same size (a re-encode at constant bitrate, a fixed copy) would
keep a stale sha256. The (size, mtime) seen when a file was hashed lives in a small state file
beside the manifest, not in the manifest, so the manifest's bytes depend only on the inputs'
content. Without a state entry (first run, state deleted) the file is hashed again: on doubt, re-hash.
VoxCeleb metadata files are handled alike: one parsed cleanly is read again only when its stamp
changed (its track columns come from the previous manifest row, see voxceleb.scan).

Rows of clips whose media has gone since they were ingested are kept and marked `missing_media`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from preprocessing.ingest import manifest
from vasa.core.files import write_json

# Rows whose media is hashed and inspected (a bad metadata file does not stop us probing its media).
PROBED_STATUSES = (manifest.OK, manifest.BAD_METADATA)
# Fields that come from the media file itself (probe.probe_media), reused when the file is unchanged.
MEDIA_FIELDS = (
    "sha256",
    "size_bytes",
    "duration_s",
    "n_frames",
    "fps",
    "width",
    "height",
    "audio_sample_rate",
    "audio_channels",
    "max_outside_fraction",  # recorded when a YouTube track was cut: kept while the cut is unchanged
)
STATE_VERSION = 1


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's content without reading it: size (bytes) and mtime (ns)."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return cls(info.st_size, info.st_mtime_ns)


def read_state(path: Path) -> dict[str, dict]:
    """clip_id -> {"media_path", "size", "mtime_ns"} as recorded when the media was last hashed."""
    return read_states(path)[0]


def read_states(path: Path) -> tuple[dict[str, dict], dict[str, FileStamp]]:
    """(media entries as `read_state` gives them, clip_id -> stamp of its metadata file when it
    was last parsed cleanly), from one read of the state file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}  # no state (or a damaged one): everything is re-read, which is always safe
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return {}, {}
    try:
        metadata = {cid: FileStamp(size, mtime) for cid, (size, mtime) in data.get("metadata", {}).items()}
    except (AttributeError, TypeError, ValueError):
        metadata = {}
    return data.get("files", {}), metadata


def write_state(
    path: Path, rows: Iterable[dict], stamps: dict[str, FileStamp], metadata: dict[str, FileStamp] | None = None
) -> None:
    """Record the stamp taken before hashing each probed row's media (clip ids are escaped UTF-8)
    and `metadata`: the stamps of this run's cleanly parsed metadata files (voxceleb.scan)."""
    files = {}
    for row in rows:
        stamp = stamps.get(row["clip_id"])
        if stamp is not None and row["sha256"]:
            media = manifest.escape_text(row["media_path"])
            files[row["clip_id"]] = {"media_path": media, "size": stamp.size, "mtime_ns": stamp.mtime_ns}
    parsed = {clip_id: [stamp.size, stamp.mtime_ns] for clip_id, stamp in (metadata or {}).items()}
    state = {"version": STATE_VERSION, "files": dict(sorted(files.items()))}
    if parsed:
        state["metadata"] = dict(sorted(parsed.items()))
    write_json(path, state)


def plan(rows: list[dict], existing: dict[str, dict], state: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Split fresh rows into (ready, to_probe).

    Ready: rows that need no probing (their status is decided already) and rows whose media is
    unchanged since it was probed; the latter get the recorded media facts and probe verdict,
    with this run's provenance (speaker, licence, split...). To probe: everything else.
    """
    ready, todo = [], []
    for row in rows:
        if row["status"] not in PROBED_STATUSES or not row["media_path"]:
            ready.append(row)
            continue
        old = existing.get(row["clip_id"])
        if old is not None and _unchanged(row, old, state.get(row["clip_id"])):
            verdict = {"status": old["status"], "error": old["error"]}
            if row["status"] != manifest.OK:  # this run's metadata verdict wins over the media's
                verdict = {"status": row["status"], "error": row["error"]}
            ready.append(row | {field: old[field] for field in MEDIA_FIELDS} | verdict)
        else:
            todo.append(row)
    return ready, todo


def _unchanged(row: dict, old: dict, recorded: dict | None) -> bool:
    if recorded is None or old["media_path"] != row["media_path"] or not old["sha256"]:
        return False
    if manifest.unescape_text(recorded.get("media_path", "")) != row["media_path"]:
        return False
    stamp = FileStamp.of(row["media_path"])
    return stamp == FileStamp(recorded.get("size"), recorded.get("mtime_ns")) and stamp.size == old["size_bytes"]


def mark_vanished(rows: Iterable[dict], fresh_ids: set[str]) -> list[dict]:
    """Rows kept from earlier runs (not produced this run) whose media file is gone become
    `missing_media`, keeping every recorded fact (sha256, size...) for the audit trail."""
    out = []
    for row in rows:
        if (
            row["clip_id"] not in fresh_ids
            and row["status"] == manifest.OK
            and row["media_path"]
            and not os.path.isfile(row["media_path"])
        ):
            row = row | {"status": manifest.MISSING_MEDIA, "error": "media file vanished since it was ingested"}
        out.append(row)
    return out
