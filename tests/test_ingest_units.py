"""Fast unit tests of ingest's library parts (no Prefect, no media decoding beyond tiny files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from preprocessing.ingest import incremental, manifest, sources, splits, voxceleb
from vasa.core.errors import InputError


@pytest.mark.parametrize(
    "text",
    ["plain/name.mp4", "back\\slash", "caf\udce9.mp4", "\\xff literal", "both\\\udcff\\x41", "é ü ß 中"],
)
def test_escape_is_reversible_and_valid_utf8(text):
    escaped = manifest.escape_text(text)
    escaped.encode("utf-8")  # storable in parquet
    assert manifest.unescape_text(escaped) == text
    if "\\" not in text and text.isprintable() and "\udce9" not in text:
        assert escaped == text  # clean names are stored unchanged


def test_splits_are_whole_speakers_stable_and_respect_test():
    rows = [manifest.new_row(f"local:{s}/{n}.mp4", "local", speaker_id=s) for s in ("alice", "bob") for n in range(3)]
    rows.append(manifest.new_row("local:dave/0.mp4", "local", speaker_id="dave", split="test"))
    out = splits.assign_splits(rows, holdout=("bob",), val_fraction=0.35)
    by_speaker = {}
    for row in out:
        by_speaker.setdefault(row["speaker_id"], set()).add(row["split"])
    assert by_speaker == {"alice": {"val"}, "bob": {"test"}, "dave": {"test"}}  # alice: unit 0.17 < 0.35
    assert splits.assign_splits(out, holdout=(), val_fraction=0.0)[0]["split"] == "train"  # val goes back
    assert splits.assign_splits(out, holdout=(), val_fraction=0.99)[-1]["split"] == "test"  # test stays
    assert splits.speaker_unit("alice") == splits.speaker_unit("alice") and 0 <= splits.speaker_unit("x") < 1


def test_plan_rehashes_on_changed_stamp_and_keeps_this_runs_provenance(tmp_path):
    media = tmp_path / "a.mp4"
    media.write_bytes(b"12345")
    old = manifest.new_row(
        "local:a.mp4", "local", media_path=str(media), sha256="abc", size_bytes=5, licence="old", n_frames=3
    )
    state_path = tmp_path / "state.json"
    stamp = incremental.FileStamp.of(media)
    incremental.write_state(state_path, [old], {"local:a.mp4": stamp})
    state = incremental.read_state(state_path)
    fresh = manifest.new_row("local:a.mp4", "local", media_path=str(media), licence="new")

    ready, todo = incremental.plan([fresh], {"local:a.mp4": old}, state)
    assert todo == [] and ready[0]["sha256"] == "abc" and ready[0]["n_frames"] == 3 and ready[0]["licence"] == "new"

    media.write_bytes(b"54321")  # same size, new content
    os.utime(media, ns=(stamp.mtime_ns, stamp.mtime_ns + 1))
    assert incremental.plan([fresh], {"local:a.mp4": old}, state) == ([], [fresh])
    assert incremental.plan([fresh], {"local:a.mp4": old}, {}) == ([], [fresh])  # no state: re-hash


def test_vanished_rows_are_marked_not_dropped(tmp_path):
    kept = manifest.new_row("local:gone.mp4", "local", media_path=str(tmp_path / "gone.mp4"), sha256="abc")
    failed = manifest.new_row("local:bad.mp4", "local", media_path=str(tmp_path / "bad.mp4"), status="unreadable_media")
    out = incremental.mark_vanished([kept, failed], fresh_ids=set())
    assert out[0]["status"] == "missing_media" and out[0]["sha256"] == "abc" and "vanished" in out[0]["error"]
    assert out[1] == failed  # an earlier failure keeps its own reason
    assert incremental.mark_vanished([kept], fresh_ids={"local:gone.mp4"}) == [kept]


def test_scan_local_records_bad_csv_rows_and_folders(params, tmp_path):
    videos = tmp_path / "videos"
    (videos / "alice").mkdir(parents=True)
    for name in ("alice/one.mp4", "alice/two.mp4", "bob.mp4"):
        (videos / name).write_bytes(b"not probed here")
    (tmp_path / "outside").mkdir()
    (videos / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    csv_path = tmp_path / "meta.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbffile,speaker_id\n"  # UTF-8 with a BOM
        b"bob.mp4,Bob\n"
        b"./bob.mp4,Mallory\n"
        b"alice/one.mp4,alice,extra\n"
        b'alice/two.mp4,"alice\n'
        b"lost.mp4,lost\n"
    )
    rows = {row["clip_id"]: row for row in sources.scan_local(videos, params.ingest.local, csv_path)}
    assert rows["local:bob.mp4"]["speaker_id"] == "Bob"
    assert {cid: rows[cid]["status"] for cid in rows if rows[cid]["status"] != "ok"} == {
        "local:linked/": "skipped_link",
        "local:meta.csv:line3": "bad_metadata",
        "local:meta.csv:line4": "bad_metadata",
        "local:meta.csv:line5": "bad_metadata",
    }
    assert "unterminated quote" in rows["local:meta.csv:line5"]["error"]
    assert rows["local:alice/one.mp4"]["speaker_id"] == "alice"  # from its folder: its CSV row was refused


def test_scan_local_names_an_unusable_csv(params, tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "meta.csv").write_text("name,speaker\nx.mp4,a\n")
    with pytest.raises(sources.SourceError, match="no column 'file'"):
        sources.scan_local(tmp_path / "v", params.ingest.local, tmp_path / "meta.csv")
    with pytest.raises(sources.SourceError, match="cannot read metadata CSV"):
        sources.scan_local(tmp_path / "v", params.ingest.local, tmp_path / "absent.csv")


def test_write_manifest_refuses_unknown_splits(tmp_path):
    row = manifest.new_row("local:a", "local", split="validation")
    with pytest.raises(ValueError, match="unknown splits"):
        manifest.write_manifest(tmp_path / "m.parquet", [row])
    assert not Path(tmp_path / "m.parquet").exists()


def _vox_tree(root: Path, clips: int = 4) -> None:
    """A VoxCeleb2-layout tree: clean metadata for every clip, media (not probed here) for all but the last."""
    for n in range(clips):
        speaker, youtube_id, utterance = f"id0000{n % 2}", f"vid{n:08d}", f"{n:05d}"
        txt = root / "txt" / speaker / youtube_id / f"{utterance}.txt"
        txt.parent.mkdir(parents=True)
        rows = "".join(f"{100 + i:06d} \t0.{n + 1}00 \t0.200 \t0.400 \t0.600 \n" for i in range(5))
        header = f"Identity  :\t{speaker}\nReference :\t{youtube_id}\nOffset    :\t{n}\n\nFRAME \tX \tY \tW \tH \n"
        txt.write_text(header + rows)
        if n < clips - 1:
            mp4 = root / "mp4" / speaker / youtube_id / f"{utterance}.mp4"
            mp4.parent.mkdir(parents=True)
            mp4.write_bytes(b"media")


def test_voxceleb_rescan_reads_only_changed_metadata(tmp_path, monkeypatch):
    root, out = tmp_path / "vox", tmp_path / "out"
    _vox_tree(root)
    parsed = []
    real_parse = voxceleb.parse_metadata
    monkeypatch.setattr(voxceleb, "parse_metadata", lambda text: parsed.append(text) or real_parse(text))

    def ingest(previous: dict, recorded: dict) -> tuple[bytes, dict]:
        rows, stamps = voxceleb.scan(root, "cc-by", previous, recorded)
        manifest.write_manifest(out / "manifest.parquet", rows)
        incremental.write_state(out / "state.json", rows, {}, stamps)
        return (out / "manifest.parquet").read_bytes(), stamps

    full, stamps = ingest({}, {})
    assert len(parsed) == 4 and len(stamps) == 4
    previous = {row["clip_id"]: row for row in manifest.read_manifest(out / "manifest.parquet")}
    _, recorded = incremental.read_states(out / "state.json")
    assert recorded == stamps

    parsed.clear()
    again, _ = ingest(previous, recorded)
    assert parsed == [] and again == full  # nothing read, same bytes (float32 track columns included)

    # A youtube-only ingest keeps only the re-cut rows: their carried track is reused just the same.
    recuts = [voxceleb.youtube_row(row, tmp_path / "yt") for row in previous.values()]
    recuts = {row["clip_id"]: row for row in recuts}
    assert voxceleb.scan(root, "cc-by", recuts, recorded)[0] == voxceleb.scan(root, "cc-by", previous, recorded)[0]
    assert parsed == []

    touched = root / "txt" / "id00001" / "vid00000001" / "00001.txt"
    touched.write_text(touched.read_text().replace("\t0.200 ", "\t0.250 "))
    info = touched.stat()
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    changed, _ = ingest(previous, recorded)
    assert len(parsed) == 1 and "vid00000001" in parsed[0]
    rows = {row["clip_id"]: row for row in manifest.read_manifest(out / "manifest.parquet")}
    assert rows["voxceleb2:id00001/vid00000001/00001"]["bbox_y"] == pytest.approx(0.25)
    assert changed != full


def test_a_manifest_from_before_an_added_column_reads_with_nulls_there(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "manifest.parquet"
    manifest.write_manifest(path, [manifest.new_row("local:a.mp4", "local", max_outside_fraction=0.25)])
    assert manifest.read_manifest(path)[0]["max_outside_fraction"] == 0.25
    older = pq.read_table(path).drop_columns(list(manifest.ADDED_COLUMNS))
    pq.write_table(older, path)
    rows = manifest.read_manifest(path)
    assert rows[0]["clip_id"] == "local:a.mp4" and rows[0]["max_outside_fraction"] is None
    pq.write_table(older.drop_columns(["licence"]), path)  # a column that was always there: still refused
    with pytest.raises(InputError, match="missing columns"):
        manifest.read_manifest(path)


def test_a_file_name_that_is_not_utf8_survives_the_manifest_table(tmp_path):
    name = str(tmp_path / "media" / "caf\udce9 \\ x.mp4")  # a byte that is not UTF-8, and a backslash
    path = tmp_path / "data" / "manifest.parquet"
    manifest.write_manifest(path, [manifest.new_row("local:caf\\xe9.mp4", "local", media_path=name)])
    table = manifest.read_table(path)  # Arrow strings are UTF-8: the path column stays escaped
    assert table["media_path"][0].as_py() == manifest.escape_text(name)
    assert manifest.row_dicts(table)[0]["media_path"] == name == manifest.read_manifest(path)[0]["media_path"]
    again = manifest.to_table(manifest.read_manifest(path))
    assert again.equals(table) and manifest.row_dicts(again)[0]["media_path"] == name
