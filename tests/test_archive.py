"""Joining split archives and extracting zips safely, on zips built in tmp_path."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from preprocessing.ingest.archive import (
    ArchiveError,
    ExtractResult,
    UnsafeArchiveError,
    extract_zip,
    join_parts,
    safe_member_path,
)

MEMBERS = {
    "vox2/mp4/id00017/_mjZ87sK6cA/00001.mp4": b"first clip" * 100,
    "vox2/mp4/id00017/_mjZ87sK6cA/00002.mp4": b"second clip" * 50,
    "vox2/mp4/id00018/abcdefghijk/00001.mp4": b"",
    "README.txt": b"licence: CC BY 4.0\n",
}
OLD_MTIME_NS = 1_000_000_000 * 10**9  # 2001-09-09: anything rewritten gets a newer one


def _zip(path: Path, members: dict[str, bytes], *, special: dict[str, int] | None = None) -> Path:
    """Write a zip with `members`, plus `special` members whose Unix file type is given."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.mkdir("vox2/mp4")
        for name, data in members.items():
            zf.writestr(name, data)
        for name, file_type in (special or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the upper 16 bits of external_attr are a mode
            info.external_attr = (file_type | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_regular_members_and_directories_extract(tmp_path: Path) -> None:
    dest = tmp_path / "out"

    result = extract_zip(_zip(tmp_path / "a.zip", MEMBERS), dest)

    assert result == ExtractResult(extracted=tuple(sorted(dest / name for name in MEMBERS)), rejected=())
    assert {name: (dest / name).read_bytes() for name in MEMBERS} == MEMBERS
    assert (dest / "vox2" / "mp4").is_dir()
    assert _files(dest) == set(MEMBERS)  # no .partial files left


def test_zip_slip_members_are_rejected_and_nothing_lands_outside(tmp_path: Path) -> None:
    evil = ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt", "..\\evil.txt"]
    archive = _zip(tmp_path / "slip.zip", {"ok.txt": b"ok", **{name: b"pwned" for name in evil}})
    dest = tmp_path / "deep" / "out"

    result = extract_zip(archive, dest)

    assert result.extracted == (dest / "ok.txt",)
    assert [name for name, _ in result.rejected] == sorted(evil)
    assert all(reason.startswith("unsafe path") for _, reason in result.rejected)
    assert _files(tmp_path) == {"slip.zip", "deep/out/ok.txt"}
    assert not Path("/abs/evil.txt").exists()


@pytest.mark.parametrize(
    "file_type, reason",
    [(stat.S_IFLNK, "symlink"), (stat.S_IFIFO, "not a regular file"), (stat.S_IFCHR, "not a regular file")],
    ids=["symlink", "fifo", "char-device"],
)
def test_symlinks_and_special_files_are_rejected(tmp_path: Path, file_type: int, reason: str) -> None:
    archive = _zip(tmp_path / "special.zip", {"ok.txt": b"ok"}, special={"vox2/link": file_type})
    dest = tmp_path / "out"

    result = extract_zip(archive, dest)

    assert result.extracted == (dest / "ok.txt",)
    assert len(result.rejected) == 1 and result.rejected[0][0] == "vox2/link"
    assert result.rejected[0][1].startswith(reason)
    assert not (dest / "vox2" / "link").exists() and not (dest / "vox2" / "link").is_symlink()


def test_rerun_after_deleting_one_file_rewrites_only_that_file(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", MEMBERS)
    dest = tmp_path / "out"
    first = extract_zip(archive, dest)
    for path in first.extracted:
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    deleted = dest / "vox2/mp4/id00017/_mjZ87sK6cA/00002.mp4"
    deleted.unlink()

    second = extract_zip(archive, dest)

    assert second == first
    assert deleted.read_bytes() == MEMBERS["vox2/mp4/id00017/_mjZ87sK6cA/00002.mp4"]
    assert deleted.stat().st_mtime_ns != OLD_MTIME_NS
    assert {p: p.stat().st_mtime_ns for p in first.extracted if p != deleted} == {
        p: OLD_MTIME_NS for p in first.extracted if p != deleted
    }


def test_existing_file_of_the_wrong_size_is_rewritten(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", MEMBERS)
    dest = tmp_path / "out"
    (dest / "README.txt").parent.mkdir(parents=True)
    (dest / "README.txt").write_bytes(b"truncated")

    extract_zip(archive, dest)

    assert (dest / "README.txt").read_bytes() == MEMBERS["README.txt"]


def test_corrupt_member_data_is_rejected_not_written(tmp_path: Path) -> None:
    archive = tmp_path / "crc.zip"
    good = b"A" * 64
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("bad.bin", good)
        zf.writestr("ok.txt", b"ok")
    archive.write_bytes(archive.read_bytes().replace(good, b"B" + good[1:]))
    dest = tmp_path / "out"

    result = extract_zip(archive, dest)

    assert result.extracted == (dest / "ok.txt",)
    assert result.rejected[0][0] == "bad.bin" and "corrupt" in result.rejected[0][1]
    assert _files(dest) == {"ok.txt"}


@pytest.mark.parametrize("content", [b"this is not a zip file", None], ids=["garbage", "truncated"])
def test_corrupt_archive_raises_archive_error_naming_the_file(tmp_path: Path, content: bytes | None) -> None:
    archive = tmp_path / "vox2_dev_mp4.zip"
    if content is None:  # a zip whose end (with the central directory) never arrived
        whole = _zip(tmp_path / "whole.zip", MEMBERS).read_bytes()
        content = whole[: len(whole) // 2]
    archive.write_bytes(content)

    with pytest.raises(ArchiveError, match="vox2_dev_mp4.zip"):
        extract_zip(archive, tmp_path / "out")


def test_join_parts_of_a_split_zip_gives_the_original_bytes(tmp_path: Path) -> None:
    whole = _zip(tmp_path / "whole.zip", MEMBERS).read_bytes()
    cuts = [0, 100, len(whole) // 2, len(whole)]
    parts = []
    for suffix, start, end in zip(("aa", "ab", "ac"), cuts, cuts[1:], strict=False):
        parts.append(tmp_path / f"vox2_dev_mp4_part{suffix}")
        parts[-1].write_bytes(whole[start:end])

    joined = join_parts(parts, tmp_path / "joined" / "vox2_dev_mp4.zip")

    assert joined == tmp_path / "joined" / "vox2_dev_mp4.zip"
    assert joined.read_bytes() == whole
    assert _files(tmp_path / "joined") == {"vox2_dev_mp4.zip"}
    assert extract_zip(joined, tmp_path / "out").rejected == ()


def test_join_parts_names_a_missing_part_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "partaa").write_bytes(b"x")

    with pytest.raises(FileNotFoundError, match="partab"):
        join_parts([tmp_path / "partaa", tmp_path / "partab"], tmp_path / "out.zip")
    assert _files(tmp_path) == {"partaa"}


@pytest.mark.parametrize(
    "name",
    ["", "/", "/etc/passwd", "../x", "a/../../x", "a/..", "C:\\x", "c:x", "..\\x", "a\\..\\..\\x", "x\0y"],
)
def test_safe_member_path_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeArchiveError):
        safe_member_path(tmp_path, name)


def test_safe_member_path_rejects_a_symlinked_directory_pointing_outside(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_member_path(dest, "link/evil.txt")


@pytest.mark.parametrize(
    "name, relative", [("a/b.txt", "a/b.txt"), ("./a//b.txt", "a/b.txt"), ("dir/", "dir"), ("a\\b.txt", "a/b.txt")]
)
def test_safe_member_path_keeps_safe_names_under_dest(tmp_path: Path, name: str, relative: str) -> None:
    assert safe_member_path(tmp_path, name) == tmp_path / relative


@pytest.mark.parametrize("order", [("a", "a/b"), ("a/b", "a")], ids=["file-then-member", "member-then-file"])
def test_a_file_and_a_folder_of_the_same_name_reject_the_second(tmp_path: Path, order: tuple[str, str]) -> None:
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in order:
            zf.writestr(name, name.encode())
        zf.writestr("keep.mp4", b"good")

    for _ in range(2):  # and again on a re-run over what the first run left
        result = extract_zip(archive, tmp_path / "out")
        assert [name for name, _ in result.rejected] == [order[1]]
        assert "path conflict" in result.rejected[0][1]
        assert result.extracted == tuple(sorted([tmp_path / "out" / order[0], tmp_path / "out" / "keep.mp4"]))
    assert (tmp_path / "out" / order[0]).read_bytes() == order[0].encode()


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns when writing one; that is the point here
def test_duplicate_members_keep_the_first_and_are_each_recorded(tmp_path: Path) -> None:
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("id00001/abcdefghijk/00001.mp4", b"first")
        zf.writestr("id00001/abcdefghijk/00001.mp4", b"second, longer")  # zipfile warns; the format allows it
        zf.writestr("./id00001/abcdefghijk/00001.mp4", b"third")

    result = extract_zip(archive, tmp_path / "out")

    assert (tmp_path / "out" / "id00001/abcdefghijk/00001.mp4").read_bytes() == b"first"
    names = [name for name, _ in result.rejected]
    assert names == ["./id00001/abcdefghijk/00001.mp4", "id00001/abcdefghijk/00001.mp4#2"]  # unique row ids
    assert all("duplicate member" in reason for _, reason in result.rejected)


def test_zip_bomb_over_the_total_limit_extracts_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", b"\0" * 2_000_000)
        zf.writestr("b.bin", b"\0" * 2_000_000)

    with pytest.raises(ArchiveError, match="4000000 bytes in total, over the limit of 3000000"):
        extract_zip(archive, tmp_path / "out", max_total_bytes=3_000_000)
    assert not (tmp_path / "out").exists()

    # Under the total limit, the compression ratio (~1000:1 for zeros) still refuses each member.
    result = extract_zip(archive, tmp_path / "out", max_total_bytes=5_000_000, max_ratio=100)
    assert result.extracted == () and [name for name, _ in result.rejected] == ["a.bin", "b.bin"]
    assert "compression ratio" in result.rejected[0][1]
    assert _files(tmp_path / "out") == set()
    # Ordinary media (mp4 hardly compresses) passes the same limits.
    assert (
        extract_zip(_zip(tmp_path / "ok.zip", MEMBERS), tmp_path / "ok", max_total_bytes=10**6, max_ratio=100).rejected
        == ()
    )
