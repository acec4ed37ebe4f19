"""Joining split archives and extracting zips without trusting their member names.

VoxCeleb2 ships its dev set as `vox2_dev_mp4_partaa … partai`, byte ranges of one zip that are
joined with `cat` (REFERENCE.md §3). Archives come from mirrors, so extraction refuses members
that would land outside the destination (zip-slip), symlinks and special files, and records
why instead of crashing. Outputs appear under their final name only when complete, and members
already on disk are skipped, so a killed extraction resumes where it stopped. Joining shows a
bytes progress bar and extraction a members one, both on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

log = logging.getLogger(__name__)

_COPY_BYTES = 8 << 20
_DRIVE = re.compile(r"[A-Za-z]:")
# Never follow a symlink planted at a partial path; O_NOFOLLOW does not exist on Windows.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class UnsafeArchiveError(ValueError):
    """A member name that would write outside the destination directory."""


class ArchiveError(ValueError):
    """The archive itself is unreadable (not a zip, truncated, corrupt central directory)."""


class ArchiveTooLargeError(ArchiveError):
    """The members declare more bytes in total than the limit allows (a zip bomb); nothing was extracted."""


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction produced: files on disk, and members refused with the reason."""

    extracted: tuple[Path, ...]  # files written or already present, sorted
    rejected: tuple[tuple[str, str], ...]  # (member name, "#n" added to the n-th of equal names; reason), sorted


