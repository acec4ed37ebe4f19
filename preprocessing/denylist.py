"""The takedown denylist: speakers, videos or clips that must not be in any artifact built from now on.

    vasa takedown --speaker id00017 --reason "request 2026-11-22 by the speaker"

The list is a small CSV under version control (default `data/takedown/denylist.csv`, a DVC dependency of
`ingest` and `preprocess`), one request per row:

    kind     speaker | video | clip
    id       speaker_id | youtube_id (or source_url when a clip has no YouTube id) | clip_id
    reason   free text, required
    date     the day the request was recorded (YYYY-MM-DD, given by the caller: never read from a clock here)

Ingest marks a matching manifest row with status `taken_down` (its reason in `error`) so it is never
downloaded, processed or sharded again; preprocess checks the list as well, for manifests written before the
request. Rows are kept sorted and unique, so the same requests give the same bytes.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from vasa.core.errors import InputError
from vasa.core.files import atomic_path

DEFAULT_PATH = Path("data/takedown/denylist.csv")
COLUMNS = ("kind", "id", "reason", "date")
KINDS = ("speaker", "video", "clip")
TAKEN_DOWN = "taken_down"  # manifest status of a matching row
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class DenylistError(InputError):
    """The denylist file or a new request is malformed."""


@dataclass(frozen=True, order=True)
class Request:
    kind: str
    id: str
    reason: str
    date: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DenylistError(f"takedown kind must be one of {KINDS}, got {self.kind!r}")
        if not self.id.strip():
            raise DenylistError(f"takedown of a {self.kind} needs an id")
        if not self.reason.strip():
            raise DenylistError(f"takedown of {self.kind} {self.id!r} needs a reason")
        if not _DATE.match(self.date):
            raise DenylistError(f"takedown date must be YYYY-MM-DD, got {self.date!r}")


@dataclass(frozen=True)
class Denylist:
    requests: tuple[Request, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.requests)

    def match(self, row: dict) -> Request | None:
        """The first request that covers a manifest row (speaker, then video, then clip), or None."""
        video = row.get("youtube_id") or row.get("source_url")
        for request in self.requests:
            value = {"speaker": row.get("speaker_id"), "video": video, "clip": row.get("clip_id")}[request.kind]
            if value is not None and value == request.id:
                return request
        return None

    def reason(self, row: dict) -> str | None:
        """A one-line reason for a covered row (manifest `error`, failure `detail`), or None."""
        request = self.match(row)
        if request is None:
            return None
        return f"takedown of {request.kind} {request.id} ({request.date}): {request.reason}"


def load(path: Path = DEFAULT_PATH) -> Denylist:
    """Read the denylist; a missing file is an empty list (nothing taken down yet)."""
    path = Path(path)
    if not path.is_file():
        return Denylist()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise DenylistError(f"{path}: header must be {','.join(COLUMNS)}, got {reader.fieldnames}")
        try:
            requests = [Request(**{c: (r[c] or "").strip() for c in COLUMNS}) for r in reader]
        except DenylistError as e:
            raise DenylistError(f"{path}: {e}") from None
    return Denylist(tuple(sorted(set(requests))))


def write(path: Path, denylist: Denylist) -> None:
    """Write the list sorted and de-duplicated, atomically (a header-only file when empty)."""
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(COLUMNS)
    for request in sorted(set(denylist.requests)):
        out.writerow([getattr(request, c) for c in COLUMNS])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def add(path: Path, request: Request) -> bool:
    """Record a request; False when the same request (kind, id, reason, date) is already there."""
    current = load(path)
    if request in current.requests:
        return False
    write(path, Denylist((*current.requests, request)))
    return True


def mark(rows: list[dict], denylist: Denylist) -> tuple[list[dict], list[dict]]:
    """(rows with every covered manifest row set to status TAKEN_DOWN, its reason in `error`; the
    covered rows)."""
    if not denylist:
        return rows, []
    out, covered = [], []
    for row in rows:
        reason = denylist.reason(row)
        if reason is not None:
            row = row | {"status": TAKEN_DOWN, "error": reason}
            covered.append(row)
        out.append(row)
    return out, covered
