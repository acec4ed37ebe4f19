"""Manifest rows (before probing) for the embedded sample corpus and for a local folder of videos."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path, PurePosixPath

from preprocessing.ingest import manifest
from preprocessing.schema import TEST, TRAIN
from vasa.core.config import LocalSourceConfig
from vasa.core.errors import InputError


class SourceError(InputError):
    """A source that cannot be read at all (missing folder, unusable CSV header)."""


def scan_sample(corpus_dir: Path) -> list[dict]:
    """One row per clip listed in the sample corpus's index.json, with its provenance."""
    index_path = corpus_dir / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{index_path}: no sample corpus here (run `vasa sample --out {corpus_dir}`)") from None
    except json.JSONDecodeError as err:
        raise SourceError(f"{index_path}: not valid JSON: {err}") from None
    rows = []
    for clip in index["clips"]:
        clip_id = f"sample:{clip['clip_id']}"
        try:
            record = json.loads((corpus_dir / f"{clip['clip_id']}.json").read_text())
            rows.append(
                manifest.new_row(
                    clip_id,
                    "sample",
                    speaker_id=record["speaker_id"],
                    source_url=f"{record['portrait']['package']}=={record['portrait']['package_version']}:"
                    f"{record['portrait']['asset']}",
                    utterance=record["clip_id"],
                    licence=record["licence"],
                    media_path=str(corpus_dir / record["file"]),
                    metadata_path=str(corpus_dir / f"{clip['clip_id']}.json"),
                    split=TEST if record.get("split") == TEST else TRAIN,  # held-out speech: never trained on
                )
            )
        except (OSError, KeyError, json.JSONDecodeError) as err:
            rows.append(
                manifest.new_row(
                    clip_id,
                    "sample",
                    speaker_id=clip.get("speaker_id", ""),
                    licence="unknown",
                    media_path=str(corpus_dir / clip.get("file", "")),
                    status=manifest.BAD_METADATA,
                    error=f"provenance record: {type(err).__name__}: {err}",
                )
            )
    return rows


def scan_local(root: Path, cfg: LocalSourceConfig, csv_path: Path | None) -> list[dict]:
    """One row per video file under `root` (by extension), with speaker, licence and source URL
    from the CSV where it lists the file. Without a CSV entry the speaker is the file's folder
    (relative to root; the file stem for files directly in root) and the licence cfg.default_licence.

    Nothing is skipped silently: CSV rows naming files that are not there become `missing_media`
    rows; unusable CSV rows (extra fields, unterminated quote, unsafe or duplicate names, `./x`
    naming the same file as `x`) `bad_metadata`; folders that cannot be listed `unreadable_path`;
    symlinked folders `skipped_link` (not followed: a link can loop or lead outside the source).
    CSV rows naming other existing files (images, audio) are not clips and are skipped. File names
    that are not valid UTF-8 appear escaped (manifest.escape_text) in clip ids.
    """
    if not root.is_dir():
        raise SourceError(f"{root}: local source folder not found")
    extensions = {e.lower() for e in cfg.extensions}
    found, rows = _walk(root)
    files = [p for p in found if p.suffix.lower() in extensions]
    entries, bad = _read_csv(csv_path, cfg) if csv_path else ({}, [])
    rows += bad
    for path in files:
        relative = path.relative_to(root).as_posix()
        entry = entries.pop(relative, {})
        speaker = entry.get("speaker_id") or (
            path.parent.relative_to(root).as_posix() if path.parent != root else path.stem
        )
        rows.append(
            manifest.new_row(
                f"local:{manifest.escape_text(relative)}",
                "local",
                speaker_id=manifest.printable(speaker),
                licence=entry.get("licence") or cfg.default_licence,
                source_url=entry.get("source_url") or None,
                media_path=str(path),
                metadata_path=str(csv_path) if entry else None,
                split=cfg.split,
            )
        )
    for relative, entry in sorted(entries.items()):
        if (root / relative).is_file():
            continue  # listed but not a video (an image, a wav): not a clip
        rows.append(
            manifest.new_row(
                f"local:{manifest.escape_text(relative)}",
                "local",
                speaker_id=entry.get("speaker_id") or "",
                licence=entry.get("licence") or cfg.default_licence,
                metadata_path=str(csv_path),
                media_path=str(root / relative),
                split=cfg.split,
                status=manifest.MISSING_MEDIA,
                error=f"line {entry['line']}: listed in the CSV, not found",
            )
        )
    return rows


