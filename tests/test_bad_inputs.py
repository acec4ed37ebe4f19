"""Issue 8 §2, shown end to end: a folder holding every kind of bad input goes through `vasa ingest`
and `vasa preprocess` (the CLI, in subprocesses, from two different working directories). Both
exit 0; each bad item is one manifest row with its status and reason; every good clip is in the shards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from preprocessing.ingest import manifest
from tests.conftest import REPO

pytestmark = pytest.mark.slow

GOOD_VOX = "vox2_517600055.mp4"  # 4.5 s, 224², one frontal face: yields samples
OTHER_VOX = "vox2_620900105.mp4"
VOX_MEMBER = "mp4/id06209/AbCdEfGhIjK/00105.mp4"


def _inputs(root: Path, fixtures: Path, sample_corpus: Path) -> tuple[Path, Path, list[Path]]:
    """(videos folder, metadata CSV, archives) holding the good clips and one of each bad input."""
    videos = root / "videos"
    (videos / "id05176").mkdir(parents=True)
    shutil.copy(fixtures / GOOD_VOX, videos / "id05176" / "a.mp4")
    (videos / "astronaut").mkdir()
    shutil.copy(sample_corpus / "astronaut_000.mp4", videos / "astronaut" / "astronaut_000.mp4")
    # A file name with a byte that is not UTF-8 (Latin-1 é), as old tools and cameras write them.
    shutil.copy(fixtures / OTHER_VOX, os.fsdecode(os.fsencode(videos) + b"/caf\xe9.mp4"))
    data = (fixtures / OTHER_VOX).read_bytes()
    (videos / "broken.mp4").write_bytes(data[: len(data) // 3])
    (root / "outside").mkdir()
    shutil.copy(fixtures / OTHER_VOX, root / "outside" / "x.mp4")
    (videos / "linked").symlink_to(root / "outside", target_is_directory=True)
    if os.geteuid() != 0:  # root reads any folder: no unreadable folder can be made
        (videos / "locked").mkdir()
        shutil.copy(fixtures / OTHER_VOX, videos / "locked" / "y.mp4")
        (videos / "locked").chmod(0)
    csv_path = root / "meta.csv"  # Latin-1, as Excel on Windows saves "CSV"
    csv_path.write_bytes(
        "file,speaker_id,licence\n"
        "id05176/a.mp4,Zoë,CC-BY-4.0\n"
        "./id05176/a.mp4,mallory,CC0\n"  # names the same file as line 2: must not overwrite it
        "astronaut/astronaut_000.mp4,astronaut,public-domain,extra\n"  # an extra field
        'broken.mp4,"unterminated,CC0\n'.encode("latin-1")  # a quote never closed
    )
    archives = root / "archives"
    archives.mkdir()
    (archives / "corrupt.zip").write_bytes(b"PK\x03\x04" + bytes(300))
    with zipfile.ZipFile(archives / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("mp4/id00001/abcdefghijk/00001.mp4", bytes(3_000_000))  # 3 MB of zeros, ~3 kB packed
    with zipfile.ZipFile(archives / "vox.zip", "w") as handle:
        handle.writestr(VOX_MEMBER, (fixtures / OTHER_VOX).read_bytes())  # the good clip
        handle.writestr(VOX_MEMBER, b"a second member of the same name")
        handle.writestr("a", b"a file")
        handle.writestr("a/b", b"a member under that file")
    return videos, csv_path, [archives / name for name in ("corrupt.zip", "bomb.zip", "vox.zip")]


def _params(path: Path, archives: list[Path]) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["ingest"].update(sources=["local", "voxceleb2"], val_fraction=0.0)
    data["preprocess"]["shards"]["pin"] = None  # a project of its own: no shard pin file (one trie)
    data["ingest"]["voxceleb2"].update(
        archives=[
            {"name": a.name, "md5": None, "parts": [{"url": str(a), "md5": None, "size": None}]} for a in archives
        ],
        max_extract_bytes=2_000_000,
        retries=0,
    )
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _vasa(cwd: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "vasa.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, f"vasa {args[2]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the duplicate archive member is written on purpose
def test_every_bad_input_is_a_row_and_every_good_clip_reaches_the_shards(fixtures_dir, sample_corpus, tmp_path):
    _, _, archives = _inputs(tmp_path / "inputs", fixtures_dir, sample_corpus)
    _params(tmp_path / "params.yaml", archives)
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",  # 2 busy cores start a server slowly
    }
    # Relative paths on purpose: preprocess runs from another folder and must still find the media.
    _vasa(
        tmp_path,
        "--params",
        "params.yaml",
        "ingest",
        "--out",
        "ingest",
        "--local-dir",
        "inputs/videos",
        "--local-csv",
        "inputs/meta.csv",
        "--downloads",
        "downloads",
        env=env,
    )
    rows = {row["clip_id"]: row for row in manifest.read_manifest(tmp_path / "ingest" / "manifest.parquet")}
    expected_bad = {
        "local:broken.mp4": ("unreadable_media", ""),
        "local:linked/": ("skipped_link", "not followed"),
        "local:meta.csv:line3": ("bad_metadata", "duplicate of line 2"),
        "local:meta.csv:line4": ("bad_metadata", "4 fields, the header has 3"),
        "local:meta.csv:line5": ("bad_metadata", "unterminated"),
        "voxceleb2-archive:corrupt.zip": ("bad_archive", "not a readable zip"),
        "voxceleb2-archive:bomb.zip": ("bad_archive", "over the limit"),
        f"voxceleb2-archive:vox.zip:{VOX_MEMBER}#2": ("unsafe_archive_member", "duplicate member"),
        "voxceleb2-archive:vox.zip:a/b": ("unsafe_archive_member", "path conflict"),
    }
    if os.geteuid() != 0:
        expected_bad["local:locked/"] = ("unreadable_path", "Permission denied")
    good = [
        "local:astronaut/astronaut_000.mp4",
        "local:caf\\xe9.mp4",
        "local:id05176/a.mp4",
        "voxceleb2:id06209/AbCdEfGhIjK/00105",
    ]
    assert sorted(rows) == sorted([*expected_bad, *good])
    for clip_id, (status, reason) in expected_bad.items():
        assert rows[clip_id]["status"] == status and reason in (rows[clip_id]["error"] or ""), rows[clip_id]
    assert all(rows[clip_id]["status"] == "ok" for clip_id in good), {c: rows[c]["error"] for c in good}
    assert rows["local:id05176/a.mp4"]["speaker_id"] == "Zoë"  # read from the Latin-1 CSV, line 2 kept

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _vasa(
        elsewhere,
        "--params",
        "../params.yaml",
        "preprocess",
        "--manifest",
        "../ingest/manifest.parquet",
        "--out",
        "../shards",
        "--cache",
        "../cache",
        env=env,
    )
    keys_in_shards = set()
    for shard in sorted((tmp_path / "shards").rglob("*.tar")):
        with tarfile.open(shard) as tar:
            keys_in_shards |= {member.name.split(".", 1)[0] for member in tar.getmembers()}
    for clip_id in good:
        key = rows[clip_id]["key"]
        assert any(sample.startswith(f"{key}_") for sample in keys_in_shards), f"{clip_id} ({key}) has no sample"
