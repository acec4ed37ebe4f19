"""Small file helpers shared by the stages: atomic writes and deterministic JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield `<path>.partial` to write to; on success rename it onto `path` (atomic on one
    filesystem), on failure remove it. A killed run never leaves half a file under the final name."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_json(path: Path, payload: dict) -> None:
    """Sorted keys, fixed indent, written atomically: same payload, same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable (treated as not done yet)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None
