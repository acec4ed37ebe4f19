"""VoxCeleb2 as distributed: the `idXXXXX/<youtube id>/NNNNN` layout and its metadata files.

Media: `[dev|test/]mp4/idXXXXX/<youtube id>/NNNNN.mp4` (224x224, 25 fps, H.264 + 16 kHz AAC).
Metadata: `txt/idXXXXX/<youtube id>/NNNNN.txt`, tab separated:

    Identity  :	id00017
    Reference :	_mjZ87sK6cA
    Offset    :	2
    FV Conf   :	16.140	(1)
    ASD Conf  :	5.142

    FRAME 	X 	Y 	W 	H
    008809 	0.123 	0.136 	0.422 	0.749

FRAME is a 25 fps frame index into the YouTube video; X Y W H are fractions of its frame size in
VoxCeleb2 and pixels in VoxCeleb1 (told apart by their range). Column names carry trailing spaces.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.ingest import manifest
from preprocessing.ingest.incremental import FileStamp

SPEAKER_RE = re.compile(r"^id\d{5}$")
YOUTUBE_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")
UTTERANCE_RE = re.compile(r"^\d{5}$")


class MetadataError(ValueError):
    """A metadata file that does not follow the VoxCeleb format."""


@dataclass(frozen=True)
class Utterance:
    """Where one utterance sits: speaker, YouTube video and utterance number, and its split."""

    speaker_id: str
    youtube_id: str
    utterance: str
    split: str  # "test" if the path lies under a test folder, else "train"

    @property
    def clip_id(self) -> str:
        return f"voxceleb2:{self.speaker_id}/{self.youtube_id}/{self.utterance}"


@dataclass(frozen=True)
class Track:
    """A parsed metadata file."""

    speaker_id: str
    youtube_id: str
    offset: int  # audio-video offset in frames
    fv_conf: float | None
    asd_conf: float | None
    frames: np.ndarray  # (N,) int, 25 fps frame indices in the source video
    boxes: np.ndarray  # (N, 4) float [x, y, w, h]
    units: str  # "fraction" | "pixel"

    def summary(self) -> dict:
        """Manifest fields describing the track."""
        mean = self.boxes.mean(axis=0)
        return {
            "frame_start": int(self.frames[0]),
            "frame_end": int(self.frames[-1]),
            "track_frames": len(self.frames),
            "bbox_x": float(mean[0]),
            "bbox_y": float(mean[1]),
            "bbox_w": float(mean[2]),
            "bbox_h": float(mean[3]),
            "bbox_units": self.units,
            "av_offset": self.offset,
        }


def parse_utterance_path(relative: str) -> Utterance:
    """Map `[<archive>/][dev|test/][mp4|txt/]idXXXXX/<youtube id>/NNNNN.<ext>` to its parts; the
    split is "test" under a `test` folder or a folder named after a test archive (vox2_test_*)."""
    parts = Path(relative).parts
    if len(parts) < 3:
        raise MetadataError(f"{relative}: expected idXXXXX/<youtube id>/NNNNN.<ext>")
    speaker, youtube_id, stem = parts[-3], parts[-2], Path(parts[-1]).stem
    if not SPEAKER_RE.match(speaker) or not YOUTUBE_RE.match(youtube_id) or not UTTERANCE_RE.match(stem):
        raise MetadataError(
            f"{relative}: expected idXXXXX/<11-char youtube id>/NNNNN, got {speaker}/{youtube_id}/{stem}"
        )
    split = "test" if any(_is_test_folder(p) for p in parts[:-3]) else "train"
    return Utterance(speaker, youtube_id, stem, split)


def _is_test_folder(name: str) -> bool:
    """`test/` in the release layout, or the folder an archive like vox2_test_mp4.zip was extracted to."""
    name = name.lower()
    return name == "test" or name.startswith(("vox2_test", "vox1_test"))


def parse_metadata(text: str) -> Track:
    """Parse one metadata file. Raises MetadataError naming the first bad line."""
    header: dict[str, str] = {}
    rows: list[list[str]] = []
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not in_table:
            if line.split() and line.split()[0] == "FRAME":
                columns = [c.strip() for c in line.split()]
                if columns != ["FRAME", "X", "Y", "W", "H"]:
                    raise MetadataError(f"line {number}: expected columns FRAME X Y W H, got {columns}")
                in_table = True
            elif ":" in line:
                key, _, value = line.partition(":")
                header[key.strip().lower()] = value.strip()
            else:
                raise MetadataError(f"line {number}: expected `Key : value`, got {line!r}")
            continue
        fields = line.split()
        if len(fields) != 5:
            raise MetadataError(f"line {number}: expected 5 fields, got {len(fields)}: {line!r}")
        rows.append(fields)
    if not rows:
        raise MetadataError("no FRAME table (or an empty one)")
    try:
        frames = np.array([int(r[0]) for r in rows], dtype=np.int64)
        boxes = np.array([[float(v) for v in r[1:]] for r in rows], dtype=np.float64)
        offset = int(header.get("offset", "0"))
    except ValueError as err:
        raise MetadataError(f"non-numeric value: {err}") from None
    if np.any(np.diff(frames) <= 0):
        raise MetadataError("FRAME indices are not strictly increasing")
    if not np.all(np.isfinite(boxes)) or np.any(boxes[:, 2:] <= 0) or np.any(boxes < 0):
        raise MetadataError("boxes must be finite, non-negative, with positive width and height")
    speaker, youtube_id = header.get("identity", ""), header.get("reference", "")
    if not SPEAKER_RE.match(speaker) or not YOUTUBE_RE.match(youtube_id):
        raise MetadataError(f"bad Identity/Reference header: {speaker!r} / {youtube_id!r}")
    return Track(
        speaker_id=speaker,
        youtube_id=youtube_id,
        offset=offset,
        fv_conf=_first_float(header.get("fv conf")),
        asd_conf=_first_float(header.get("asd conf")),
        frames=frames,
        boxes=boxes,
        units="fraction" if boxes.max() <= 1.0 + 1e-6 else "pixel",
    )


def _first_float(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value.split()[0])
    except ValueError:
        return None


def find_files(root: Path, folders: tuple[str, ...] = ("mp4", "txt")) -> dict[str, dict[str, Path]]:
    """For each folder name F (also the suffix), every `<root>/**/F/idXXXXX/<yt>/NNNNN.F`, keyed by its
    path relative to root, in one walk of the tree (symlinked folders are not followed)."""
    found: dict[str, dict[str, Path]] = {folder: {} for folder in folders}
    for folder, _, names in os.walk(root):
        for name in names:
            suffix = name.rpartition(".")[2]
            if suffix not in found or name == f".{suffix}":
                continue
            path = Path(folder, name)
            relative = path.relative_to(root)
            if suffix in relative.parts[:-3] and path.is_file():
                found[suffix][relative.as_posix()] = path
    return {folder: dict(sorted(files.items())) for folder, files in found.items()}


def scan(
    root: Path,
    licence: str,
    previous: Mapping[str, dict] | None = None,
    recorded: Mapping[str, FileStamp] | None = None,
) -> tuple[list[dict], dict[str, FileStamp]]:
    """Manifest rows (before probing) for every VoxCeleb2 mp4 and metadata file under `root`.

    Returns (rows, metadata stamps by clip_id): a row for every utterance with media or metadata
    (those with metadata only have status missing_media; see `media_rows`). Speakers seen under a
    test folder go to split "test" wherever they appear: the standard held-out identities are
    never trained on.

    A metadata file is read only when its clip is new or the file changed: a clip whose previous
    manifest row (`previous`) names the same metadata file, parsed cleanly, and whose file still
    has the stamp recorded then (`recorded`) takes its track columns from that row. A parse
    depends only on the file's bytes and its path, so the row is the one a re-parse would give.
    The stamps returned are those of the cleanly parsed (or reused) files, taken before reading;
    failed parses get none and are read again next time. No Track is kept: at VoxCeleb2 scale
    (1.1 M files) their frame arrays alone take gigabytes; `read_track` reads one again.
    """
    previous, recorded = previous or {}, recorded or {}
    rows: dict[str, dict] = {}
    found: dict[str, dict[str, tuple[Utterance, Path]]] = {"mp4": {}, "txt": {}}
    files = find_files(root, tuple(found))
    for folder, by_clip in found.items():
        for relative, path in files[folder].items():
            try:
                utterance = parse_utterance_path(relative)
            except MetadataError as err:
                rows[f"voxceleb2:{relative}"] = manifest.new_row(
                    f"voxceleb2:{relative}",
                    "voxceleb2",
                    licence=licence,
                    media_path=str(path),
                    status=manifest.BAD_METADATA,
                    error=str(err),
                )
                continue
            by_clip[utterance.clip_id] = (utterance, path)
    media, metadata = found["mp4"], found["txt"]
    everything = [u for u, _ in (*media.values(), *metadata.values())]
    test_speakers = {u.speaker_id for u in everything if u.split == "test"}
    stamps: dict[str, FileStamp] = {}
    for clip_id, (utterance, _) in sorted({**metadata, **media}.items()):
        row = manifest.new_row(
            clip_id,
            "voxceleb2",
            speaker_id=utterance.speaker_id,
            youtube_id=utterance.youtube_id,
            utterance=utterance.utterance,
            source_url=f"https://www.youtube.com/watch?v={utterance.youtube_id}",
            licence=licence,
            split="test" if utterance.speaker_id in test_speakers else "train",
        )
        if clip_id in metadata:
            meta_path = metadata[clip_id][1]
            row["metadata_path"] = str(meta_path)
            stamp = FileStamp.of(meta_path)
            # a youtube-only ingest keeps no voxceleb2 row, but its re-cut carries the same track
            old = previous.get(clip_id) or previous.get(clip_id.replace("voxceleb2:", "youtube:", 1))
            if old is not None and _parsed_unchanged(old, meta_path, stamp, recorded.get(clip_id)):
                row.update({column: old[column] for column in manifest.TRACK_COLUMNS})
                stamps[clip_id] = stamp
            else:
                try:
                    track = read_track(meta_path, utterance)
                except MetadataError as err:
                    row.update(status=manifest.BAD_METADATA, error=f"{meta_path.name}: {err}")
                else:
                    row.update(track.summary())
                    if stamp is not None:
                        stamps[clip_id] = stamp
        if clip_id in media:
            row["media_path"] = str(media[clip_id][1])
        else:
            row.update(status=manifest.MISSING_MEDIA, error="metadata present, media missing")
        rows[clip_id] = row
    return list(rows.values()), stamps


def read_track(meta_path: Path, utterance: Utterance) -> Track:
    """Parse the metadata file of `utterance`; MetadataError if it is malformed or names another clip."""
    track = parse_metadata(meta_path.read_text(errors="replace"))
    _check_consistent(track, utterance)
    return track


def _parsed_unchanged(old: dict, meta_path: Path, stamp: FileStamp | None, recorded: FileStamp | None) -> bool:
    """Whether the previous row holds a clean parse of this very metadata file, unchanged since."""
    return (
        stamp is not None
        and stamp == recorded
        and old["frame_start"] is not None
        and bool(old["metadata_path"])
        and os.path.normpath(old["metadata_path"]) == os.path.normpath(meta_path)
    )


def media_rows(rows: list[dict]) -> list[dict]:
    """The rows of the `voxceleb2` source: clips with media, and missing-media rows only for
    speakers whose media was ingested (metadata of archives not downloaded, e.g. the dev txt next
    to only the test mp4, is not a missing clip)."""
    with_media = {row["speaker_id"] for row in rows if row["media_path"]}
    return [row for row in rows if row["media_path"] or row["speaker_id"] in with_media]


def _check_consistent(track: Track, utterance: Utterance) -> None:
    if (track.speaker_id, track.youtube_id) != (utterance.speaker_id, utterance.youtube_id):
        header = f"{track.speaker_id}/{track.youtube_id}"
        raise MetadataError(f"header says {header}, path says {utterance.speaker_id}/{utterance.youtube_id}")


def archive_row(archive_name: str, status: str, error: str, licence: str) -> dict:
    """The row standing for a whole archive that could not be used (download failed, corrupt, zip bomb)."""
    return manifest.new_row(
        f"voxceleb2-archive:{archive_name}", "voxceleb2", speaker_id="", licence=licence, status=status, error=error
    )


def rejected_member_rows(archive_name: str, rejected: Iterable[tuple[str, str]]) -> list[dict]:
    """One `unsafe_archive_member` row per member refused by archive.extract_zip."""
    return [
        manifest.new_row(
            f"voxceleb2-archive:{archive_name}:{manifest.escape_text(member)}",
            "voxceleb2",
            speaker_id="",
            licence="",
            status=manifest.UNSAFE_MEMBER,
            error=manifest.printable(reason),
        )
        for member, reason in rejected
    ]


def youtube_row(vox_row: dict, out_dir: Path) -> dict:
    """The row of the high-resolution re-cut of a VoxCeleb2 track (source `youtube`), before cutting:
    identity and face track carried over, media at out_dir/<speaker>/<youtube id>/<utterance>.mp4."""
    clip_id = vox_row["clip_id"].replace("voxceleb2:", "youtube:", 1)
    target = out_dir / vox_row["speaker_id"] / vox_row["youtube_id"] / f"{vox_row['utterance']}.mp4"
    carried = {k: vox_row[k] for k in manifest.IDENTITY_COLUMNS + manifest.TRACK_COLUMNS}
    return manifest.new_row(clip_id, "youtube", **carried, media_path=str(target))