def join_parts(parts: Sequence[Path], dest: Path) -> Path:
    """Concatenate `parts` in the given order into `dest` (like `cat partaa partab > x.zip`)."""
    if not parts:
        raise ValueError("join_parts needs at least one part")
    for part in parts:
        if not Path(part).is_file():
            raise FileNotFoundError(f"archive part not found: {part}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    total = sum(Path(part).stat().st_size for part in parts)
    bar = tqdm(total=total, desc=f"join {dest.name}", unit="B", unit_scale=True, unit_divisor=1024, disable=not total)
    with partial.open("wb") as out, bar:
        counted = CallbackIOWrapper(bar.update, out, "write")
        for part in parts:
            with Path(part).open("rb") as src:
                shutil.copyfileobj(src, counted, _COPY_BYTES)
    os.replace(partial, dest)
    return dest


def extraction_folder(root: Path, archive_name: str) -> Path:
    """The folder under `root` that archive `<name>.zip` is extracted into: `root/<name>`.

    Raises UnsafeArchiveError when the name gives no folder of its own there: `...zip` would extract
    into root's parent (`..`) and `..zip` into root itself, where the scan of root never looks for
    them or mixes them with the other archives' trees; an empty name or a separator likewise.
    """
    folder = archive_name.removesuffix(".zip")
    if folder in ("", ".", "..") or any(c in folder for c in "/\\\0"):
        raise UnsafeArchiveError(
            f"archive name {archive_name!r} gives extraction folder {folder!r}, not a folder of its own: rename it"
        )
    return Path(root) / folder


def safe_member_path(dest: Path, member_name: str) -> Path:
    """Where `member_name` goes under `dest`; raises UnsafeArchiveError if that is not inside `dest`.

    Backslashes count as separators, since Windows-made zips use them and Windows honours them.
    """
    target = Path(dest).joinpath(*_member_parts(member_name))
    # Catches symlinks already inside dest that point out of it.
    root = Path(dest).resolve()
    if not target.resolve().is_relative_to(root):
        raise UnsafeArchiveError(f"member path {member_name!r} resolves outside {dest}")
    return target


def _member_parts(member_name: str) -> tuple[str, ...]:
    """The path components of a member name, checked lexically (no filesystem access)."""
    name = member_name.replace("\\", "/")
    if not name.strip("/") or "\0" in name:
        raise UnsafeArchiveError(f"empty or invalid member name {member_name!r}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"absolute member path {member_name!r}")
    if _DRIVE.match(name):
        raise UnsafeArchiveError(f"drive letter in member path {member_name!r}")
    relative = PurePosixPath(name)
    if ".." in relative.parts:
        raise UnsafeArchiveError(f"'..' in member path {member_name!r}")
    if not relative.parts:
        raise UnsafeArchiveError(f"empty or invalid member name {member_name!r}")
    return relative.parts


def extract_zip(
    archive: Path, dest: Path, *, max_total_bytes: int | None = None, max_ratio: float | None = None
) -> ExtractResult:
    """Extract the regular files and directories of `archive` into `dest`, refusing unsafe members.

    Refused members (zip-slip paths, symlinks, devices, fifos, encrypted or corrupt data, a second
    member landing on the same path, a file where a folder must go or the reverse, a member
    inflating more than `max_ratio` times its compressed size) are not written and are listed in
    `rejected` with the reason; the first of two duplicates is kept. A member whose file already
    exists with the right size counts as extracted without being rewritten. Raises ArchiveError if
    `archive` is not a readable zip and ArchiveTooLargeError, before writing anything, when its
    members declare more than `max_total_bytes` in total. zipfile never inflates a member past its
    declared size (it stops and fails the CRC), so the declared sizes bound what reaches the disk.
    """
    dest = Path(dest)
    extracted: list[Path] = []
    rejected: list[tuple[str, str]] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            total = sum(info.file_size for info in members)
            if max_total_bytes is not None and total > max_total_bytes:
                raise ArchiveTooLargeError(
                    f"{archive}: members declare {total} bytes in total, over the limit of {max_total_bytes}"
                    " (params ingest.voxceleb2.max_extract_bytes); nothing extracted"
                )
            dest.mkdir(parents=True, exist_ok=True)
            claimed: dict[str, str] = {}  # normalised target -> first member name
            seen: Counter[str] = Counter()
            bar = tqdm(total=len(members), desc=f"extract {Path(archive).name}", unit="member", disable=not members)
            with bar:
                for info in members:
                    outcome = _claim(info, claimed, max_ratio) or _extract_member(zf, info, dest)
                    seen[info.filename] += 1
                    bar.update()
                    if isinstance(outcome, Path):
                        extracted.append(outcome)
                    elif outcome is not None:
                        log.warning("%s: refused member %r: %s", archive, info.filename, outcome)
                        # The same name twice in one archive gets "#2": one manifest row per refused member.
                        n = seen[info.filename]
                        rejected.append((info.filename if n == 1 else f"{info.filename}#{n}", outcome))
    except zipfile.BadZipFile as err:
        raise ArchiveError(f"{archive}: not a readable zip archive ({err})") from err
    except (OSError, EOFError) as err:  # truncated mid-central-directory, unreadable file
        raise ArchiveError(f"{archive}: cannot read archive ({type(err).__name__}: {err})") from err
    return ExtractResult(extracted=tuple(sorted(set(extracted))), rejected=tuple(sorted(rejected)))


def _claim(info: zipfile.ZipInfo, claimed: dict[str, str], max_ratio: float | None) -> str | None:
    """Why `info` must not be extracted before looking at its data (duplicate, bomb), or None."""
    try:
        key = "/".join(_member_parts(info.filename))  # "a//b", "./a/b" and "a\\b" all land on "a/b"
    except UnsafeArchiveError:
        return None  # _extract_member refuses it with the reason
    if key in claimed:
        return f"duplicate member: {info.filename!r} lands where {claimed[key]!r} did (first kept)"
    claimed[key] = info.filename
    if max_ratio is not None and info.file_size > max(info.compress_size, 1) * max_ratio:
        return (
            f"compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 over the limit of"
            f" {max_ratio:g}:1 (params ingest.voxceleb2.max_compression_ratio): a zip bomb?"
        )
    return None


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> Path | str | None:
    """Extract one member: its file path, None for a directory, or the reason it was refused."""
    try:
        target = safe_member_path(dest, info.filename)
    except UnsafeArchiveError as err:
        return f"unsafe path: {err}"
    except OSError as err:  # resolving through a file where a folder should be, a link loop
        return f"path conflict: {err.strerror or err}"
    # The upper 16 bits hold the Unix mode for zips made on Unix; zero (no type) elsewhere.
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if info.is_dir() or stat.S_ISDIR(mode):
        try:
            target.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            return f"path conflict: {err.strerror} (a file of the archive is where this folder goes)"
        return None
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return f"not a regular file (type {stat.S_IFMT(mode):#o})"
    if info.flag_bits & 0x1:
        return "encrypted"
    if _present(target, info.file_size):
        return target
    partial = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, os.fdopen(os.open(partial, _CREATE_FLAGS, 0o644), "wb") as out:
            shutil.copyfileobj(src, out, _COPY_BYTES)
        os.replace(partial, target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        partial.unlink(missing_ok=True)
        return f"corrupt member data: {err}"
    except NotImplementedError as err:  # compression method zipfile cannot decode
        partial.unlink(missing_ok=True)
        return f"unsupported: {err}"
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        with contextlib.suppress(OSError):  # when its folder is a file, nothing was written there
            partial.unlink(missing_ok=True)
        return f"path conflict: {err.strerror} (a file and a folder of the archive share this path)"
    return target


def _present(target: Path, size: int) -> bool:
    """True if a previous run already wrote `target` (a regular file, not a symlink) with `size` bytes."""
    try:
        info = target.lstat()
    except OSError:  # absent, or a file where one of its folders should be
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size
