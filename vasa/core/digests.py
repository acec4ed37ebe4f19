"""Content digests: of a file, and of the code a step runs (its import closure).

The import closure is the one answer to "which files does this command execute": DVC stage `deps`
(`scripts/stage_deps.py` and tests/test_layers.py), the code part of cache keys (preprocess, sample corpus,
extract-motion) and the bundle's code digest all come from `import_closure`, so a changed module always
re-runs what imports it and never what does not.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project root (holds vasa/, preprocessing/, flows/)
PACKAGES = ("vasa", "preprocessing", "flows")  # the project's own top-level packages
# Core modules that never change an artifact's bytes: config values reach the bytes as params (which
# every cache key hashes), the others are errors, logging and atomic file writes. Cache keys leave them
# out so that adding a param does not invalidate a VoxCeleb-sized cache; DVC deps keep them.
NEUTRAL = ("vasa.core.config", "vasa.core.errors", "vasa.core.native_logs", "vasa.core.files")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_path(module: str, root: Path = ROOT) -> Path | None:
    """`a.b.c` -> root/a/b/c.py or root/a/b/c/__init__.py; None when it is not a project module."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(module: str, root: Path) -> list[Path]:
    """The __init__.py of every package above `module` (Python runs them when it imports the module)."""
    parts = module.split(".")
    inits = (root.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts)))
    return [p for p in inits if p.is_file()]


# CPython 3.11 before 3.11.8 corrupts the parser's recursion counter when two threads run ast.parse at once
# ("SystemError: AST constructor recursion depth mismatch", python/cpython gh-106905): preprocess computes
# its code digest in a worker thread, so parsing is serialised.
_PARSE_LOCK = threading.Lock()


def imported_modules(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Project modules that the file imports, at any depth (lazy imports inside functions count: they run
    when the command runs) or, with `top_level_only`, only module-level statements. `from pkg import name`
    counts `pkg.name` when that is a module, else `pkg`."""
    source = path.read_text()
    with _PARSE_LOCK:
        tree = ast.parse(source, filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if module_path(full, ROOT) else base)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_closure(
    modules: Iterable[str], root: Path = ROOT, shallow: Iterable[str] = (), skip: Iterable[str] = ()
) -> list[Path]:
    """Every project source file that importing (and running) `modules` executes, sorted. Modules named in
    `shallow` are followed through their module-level imports only (a CLI whose handlers import their
    stage lazily: each stage depends on the CLI's shell, not on every other stage); `skip` are left out."""
    shallow = set(shallow)
    seen: set[str] = set(skip)
    files: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_path(name, root)
        if path is None:
            continue
        files.add(path)
        files.update(_package_inits(name, root))
        todo.extend(imported_modules(path, name, top_level_only=name in shallow))
    return sorted(files)


@cache
def code_digest(modules: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """sha256 over the relative paths and contents of the import closure of `modules` (less NEUTRAL), plus
    `extra` files (paths relative to the project root: assets the code reads). Computed once per process."""
    digest = hashlib.sha256()
    paths = [*import_closure(modules, skip=NEUTRAL), *(ROOT / name for name in extra)]
    for path in sorted(set(paths)):
        content = path.read_bytes()
        digest.update(f"{path.relative_to(ROOT).as_posix()}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()
