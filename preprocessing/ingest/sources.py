"""Manifest rows (before probing) for the embedded sample corpus and for a local folder of videos."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from preprocessing.ingest import manifest
from vasa.config import LocalSourceConfig
from vasa.errors import InputError


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
    CSV rows naming files that are not there become `missing_media` rows, unusable rows
    `bad_metadata`; rows naming other existing files (images, audio) are not clips and are skipped.
    """
    if not root.is_dir():
        raise SourceError(f"{root}: local source folder not found")
    extensions = {e.lower() for e in cfg.extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    entries, rows = _read_csv(csv_path, cfg) if csv_path else ({}, [])
    for path in files:
        relative = path.relative_to(root).as_posix()
        entry = entries.pop(relative, {})
        speaker = entry.get("speaker_id") or (
            path.parent.relative_to(root).as_posix() if path.parent != root else path.stem
        )
        rows.append(
            manifest.new_row(
                f"local:{relative}",
                "local",
                speaker_id=speaker,
                licence=entry.get("licence") or cfg.default_licence,
                source_url=entry.get("source_url") or None,
                media_path=str(path),
                metadata_path=str(csv_path) if entry else None,
                split="test" if cfg.split == "test" else "train",
            )
        )
    for relative, entry in sorted(entries.items()):
        if (root / relative).is_file():
            continue  # listed but not a video (an image, a wav): not a clip
        rows.append(
            manifest.new_row(
                f"local:{relative}",
                "local",
                speaker_id=entry.get("speaker_id") or "",
                licence=entry.get("licence") or cfg.default_licence,
                metadata_path=str(csv_path),
                media_path=str(root / relative),
                status=manifest.MISSING_MEDIA,
                error="listed in the CSV, not found",
            )
        )
    return rows


def _read_csv(csv_path: Path, cfg: LocalSourceConfig) -> tuple[dict[str, dict], list[dict]]:
    """(entries by relative file path, rows for unusable CSV lines)."""
    try:
        handle = csv_path.open(newline="")
    except OSError as err:
        raise SourceError(f"{csv_path}: cannot read metadata CSV: {err}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if cfg.csv_columns["file"] not in header:
            raise SourceError(f"{csv_path}: no column {cfg.csv_columns['file']!r} (columns: {header})")
        entries: dict[str, dict] = {}
        bad: list[dict] = []
        for line, record in enumerate(reader, start=2):
            name = (record.get(cfg.csv_columns["file"]) or "").strip()
            fields = {ours: (record.get(theirs) or "").strip() for ours, theirs in cfg.csv_columns.items()}
            if not name or Path(name).is_absolute() or ".." in Path(name).parts or name in entries:
                reason = "empty" if not name else "duplicate" if name in entries else "unsafe"
                clip_id = f"local:{csv_path.name}:line{line}"
                bad.append(
                    manifest.new_row(
                        clip_id,
                        "local",
                        speaker_id=fields.get("speaker_id", ""),
                        licence=cfg.default_licence,
                        metadata_path=str(csv_path),
                        status=manifest.BAD_METADATA,
                        error=f"line {line}: {reason} file name {name!r}",
                    )
                )
                continue
            entries[Path(name).as_posix()] = fields
    return entries, bad
