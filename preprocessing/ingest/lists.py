"""Corpus lists published as YouTube ids + time spans + face boxes: HDTF, CelebV-HQ, TalkVid.

Each list entry becomes an `Entry` (YouTube id, span in seconds, box, licence) that the YouTube path
(`youtube.fetch_reference`, `youtube.cut_and_crop`) cuts like a VoxCeleb2 track: the span gives the
25 fps frames [ceil(start * 25), ceil(end * 25) - 1] and the box a constant per-frame track. A bad
entry is a `bad_metadata` row naming the list file, the line (or JSON item) and the reason; the good
entries of the same list are kept. Formats, as read from each dataset's repository (2026-12):

HDTF (github.com/MRzzm/HDTF, folder HDTF_dataset/, commit bbde889), per subset RD, WDA, WRA:
    <S>_video_url.txt      "Radio1 https://www.youtube.com/watch?v=CPCoMyuBRM0" (name without .mp4;
                           one file starts with a UTF-8 BOM; URLs may carry `&t=6s`)
    <S>_annotion_time.txt  "Radio11.mp4 00:30-01:00 01:30-02:30" (sic: "annotion"); clip k is the
                           k-th span, mm:ss (hh:mm:ss accepted); trailing spaces occur
    <S>_crop_wh.txt        "Radio11_1.mp4 557 478 0 478": x, width, y, height in pixels, as the
                           community download.py in the same repository reads it (`x, out_w, y,
                           out_h = crop`, ffmpeg crop=w:h:x:y) -- the README's "min_width | width |
                           min_height | height"; always square there
    <S>_resolution.txt     "Radio1.mp4 720": the frame height those pixels refer to (one says 0)
  The pixels are scaled to the downloaded video by its height, so a 2160p entry cut from a 1080p
  download keeps its box. `<S>_crop_ratio.txt` (values 0.9-1.2) is not documented upstream and is
  not used. Speakers: WDA/WRA names are people with a video number (AmyKlobuchar0, AmyKlobuchar1),
  so the trailing digits are dropped; RD names (Radio1, Radio2) are one person each and kept.
CelebV-HQ (github.com/CelebV-HQ/CelebV-HQ, README and download_and_process.py):
    celebvhq_info.json  {"meta_info": {...}, "clips": {"M2Ohb0FAaJU_1": {"ytb_id": "M2Ohb0FAaJU",
                        "duration": {"start_sec": 81.62, "end_sec": 86.17}, "bbox": {"top": 0.0,
                        "bottom": 0.8815, "left": 0.1964, "right": 0.6922}, ...}}}
  Boxes are fractions of the frame ("the values are normalized to 0~1" in download_and_process.py).
  The list names no identities: the speaker is the YouTube video (one identity may span videos).
TalkVid (github.com/FreedomIntelligence/TalkVid, README "Data Format" and
data_pipeline/0_video_download/download_clips.py): a JSON array (JSON Lines accepted) of
    {"id": "videovideoTr6MMsoWAog-scene1-scene1", "height": 1080, "width": 1920, "fps": 24.0,
     "start-time": 0.1, "end-time": 5.14, "info": {"Person ID": "597", "Video Link":
     "https://www.youtube.com/watch?v=Tr6MMsoWAog", ...}, "dover_scores": 8.9, ...}
  with `start`/`end` and `info.video_link` also read, as download_clips.py does. TalkVid gives no
  face box (its clips show the upper body): the crop is the centred full-height square, and the
  face crop proper is left to the preprocess stage. An optional CelebV-HQ-style "bbox" is used when
  a list carries one (a TalkVid-style list of our own; not part of the published format).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from preprocessing.ingest import manifest

SOURCES = ("hdtf", "celebvhq", "talkvid")
HDTF_SUBSETS = ("RD", "WDA", "WRA")
YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")  # a clip name that is also a safe file name
YOUTUBE_HOSTS = ("youtube.com", "www.youtube.com", "m.youtube.com", "youtu.be")
MAX_FRAME_HEIGHT = 8640  # 16K: a larger "resolution" is a typo or an attack, not a video


class ListError(ValueError):
    """A list entry that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Entry:
    """One clip of a corpus list: where to cut it from and how to crop it."""

    source: str  # "hdtf" | "celebvhq" | "talkvid"
    name: str  # unique within the source, safe as a file name ("WRA/AdamKinzinger0_0" for HDTF)
    youtube_id: str
    speaker_id: str
    start_s: float  # span in the source video, seconds
    end_s: float
    box: tuple[float, float, float, float] | None  # [x, y, w, h]; None: centred full-height square
    box_units: str  # "fraction" | "pixel" (of a frame `box_height` pixels high)
    box_height: int | None
    licence: str
    where: str  # "file:line" or "file:item N" of the entry, for messages
    metadata_path: str

    @property
    def clip_id(self) -> str:
        return f"{self.source}:{self.name}"

    def frames(self, fps: int = 25) -> tuple[int, int]:
        """First and last frame on the `fps` grid whose start time lies in [start_s, end_s)."""
        first = math.ceil(self.start_s * fps - 1e-6)
        last = math.ceil(self.end_s * fps - 1e-6) - 1
        return first, last


