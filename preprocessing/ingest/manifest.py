"""The ingest manifest: one parquet row per clip, the record every later stage and audit reads.

Rows are keyed by `clip_id`, a readable id derived from the clip's source identity
("voxceleb2:id00017/_mjZ87sK6cA/00001", "local:speaker/file.mp4", "sample:astronaut_000"), never
from its position. The file holds no wall-clock time and no credentials; rows are sorted by clip_id
and written with a fixed schema, so the same inputs give a byte-identical file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.denylist import TAKEN_DOWN
from preprocessing.schema import SPLITS, TRAIN
from vasa.core.errors import InputError

# Status values. Anything but OK is excluded downstream and explained in `error`.
OK = "ok"
UNREADABLE = "unreadable_media"  # corrupt, truncated, zero bytes, unknown container
NO_VIDEO = "no_video"  # e.g. an audio-only file
MISSING_AUDIO = "missing_audio"  # a video without an audio track: useless for audio-driven training
BAD_METADATA = "bad_metadata"  # unparsable metadata file or CSV row
MISSING_MEDIA = "missing_media"  # metadata points at media that is not there
UNSAFE_MEMBER = "unsafe_archive_member"  # zip-slip path, symlink, device or duplicate in an archive
BAD_ARCHIVE = "bad_archive"  # a whole archive refused: unreadable, corrupt, or over the size limits (zip bomb)
UNREADABLE_PATH = "unreadable_path"  # a source folder that cannot be listed (permission denied)
SKIPPED_LINK = "skipped_link"  # a symlinked folder in a local source: not followed (loops, escapes)
UNAVAILABLE = "unavailable"  # YouTube reference video gone or unreachable
DOWNLOAD_FAILED = "download_failed"  # archive part failed after retries (or wrong checksum)
# TAKEN_DOWN (preprocessing.denylist): covered by a takedown request; never downloaded, probed or sharded
STATUSES = (
    OK,
    UNREADABLE,
    NO_VIDEO,
    MISSING_AUDIO,
    BAD_METADATA,
    MISSING_MEDIA,
    UNSAFE_MEMBER,
    BAD_ARCHIVE,
    UNREADABLE_PATH,
    SKIPPED_LINK,
    UNAVAILABLE,
    DOWNLOAD_FAILED,
    TAKEN_DOWN,
)

SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("key", pa.string()),  # 16 hex chars of sha1(clip_id): file-name and shard-key safe
        ("source_kind", pa.string()),  # sample | local | voxceleb2 | youtube | hdtf | celebvhq | talkvid
        ("speaker_id", pa.string()),
        ("source_url", pa.string()),
        ("youtube_id", pa.string()),
        ("utterance", pa.string()),
        ("media_path", pa.string()),  # stored relative to the manifest's folder, absolute once read
        ("metadata_path", pa.string()),  # likewise
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
        # YouTube re-cuts: largest share of a crop that fell outside the source video's frame (black
        # border), from the cut; null for other sources, and for a cut an interrupted run did not record.
        ("max_outside_fraction", pa.float32()),
        ("split", pa.string()),  # schema.SPLITS: train | val | test (whole speakers)
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# Columns added after manifests were first versioned: an older manifest (a promoted one in the DVC
# cache, read by `vasa retrain` and `vasa audit --history`) has none and reads as null there.
ADDED_COLUMNS = ("max_outside_fraction",)
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


PATH_COLUMNS = ("media_path", "metadata_path")
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")


class ManifestNotFoundError(InputError):
    """The manifest file named does not exist (a mistyped path must never read as an empty manifest)."""


def escape_text(text: str) -> str:
    """A valid-UTF-8, reversible form of `text` (see `unescape_text`).

    File names are bytes on POSIX; Python hands undecodable bytes over as lone surrogates
    (surrogateescape), which parquet (UTF-8 only) cannot store. Each such byte becomes `\\xHH` and a
    literal backslash becomes `\\\\`, so the original name is recovered exactly and every clean name
    without a backslash is stored unchanged.
    """
    if "\\" not in text and not _has_surrogates(text):
        return text
    return "".join(
        "\\\\" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text
    )


def unescape_text(text: str) -> str:
    """Inverse of `escape_text`: `\\xHH` back to the surrogate of byte HH, `\\\\` back to one backslash."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: "\\" if m[1] == "\\" else chr(0xDC00 + int(m[1][1:], 16)), text)


def printable(text: str) -> str:
    """`text` made storable for free-text columns (errors, speakers): undecodable bytes as `\\xHH`."""
    return (
        text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(text) else text
    )


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def clip_key(clip_id: str) -> str:
    return hashlib.sha1(clip_id.encode()).hexdigest()[:16]