def _walk(root: Path) -> tuple[list[Path], list[dict]]:
    """(regular files under root, sorted; rows for folders that were not entered)."""
    files: list[Path] = []
    rows: list[dict] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            rows.append(_folder_row(root, folder, manifest.UNREADABLE_PATH, f"cannot list folder: {err.strerror}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_symlink() and entry.is_dir():
                    target = os.readlink(path)
                    reason = f"symbolic link to a folder ({target}): not followed; pass the target as --local-dir"
                    rows.append(_folder_row(root, path, manifest.SKIPPED_LINK, reason))
                elif entry.is_file():
                    files.append(path)
            except OSError as err:
                rows.append(_folder_row(root, path, manifest.UNREADABLE_PATH, f"cannot inspect: {err.strerror}"))
    return sorted(files), rows


def _folder_row(root: Path, folder: Path, status: str, error: str) -> dict:
    relative = folder.relative_to(root).as_posix()
    return manifest.new_row(
        f"local:{manifest.escape_text(relative)}/",
        "local",
        speaker_id=manifest.printable(folder.name),
        licence="",
        media_path=str(folder),
        status=status,
        error=manifest.printable(error),
    )


def _read_csv(csv_path: Path, cfg: LocalSourceConfig) -> tuple[dict[str, dict], list[dict]]:
    """(entries by normalised relative file path, rows for unusable CSV lines).

    Reads UTF-8 (with or without the BOM Excel writes) and falls back to Latin-1, which decodes
    any bytes, for files from older tools. Each entry carries the CSV line it came from.
    """
    try:
        raw = csv_path.read_bytes()
    except OSError as err:
        raise SourceError(f"{csv_path}: cannot read metadata CSV: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [column.strip() for column in next(reader)]
    except (StopIteration, csv.Error):
        header = []
    if cfg.csv_columns["file"] not in header:
        raise SourceError(f"{csv_path}: no column {cfg.csv_columns['file']!r} (columns: {header})")
    index = {theirs: header.index(theirs) for theirs in cfg.csv_columns.values() if theirs in header}
    entries: dict[str, dict] = {}
    bad: list[dict] = []

    def reject(line: int, reason: str, speaker: str = "") -> None:
        bad.append(
            manifest.new_row(
                f"local:{manifest.escape_text(csv_path.name)}:line{line}",
                "local",
                speaker_id=speaker,
                licence=cfg.default_licence,
                metadata_path=str(csv_path),
                status=manifest.BAD_METADATA,
                error=f"line {line}: {reason}",
            )
        )

    while True:
        line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            last = reader.line_num
            unterminated = "end of data" in str(err)  # a quote never closed swallows the rest of the file
            what = "unterminated quote" if unterminated else "unparsable CSV"
            reject(line, f"{what} ({err})" + (f", lines {line}-{last} lost" if last > line else ""))
            if unterminated:
                break
            continue
        if not any(field.strip() for field in record):
            continue  # a blank line
        fields = {
            ours: record[index[theirs]].strip()
            for ours, theirs in cfg.csv_columns.items()
            if theirs in index and index[theirs] < len(record)
        }
        if len(record) != len(header):
            reject(line, f"{len(record)} fields, the header has {len(header)}", fields.get("speaker_id", ""))
            continue
        name = fields.get("file", "").replace("\\", "/")
        normal = PurePosixPath(name)
        if not name or normal.is_absolute() or ".." in normal.parts or not normal.parts:
            reject(line, f"{'empty' if not name else 'unsafe'} file name {name!r}", fields.get("speaker_id", ""))
            continue
        key = normal.as_posix()  # "./x" and "x//y" name the same file as "x" and "x/y"
        if key in entries:
            reject(
                line, f"duplicate of line {entries[key]['line']} ({name!r} names {key!r})", fields.get("speaker_id", "")
            )
            continue
        entries[key] = fields | {"line": line}
    return entries, bad