def read_hdtf(folder: Path, subsets: Iterable[str], licence: str, max_span_s: float) -> tuple[list[Entry], list[dict]]:
    """Entries of the HDTF lists in `folder` (the repository's HDTF_dataset/), and rows for bad lines.

    A subset whose files are missing is one bad row; a video without a span, height or URL, a clip
    without a crop box and a box without a clip are bad rows naming the file and line.
    """
    entries: list[Entry] = []
    bad: list[dict] = []
    for subset in subsets:
        files = {
            kind: folder / f"{subset}_{kind}.txt" for kind in ("video_url", "annotion_time", "crop_wh", "resolution")
        }
        missing = [path.name for path in files.values() if not path.is_file()]
        if missing:
            bad.append(_bad_row("hdtf", f"hdtf:{subset}", str(folder), f"{folder}: missing {missing}", licence))
            continue
        found, rejected = _hdtf_subset(subset, files, licence, max_span_s)
        entries += found
        bad += [
            _bad_row("hdtf", f"hdtf:{where}", str(folder), f"{where}: {reason}", licence) for where, reason in rejected
        ]
    return entries, bad


def _hdtf_subset(
    subset: str, files: dict[str, Path], licence: str, max_span_s: float
) -> tuple[list[Entry], list[tuple[str, str]]]:
    """(entries, [(file:line, reason)]) of one subset's four files."""
    parsers = {"video_url": _hdtf_url, "annotion_time": _hdtf_spans, "crop_wh": _hdtf_crop, "resolution": _hdtf_height}
    tables: dict[str, dict[str, tuple]] = {kind: {} for kind in parsers}  # kind -> name -> (value, file:line)
    rejected: list[tuple[str, str]] = []
    for kind, parse in parsers.items():
        for where, key, fields in _table(files[kind]):
            try:
                name = _name(key.removesuffix(".mp4"))
                if name in tables[kind]:
                    raise ListError(f"{name} listed again (first at {tables[kind][name][1]})")
                tables[kind][name] = (parse(fields), where)
            except ListError as err:
                rejected.append((where, str(err)))
    urls, crops, heights = tables["video_url"], tables["crop_wh"], tables["resolution"]
    entries = []
    unusable = set()  # videos rejected as a whole: their crop boxes are not reported again
    for video, (spans, where) in sorted(tables["annotion_time"].items()):
        if video not in urls or video not in heights:
            lacking = files["video_url" if video not in urls else "resolution"].name
            rejected.append((where, f"{video} is not listed in {lacking}"))
            unusable.add(video)
            continue
        (youtube_id, _), (height, _) = urls[video], heights[video]
        for k, span in enumerate(spans):
            crop = crops.pop(f"{video}_{k}", None)
            try:
                if crop is None:
                    raise ListError(f"clip {k} of {video} has no crop box in {files['crop_wh'].name}")
                (x, y, w, h), crop_where = crop
                if y + h > height:
                    raise ListError(f"crop box rows {y}..{y + h} lie outside the {height} px high frame")
                speaker = f"hdtf:{_hdtf_speaker(subset, video)}"
                source = (licence, f"{where}#{k}, {crop_where}", str(files["annotion_time"]), max_span_s)
                entries.append(
                    _entry(
                        "hdtf",
                        f"{subset}/{video}_{k}",
                        youtube_id,
                        speaker,
                        span,
                        (x, y, w, h),
                        "pixel",
                        height,
                        *source,
                    )
                )
            except ListError as err:
                rejected.append((f"{where}#{k}", str(err)))
    for clip, (_, where) in sorted(crops.items()):
        if clip.rpartition("_")[0] in unusable:
            continue
        rejected.append((where, f"crop box for {clip}, which {files['annotion_time'].name} has no span for"))
    return entries, rejected