def new_row(clip_id: str, source_kind: str, **fields) -> dict:
    """A manifest row with every column present (None where unknown).

    `clip_id` must already be valid UTF-8 (build it with `escape_text` from file names).
    """
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not manifest columns: {sorted(unknown)}")
    row = dict.fromkeys(COLUMNS)
    row.update(clip_id=clip_id, key=clip_key(clip_id), source_kind=source_kind, status=OK, split=TRAIN)
    row.update(fields)
    return row


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of the manifest at `path`, with `media_path`/`metadata_path` as absolute paths.

    Stored paths are relative to the manifest's folder (or absolute), so the manifest can be read
    from any working directory and moved together with its media. Raises ManifestNotFoundError
    if `path` does not exist, InputError if it is not a manifest of this version.
    """
    return row_dicts(read_table(path))


def read_table(path: str | Path) -> pa.Table:
    """`read_manifest` as an Arrow table of COLUMNS (a few hundred bytes per row, where the rows as
    dicts take a few KB: what a driver holding a VoxCeleb2-size manifest keeps). Path columns are
    absolute but stay escaped (`escape_text`: Arrow strings are UTF-8 only, file names are bytes);
    `row_dicts` turns rows back into dicts with real file names."""
    path = Path(path)
    if not path.is_file():
        raise ManifestNotFoundError(f"{path}: manifest not found (run `vasa ingest` first, or check the path)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a readable parquet manifest: {err}") from None
    for column in ADDED_COLUMNS:  # manifests written before a column existed read as null there
        if column not in table.column_names:
            table = table.append_column(SCHEMA.field(column), pa.nulls(table.num_rows, SCHEMA.field(column).type))
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise InputError(f"{path}: not a manifest of this version, missing columns {sorted(missing)}")
    base = str(path.parent.absolute())
    table = table.select(list(COLUMNS))
    for column in PATH_COLUMNS:
        stored = table.column(column).to_pylist()
        resolved = [escape_text(os.path.normpath(os.path.join(base, unescape_text(v)))) if v else v for v in stored]
        table = table.set_column(COLUMNS.index(column), column, pa.array(resolved, pa.string()))
    return table


def to_table(rows: Iterable[dict]) -> pa.Table:
    """Manifest rows (as `new_row` or `read_manifest` gives them) as a table like `read_table`'s."""
    escaped = [row | {c: escape_text(row[c]) for c in PATH_COLUMNS if row.get(c)} for row in rows]
    return pa.Table.from_pylist(escaped, schema=SCHEMA)


def row_dicts(table: pa.Table) -> list[dict]:
    """Rows of a manifest table (`read_table`, `to_table`) as dicts, path columns as real file names."""
    rows = table.to_pylist()
    for row in rows:
        for column in PATH_COLUMNS:
            if row.get(column):
                row[column] = unescape_text(row[column])
    return rows


def read_existing(path: str | Path) -> list[dict]:
    """`read_manifest`, or [] when there is no manifest yet (only for ingest, which creates it)."""
    return read_manifest(path) if Path(path).exists() else []


def write_manifest(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows sorted by clip_id with the fixed schema, atomically (a killed run keeps the old file).

    Path columns are stored relative to the manifest's folder (escaped, see `escape_text`), so the
    bytes do not depend on where the tree lives and `read_manifest` resolves them from anywhere.
    """
    path = Path(path)
    rows = sorted(rows, key=lambda row: row["clip_id"])
    ids = [row["clip_id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate clip_id in manifest rows")
    bad = sorted({row["status"] for row in rows} - set(STATUSES))
    if bad:
        raise ValueError(f"unknown statuses {bad}")
    splits = sorted({row["split"] for row in rows} - set(SPLITS))
    if splits:
        raise ValueError(f"unknown splits {splits}; expected one of {SPLITS}")
    base = path.parent.absolute()
    table = pa.Table.from_pylist([_stored(row, base) for row in rows], schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp, compression="zstd", write_statistics=True)
    tmp.replace(path)


def _stored(row: dict, base: Path) -> dict:
    stored = {}
    for column in COLUMNS:
        value = row[column]
        if column in PATH_COLUMNS and value:
            value = escape_text(_relative(value, base))
        elif isinstance(value, str):
            value = printable(value)
        stored[column] = value
    return stored


def _relative(value: str, base: Path) -> str:
    absolute = os.path.abspath(value)
    try:
        return Path(os.path.relpath(absolute, base)).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path can name it
        return absolute


def merge(existing: Iterable[dict], fresh: Iterable[dict]) -> list[dict]:
    """Fresh rows (this run's view of a clip: provenance, split and media facts) replace existing
    ones; rows not seen this run stay: rows never disappear (an audit must see every clip ever
    ingested). See `incremental.mark_vanished` for rows whose media has gone since.
    """
    merged = {row["clip_id"]: row for row in existing}
    merged.update((row["clip_id"], row) for row in fresh)
    return list(merged.values())
