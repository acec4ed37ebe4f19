"""Small file helpers shared by the stages: atomic writes, unique temporary names, output checks and
deterministic JSON."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from vasa.core.errors import InputError

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


def unique_temp(path: Path, suffix: str) -> Path:
    """Reserve a new hidden file beside `path`, `.<name>.<random><suffix>`, created empty and exclusively
    (mkstemp), so two runs writing the same `path` at once never share a temporary name. The caller
    writes it, then renames it onto `path` or removes it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(name)


def check_output(out: Path, inputs: Mapping[str, Path | None], what: str = "--out") -> None:
    """Refuse, before any work, an output file that would destroy an input or cannot be written: `out` names
    one of `inputs` (label -> path, None skipped; the same file under any name, links included), is a folder,
    or the folder it goes in (or, while that does not exist, its nearest existing parent) cannot be written:
    a file is created there and removed to find out, since permission bits say nothing for root or on a
    read-only mount. Creates nothing that stays. InputError naming `what` otherwise."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{what} {out}: is a folder; name the output file")
    for label, path in inputs.items():
        if path is not None and _same_file(out, Path(path)):
            raise InputError(f"{what} {out}: is the {label} input; writing it would destroy that input")
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        unique_temp(folder / out.name, ".probe").unlink()
    except OSError as err:
        raise InputError(f"{what} {out}: cannot write in {folder} ({err.strerror or err})") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where the names lead
        return a.resolve() == b.resolve()


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