def read_celebvhq(path: Path, licence: str, max_span_s: float) -> tuple[list[Entry], list[dict]]:
    """Entries of celebvhq_info.json, and rows for clips (or a whole file) that cannot be used."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        clips = data["clips"]
        if not isinstance(clips, dict):
            raise TypeError("`clips` is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        reason = f"{path.name}: not a CelebV-HQ info file: {type(err).__name__}: {err}"
        return [], [_bad_row("celebvhq", f"celebvhq:{manifest.escape_text(path.name)}", str(path), reason, licence)]
    entries, bad = [], []
    for index, (key, clip) in enumerate(clips.items()):
        where = f"{path.name}:clips[{index}]"
        try:
            name = _name(key)
            if not isinstance(clip, dict):
                raise ListError("entry is not an object")
            duration, box = clip.get("duration"), clip.get("bbox")
            if not isinstance(duration, dict) or not isinstance(box, dict):
                raise ListError("needs `duration` {start_sec, end_sec} and `bbox` {top, bottom, left, right}")
            span = (_number(duration.get("start_sec"), "start_sec"), _number(duration.get("end_sec"), "end_sec"))
            entries.append(
                _entry(
                    "celebvhq",
                    name,
                    _youtube_id(clip.get("ytb_id")),
                    f"celebvhq:{clip.get('ytb_id')}",
                    span,
                    _fraction_box(box),
                    "fraction",
                    None,
                    licence,
                    where,
                    str(path),
                    max_span_s,
                )
            )
        except ListError as err:
            clip_id = f"celebvhq:{key}" if isinstance(key, str) and NAME.match(key) else f"celebvhq:{path.name}:{index}"
            bad.append(_bad_row("celebvhq", manifest.escape_text(clip_id), str(path), f"{where}: {err}", licence))
    return _unique(entries, bad, licence)


def read_talkvid(path: Path, licence: str, max_span_s: float) -> tuple[list[Entry], list[dict]]:
    """Entries of a TalkVid metadata file (JSON array, or JSON Lines), and rows for unusable items."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        items = list(_json_items(text, path.name))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        reason = f"{path.name}: not a TalkVid list: {type(err).__name__}: {err}"
        return [], [_bad_row("talkvid", f"talkvid:{manifest.escape_text(path.name)}", str(path), reason, licence)]
    entries, bad = [], []
    for where, item in items:
        try:
            if isinstance(item, ListError):
                raise item
            if not isinstance(item, dict):
                raise ListError("item is not an object")
            info: dict = item["info"] if isinstance(item.get("info"), dict) else {}
            link = info.get("Video Link") or info.get("video_link") or item.get("youtube_id")
            youtube_id = _youtube_id(link if YOUTUBE_ID.match(str(link)) else _id_from_url(link))
            start = _number(_first(item, "start-time", "start"), "start-time")
            end = _number(_first(item, "end-time", "end"), "end-time")
            name = _name(str(item["id"]) if "id" in item else f"{youtube_id}_{start:.3f}_{end:.3f}")
            person = info.get("Person ID")
            speaker = f"talkvid:{person if isinstance(person, str | int) and str(person).strip() else youtube_id}"
            box = _fraction_box(item["bbox"]) if isinstance(item.get("bbox"), dict) else None
            entries.append(
                _entry(
                    "talkvid", name, youtube_id, speaker, (start, end), box, "fraction", None, licence, where,
                    str(path), max_span_s,
                )
            )  # fmt: skip
        except ListError as err:
            bad.append(
                _bad_row("talkvid", f"talkvid:{manifest.escape_text(where)}", str(path), f"{where}: {err}", licence)
            )
    return _unique(entries, bad, licence)


