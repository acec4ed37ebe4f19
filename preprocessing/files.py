"""Small file helpers shared by the stages: atomic, deterministic JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, payload: dict) -> None:
    """Sorted keys, fixed indent, written to `<name>.partial` then renamed: same payload, same bytes,
    and a killed run never leaves half a file under the final name."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable (treated as not done yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
