"""The takedown denylist: parsing, matching and deterministic writes."""

from __future__ import annotations

import pytest

from preprocessing import denylist
from preprocessing.denylist import Denylist, DenylistError, Request

ROW = {"clip_id": "vox:id1/abc/00001", "speaker_id": "id1", "youtube_id": "abc", "source_url": None}


def test_missing_file_is_empty(tmp_path):
    assert not denylist.load(tmp_path / "none.csv")


@pytest.mark.parametrize(
    ("kind", "id_", "hit"),
    [("speaker", "id1", True), ("speaker", "id2", False), ("video", "abc", True), ("clip", "vox:id1/abc/00001", True)],
)
def test_match_by_kind(kind, id_, hit):
    found = Denylist((Request(kind, id_, "asked", "2026-11-22"),)).reason(ROW)
    assert (found is not None) == hit
    if hit:
        assert id_ in found and "asked" in found


def test_video_falls_back_to_source_url():
    row = ROW | {"youtube_id": None, "source_url": "https://example.org/v.mp4"}
    assert Denylist((Request("video", "https://example.org/v.mp4", "r", "2026-11-22"),)).match(row)


def test_add_is_sorted_unique_and_byte_stable(tmp_path):
    path = tmp_path / "d.csv"
    b = Request("speaker", "b", "second", "2026-11-22")
    a = Request("clip", "a", "first", "2026-11-21")
    assert denylist.add(path, b) and denylist.add(path, a)
    assert not denylist.add(path, b)
    first = path.read_bytes()
    assert first.decode().splitlines() == [
        "kind,id,reason,date",
        "clip,a,first,2026-11-21",
        "speaker,b,second,2026-11-22",
    ]
    denylist.write(path, denylist.load(path))
    assert path.read_bytes() == first


@pytest.mark.parametrize(
    "fields",
    [
        ("person", "x", "r", "2026-11-22"),
        ("speaker", " ", "r", "2026-11-22"),
        ("speaker", "x", "", "2026-11-22"),
        ("speaker", "x", "r", "22/11/2026"),
    ],
)
def test_bad_requests_are_refused(fields):
    with pytest.raises(DenylistError):
        Request(*fields)


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("who,why\nx,y\n")
    with pytest.raises(DenylistError, match="header"):
        denylist.load(path)
    path.write_text("kind,id,reason,date\nspeaker,x,,2026-11-22\n")
    with pytest.raises(DenylistError, match=str(path.name)):
        denylist.load(path)


def test_marking_a_manifest_table_equals_marking_its_rows():
    from preprocessing.ingest import manifest
    from preprocessing.survey import mark

    rows = [
        manifest.new_row(
            f"vox:id{i % 4}/v{i % 3}/{i:05d}", "voxceleb2", speaker_id=f"id{i % 4}", youtube_id=f"v{i % 3}"
        )
        for i in range(24)
    ]
    rows[5] |= {"youtube_id": "", "source_url": "https://example.org/v.mp4"}  # video id falls back to the URL
    rows[6] |= {"speaker_id": None, "youtube_id": None}
    requests = (
        Request("speaker", "id1", "asked", "2026-11-22"),
        Request("video", "https://example.org/v.mp4", "r", "2026-11-21"),
        Request("clip", rows[8]["clip_id"], "c", "2026-11-20"),
        Request("video", "v2", "v", "2026-11-19"),
    )
    deny = Denylist(tuple(sorted(requests)))
    expected, covered = denylist.mark(rows, deny)
    table, keys = mark(manifest.to_table(rows), deny)
    assert table.to_pylist() == expected and keys == [row["key"] for row in covered]
    assert 0 < len(keys) < len(rows)
    assert mark(manifest.to_table(rows), Denylist())[1] == []