def entry_row(entry: Entry, out_dir: Path) -> dict:
    """The manifest row of `entry` before cutting: media at out_dir/<source>/<name>.mp4, the span as
    25 fps frames (frame_start..frame_end) and the list's box (mean of a constant track)."""
    first, last = entry.frames()
    box = entry.box or (None, None, None, None)
    return manifest.new_row(
        entry.clip_id,
        entry.source,
        speaker_id=entry.speaker_id,
        youtube_id=entry.youtube_id,
        utterance=entry.name,
        source_url=f"https://www.youtube.com/watch?v={entry.youtube_id}",
        licence=entry.licence,
        metadata_path=entry.metadata_path,
        media_path=str(out_dir / entry.source / f"{entry.name}.mp4"),
        frame_start=first,
        frame_end=last,
        track_frames=last - first + 1,
        bbox_x=box[0],
        bbox_y=box[1],
        bbox_w=box[2],
        bbox_h=box[3],
        bbox_units=entry.box_units if entry.box else None,
    )


def track(entry: Entry, width: int, height: int, fps: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """(frames (N,), boxes (N, 4) as fractions of a width x height frame): the constant box track
    `youtube.cut_and_crop` takes, N = 2 (first and last frame; it interpolates between), or 1.

    Pixel boxes are scaled by height / box_height (the list's frame height); a missing box is the
    centred square with the frame's shorter side. Raises ListError when the box leaves the frame.
    """
    first, last = entry.frames(fps)
    if entry.box is None:
        side = min(width, height)
        box = ((width - side) / 2 / width, (height - side) / 2 / height, side / width, side / height)
    elif entry.box_units == "pixel":
        scale = height / float(entry.box_height or height)
        x, y, w, h = (v * scale for v in entry.box)
        box = (x / width, y / height, w / width, h / height)
    else:
        box = entry.box
    x, y, w, h = box
    tolerance = 0.01  # rounding in the lists, and a download a few pixels off the listed size
    if x < -tolerance or y < -tolerance or x + w > 1 + tolerance or y + h > 1 + tolerance:
        raise ListError(f"box {entry.box} ({entry.box_units}) lies outside the {width}x{height} frame")
    frames = np.array([first, last] if last > first else [first])  # (N,)
    return frames, np.tile(np.asarray(box, dtype=np.float64), (len(frames), 1))  # (N, 4)


def _entry(
    source: str,
    name: str,
    youtube_id: str,
    speaker: str,
    span: tuple[float, float],
    box: tuple[float, float, float, float] | None,
    units: str,
    box_height: int | None,
    licence: str,
    where: str,
    metadata_path: str,
    max_span_s: float,
) -> Entry:
    start, end = span
    if start < 0 or end <= start:
        raise ListError(f"span {start}-{end} s is negative or empty")
    if end - start > max_span_s:
        raise ListError(f"span {start}-{end} s is longer than {max_span_s} s")
    entry = Entry(source, name, youtube_id, speaker, start, end, box, units, box_height, licence, where, metadata_path)
    first, last = entry.frames()
    if last < first:
        raise ListError(f"span {start}-{end} s holds no 25 fps frame")
    return entry


def _unique(entries: list[Entry], bad: list[dict], licence: str) -> tuple[list[Entry], list[dict]]:
    """Keep the first entry per clip id; later ones become bad rows."""
    seen: dict[str, Entry] = {}
    for entry in entries:
        if entry.clip_id in seen:
            reason = f"{entry.where}: {entry.name} listed again (first at {seen[entry.clip_id].where})"
            clip_id = manifest.escape_text(f"{entry.source}:{entry.where}")
            bad.append(_bad_row(entry.source, clip_id, entry.metadata_path, reason, licence))
        else:
            seen[entry.clip_id] = entry
    return list(seen.values()), bad


def _bad_row(source: str, clip_id: str, metadata_path: str, reason: str, licence: str) -> dict:
    return manifest.new_row(
        clip_id,
        source,
        speaker_id="",
        licence=licence,
        metadata_path=metadata_path,
        status=manifest.BAD_METADATA,
        error=manifest.printable(reason),
    )


def _table(path: Path) -> list[tuple[str, str, list[str]]]:
    """(file:line, first field, other fields) per non-blank line of a space-separated HDTF list."""
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields:
            rows.append((f"{path.name}:{number}", fields[0], fields[1:]))
    return rows


def _hdtf_url(fields: list[str]) -> str:
    if len(fields) != 1:
        raise ListError(f"expected `<name> <url>`, got {len(fields)} fields after the name")
    return _id_from_url(fields[0])


def _hdtf_spans(fields: list[str]) -> list[tuple[float, float]]:
    if not fields:
        raise ListError("no time spans")
    spans = []
    for field in fields:
        start, sep, end = field.partition("-")
        if not sep:
            raise ListError(f"span {field!r} is not start-end")
        spans.append((_clock(start), _clock(end)))
    return spans


def _clock(text: str) -> float:
    """Seconds of `mm:ss` or `hh:mm:ss` (a fractional second allowed)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"\d{1,2}", p) for p in parts[:-1]):
        raise ListError(f"time {text!r} is not mm:ss or hh:mm:ss")
    if not re.fullmatch(r"\d{1,2}(\.\d+)?", parts[-1]) or float(parts[-1]) >= 60 or int(parts[-2]) >= 60:
        raise ListError(f"time {text!r} is not mm:ss or hh:mm:ss")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def _hdtf_crop(fields: list[str]) -> tuple[int, int, int, int]:
    """(x, y, w, h) pixels from the line's `x w y h`."""
    if len(fields) != 4 or not all(re.fullmatch(r"\d{1,5}", f) for f in fields):
        raise ListError(f"expected four pixel counts `x width y height`, got {fields}")
    x, w, y, h = (int(f) for f in fields)
    if w == 0 or h == 0 or w > MAX_FRAME_HEIGHT * 4 or h > MAX_FRAME_HEIGHT:
        raise ListError(f"crop box {w}x{h} px is empty or larger than any video frame")
    return x, y, w, h


def _hdtf_height(fields: list[str]) -> int:
    if len(fields) != 1 or not fields[0].isdigit() or not 100 <= int(fields[0]) <= MAX_FRAME_HEIGHT:
        raise ListError(f"expected a frame height of 100-{MAX_FRAME_HEIGHT} px, got {fields}")
    return int(fields[0])


def _hdtf_speaker(subset: str, video: str) -> str:
    return video if subset == "RD" else video.rstrip("0123456789") or video


def _name(text: str) -> str:
    if not isinstance(text, str) or not NAME.match(text) or ".." in text:
        raise ListError(f"name {text!r} is not a plain clip name (letters, digits, `_.-`, at most 128)")
    return text


def _youtube_id(value: object) -> str:
    if not isinstance(value, str) or not YOUTUBE_ID.match(value):
        raise ListError(f"not a YouTube id (11 characters of [A-Za-z0-9_-]): {value!r}")
    return value


def _id_from_url(url: object) -> str:
    """The video id of a youtube.com/watch?v=ID or youtu.be/ID URL."""
    if not isinstance(url, str):
        raise ListError(f"not a YouTube URL: {url!r}")
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or host not in YOUTUBE_HOSTS:
        raise ListError(f"not a YouTube URL: {url!r}")
    if host == "youtu.be":
        return _youtube_id(parts.path.lstrip("/"))
    return _youtube_id(next(iter(parse_qs(parts.query).get("v", [])), None))


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ListError(f"{what} is not a number: {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ListError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ListError(f"{what} is not finite: {value!r}")
    return number


def _first(item: dict, *keys: str) -> object:
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _fraction_box(box: dict) -> tuple[float, float, float, float]:
    """[x, y, w, h] from CelebV-HQ's {top, bottom, left, right}, fractions of the frame."""
    top, bottom, left, right = (_number(box.get(k), f"bbox.{k}") for k in ("top", "bottom", "left", "right"))
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
        raise ListError(f"bbox {box} is not inside the frame (0 <= top < bottom <= 1, 0 <= left < right <= 1)")
    return left, top, right - left, bottom - top


def _json_items(text: str, file_name: str) -> Iterator[tuple[str, object]]:
    """(where, item) of a JSON array, or of JSON Lines (one object per line; a line that does not
    parse comes as a ListError). Raises JSONDecodeError for an array that does not parse."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        for index, item in enumerate(json.loads(text)):
            yield f"{file_name}:item {index}", item
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                item = ListError(f"not JSON: {err}")  # rejected like any other bad item
            yield f"{file_name}:{number}", item
