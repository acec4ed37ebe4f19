"""Corpus lists (HDTF, CelebV-HQ, TalkVid) in their published formats, and one entry cut end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.ingest import run
from preprocessing.ingest import lists, manifest, youtube
from preprocessing.ingest.probe import probe_media
from tests.test_youtube import FPS, HEIGHT, VIDEO_ID, WIDTH, served  # noqa: F401 - `served` is a fixture

LICENCE = "test licence"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _hdtf_folder(tmp_path: Path) -> Path:
    """Two subsets as in HDTF_dataset/ (a BOM, no final newline, trailing spaces), with bad lines."""
    folder = tmp_path / "HDTF_dataset"
    folder.mkdir()
    _write(
        folder,
        "RD_video_url.txt",
        "\ufeffRadio11 https://www.youtube.com/watch?v=XtySvTwIOfw\n"
        "Radio2 https://www.youtube.com/watch?v=uBWJJvynXpA&t=6s\n"
        "Radio3 https://example.com/watch?v=y-JQqnqmEgg\n"
        "Radio4 https://www.youtube.com/watch?v=short\n"
        "Radio6 https://www.youtube.com/watch?v=Va0qWOj25zg\n"
        "Radio7 https://www.youtube.com/watch?v=B_3izB77AEo",
    )
    _write(
        folder,
        "RD_annotion_time.txt",
        "Radio11.mp4 00:30-01:00 01:30-02:30 \n"
        "Radio2.mp4 00:22-01:45 01:50-01:40\n"
        "Radio3.mp4 00:05-00:10\n"
        "Radio4.mp4 00:05-00:10\n"
        "Radio5.mp4 00:05-00:10\n"
        "Radio6.mp4 00:05-01:00:00\n"
        "../etc.mp4 00:05-00:10\n"
        "Radio7.mp4 00:05-00:10",
    )
    _write(
        folder,
        "RD_crop_wh.txt",
        "Radio11_0.mp4 412 599 0 599\nRadio11_1.mp4 557 478 0 478\nRadio2_0.mp4 473 468 0 468\n"
        "Radio2_1.mp4 473 468 0 468\nRadio3_0.mp4 1 1 1 1\nRadio4_0.mp4 1 1 1 1\nRadio5_0.mp4 1 1 1 1\n"
        "Radio6_0.mp4 1 1 1 1\nRadio7_0.mp4 1 1 1 1\nRadio9_0.mp4 1 1 1 1\nRadio11_2.mp4 400 -5 0 5\n",
    )
    _write(
        folder, "RD_resolution.txt", "Radio11.mp4 720\nRadio2.mp4 720\nRadio3.mp4 720\nRadio4.mp4 0\nRadio6.mp4 720\n"
    )
    _write(folder, "WRA_video_url.txt", "AmyKlobuchar0 https://youtu.be/v0PFtc_fMgY\n")
    _write(folder, "WRA_annotion_time.txt", "AmyKlobuchar0.mp4 00:05-00:09.5\n")
    _write(folder, "WRA_crop_wh.txt", "AmyKlobuchar0_0.mp4 600 500 600 500\n")
    _write(folder, "WRA_resolution.txt", "AmyKlobuchar0.mp4 1080\n")
    return folder


def test_hdtf_lists_parse_to_entries_and_bad_lines_to_rows(tmp_path):
    entries, bad = lists.read_hdtf(_hdtf_folder(tmp_path), ["RD", "WRA", "WDA"], LICENCE, 900)
    by_id = {e.clip_id: e for e in entries}
    assert sorted(by_id) == ["hdtf:RD/Radio11_0", "hdtf:RD/Radio11_1", "hdtf:RD/Radio2_0"]  # WRA: box off frame
    second = by_id["hdtf:RD/Radio11_1"]
    assert (second.youtube_id, second.speaker_id, second.start_s, second.end_s) == (
        "XtySvTwIOfw",
        "hdtf:Radio11",
        90,
        150,
    )
    assert (second.box, second.box_units, second.box_height, second.licence) == (
        (557, 0, 478, 478),
        "pixel",
        720,
        LICENCE,
    )
    assert second.frames() == (2250, 3749)
    assert by_id["hdtf:RD/Radio2_0"].youtube_id == "uBWJJvynXpA"  # `&t=6s` ignored

    errors = {row["clip_id"]: row["error"] for row in bad}
    assert all(row["status"] == manifest.BAD_METADATA and row["licence"] == LICENCE for row in bad)
    expected = {
        "hdtf:RD_video_url.txt:3": "not a YouTube URL",
        "hdtf:RD_video_url.txt:4": "not a YouTube id",
        "hdtf:RD_annotion_time.txt:2#1": "negative or empty",
        "hdtf:RD_annotion_time.txt:3": "Radio3 is not listed in RD_video_url.txt",  # its URL line was bad
        "hdtf:RD_annotion_time.txt:4": "Radio4 is not listed in RD_video_url.txt",
        "hdtf:RD_annotion_time.txt:5": "Radio5 is not listed in RD_video_url.txt",
        "hdtf:RD_annotion_time.txt:6#0": "longer than 900",
        "hdtf:RD_annotion_time.txt:7": "not a plain clip name",
        "hdtf:RD_annotion_time.txt:8": "Radio7 is not listed in RD_resolution.txt",
        "hdtf:RD_crop_wh.txt:10": "Radio9_0, which RD_annotion_time.txt has no span for",
        "hdtf:RD_crop_wh.txt:11": "four pixel counts",
        "hdtf:RD_resolution.txt:4": "frame height",
        "hdtf:WRA_annotion_time.txt:1#0": "rows 600..1100 lie outside the 1080 px high frame",
        "hdtf:WDA": "missing",
    }
    for clip_id, reason in expected.items():
        assert reason in errors.pop(clip_id), clip_id
    assert errors == {}  # nothing else, and nothing twice (Radio3-5's boxes are not reported again)


def test_hdtf_pixel_box_scales_to_the_downloaded_frame(tmp_path):
    entries, _ = lists.read_hdtf(_hdtf_folder(tmp_path), ["RD"], LICENCE, 900)
    entry = next(e for e in entries if e.clip_id == "hdtf:RD/Radio11_1")
    frames, boxes = lists.track(entry, 1920, 1080)  # listed for 720p, downloaded at 1080p
    assert frames.tolist() == [2250, 3749]
    np.testing.assert_allclose(boxes, [[557 * 1.5 / 1920, 0, 478 * 1.5 / 1920, 478 / 720]] * 2)
    with pytest.raises(lists.ListError, match="outside the 480x360 frame"):
        lists.track(entry, 480, 360)  # x 278-517 px at 360p: past the edge of a 4:3 frame


def _celebvhq(tmp_path: Path) -> Path:
    clip = {
        "ytb_id": "M2Ohb0FAaJU",
        "duration": {"start_sec": 81.62, "end_sec": 86.17},
        "bbox": {"top": 0.0, "bottom": 0.8815, "left": 0.1964, "right": 0.6922},
        "attributes": {"appearance": [0, 1], "action": [0], "emotion": {"sep_flag": False, "labels": "neutral"}},
        "version": "v0.1",
    }
    clips = {
        "M2Ohb0FAaJU_1": clip,
        "_0tf2n3rlJU_0": clip | {"ytb_id": "_0tf2n3rlJU"},
        "bad_box": clip | {"bbox": {"top": 0.5, "bottom": 0.2, "left": 0.1, "right": 0.3}},
        "bad_id": clip | {"ytb_id": "M2Ohb0FAaJ/"},
        "inverted": clip | {"duration": {"start_sec": 9, "end_sec": 3}},
        "huge": clip | {"duration": {"start_sec": 0, "end_sec": 1e9}},
        "no_box": {"ytb_id": "M2Ohb0FAaJU", "duration": {"start_sec": 1, "end_sec": 2}},
        "../../x": clip,
    }
    return _write(tmp_path, "celebvhq_info.json", json.dumps({"meta_info": {}, "clips": clips}))


def test_celebvhq_info_parses_fraction_boxes_and_rejects_bad_clips(tmp_path):
    entries, bad = lists.read_celebvhq(_celebvhq(tmp_path), LICENCE, 600)
    assert [e.clip_id for e in entries] == ["celebvhq:M2Ohb0FAaJU_1", "celebvhq:_0tf2n3rlJU_0"]
    first = entries[0]
    assert (first.youtube_id, first.speaker_id, first.start_s, first.end_s) == (
        "M2Ohb0FAaJU",
        "celebvhq:M2Ohb0FAaJU",
        81.62,
        86.17,
    )
    np.testing.assert_allclose(first.box, [0.1964, 0.0, 0.6922 - 0.1964, 0.8815])
    assert first.box_units == "fraction" and first.frames() == (2041, 2154)
    row = lists.entry_row(first, tmp_path / "out")
    assert row["media_path"] == str(tmp_path / "out" / "celebvhq" / "M2Ohb0FAaJU_1.mp4")
    assert (row["frame_start"], row["track_frames"], row["licence"]) == (2041, 114, LICENCE)

    errors = {row["clip_id"]: row["error"] for row in bad}
    assert sorted(errors) == [
        "celebvhq:bad_box",
        "celebvhq:bad_id",
        "celebvhq:celebvhq_info.json:7",
        "celebvhq:huge",
        "celebvhq:inverted",
        "celebvhq:no_box",
    ]
    assert "not inside the frame" in errors["celebvhq:bad_box"]
    assert "not a YouTube id" in errors["celebvhq:bad_id"]
    assert "not a plain clip name" in errors["celebvhq:celebvhq_info.json:7"]
    assert errors["celebvhq:inverted"].startswith("celebvhq_info.json:clips[4]: span 9.0-3.0 s")
    assert "longer than 600" in errors["celebvhq:huge"]


def test_unreadable_list_files_are_one_row_each(tmp_path):
    broken = _write(tmp_path, "celebvhq_info.json", '{"clips": [')
    _, bad = lists.read_celebvhq(broken, LICENCE, 600)
    assert [(r["clip_id"], r["status"]) for r in bad] == [("celebvhq:celebvhq_info.json", manifest.BAD_METADATA)]
    _, bad = lists.read_talkvid(_write(tmp_path, "t.json", "[{"), LICENCE, 600)
    assert "not a TalkVid list" in bad[0]["error"]


def _talkvid_item(youtube_id: str, start: float, end: float, **extra) -> dict:
    return {
        "id": f"videovideo{youtube_id}-scene1-scene1",
        "height": 1080,
        "width": 1920,
        "fps": 24.0,
        "start-time": start,
        "start-frame": 0,
        "end-time": end,
        "end-frame": 121,
        "durations": f"{end - start:.3f}s",
        "info": {"Person ID": "597", "Video Link": f"https://www.youtube.com/watch?v={youtube_id}"},
        "dover_scores": 8.9,
    } | extra


def test_talkvid_json_and_json_lines(tmp_path):
    items = [
        _talkvid_item("Tr6MMsoWAog", 0.1, 5.141666666666667),
        _talkvid_item("Tr6MMsoWAog", 0.1, 5.2),  # the same id again
        _talkvid_item("Tr6MMsoWAog", float("nan"), 5.2, id="nan"),
        _talkvid_item("Tr6MMsoWAog", 1, 2, id="boxed", bbox={"top": 0.1, "bottom": 0.5, "left": 0.4, "right": 0.6}),
        _talkvid_item("x", 1, 2, id="noid"),
        "not an object",
    ]
    entries, bad = lists.read_talkvid(_write(tmp_path, "talkvid.json", json.dumps(items)), LICENCE, 600)
    assert [e.clip_id for e in entries] == ["talkvid:videovideoTr6MMsoWAog-scene1-scene1", "talkvid:boxed"]
    first = entries[0]
    assert (first.youtube_id, first.speaker_id, first.box, first.frames()) == (
        "Tr6MMsoWAog",
        "talkvid:597",
        None,
        (3, 128),
    )
    np.testing.assert_allclose(entries[1].box, [0.4, 0.1, 0.2, 0.4])
    frames, boxes = lists.track(first, 1920, 1080)  # no box: the centred full-height square
    np.testing.assert_allclose(boxes, [[420 / 1920, 0, 1080 / 1920, 1]] * 2)
    errors = {row["clip_id"]: row["error"] for row in bad}
    assert "listed again (first at talkvid.json:item 0)" in errors["talkvid:talkvid.json:item 1"]
    assert "not finite" in errors["talkvid:talkvid.json:item 2"]
    assert "not a YouTube id" in errors["talkvid:talkvid.json:item 4"]
    assert "not an object" in errors["talkvid:talkvid.json:item 5"]

    jsonl = _write(tmp_path, "talkvid.jsonl", json.dumps(items[0]) + "\n{oops\n" + json.dumps(items[3]) + "\n")
    entries, bad = lists.read_talkvid(jsonl, LICENCE, 600)
    assert len(entries) == 2 and [r["clip_id"] for r in bad] == ["talkvid:talkvid.jsonl:2"]
    assert bad[0]["error"].startswith("talkvid.jsonl:2: not JSON")


def _served_clips() -> dict:
    box = {"top": 0.25, "bottom": 0.75, "left": 0.25, "right": 0.5}  # 160 x 180 px of the 640 x 360 video
    return {
        "served_0": {"ytb_id": VIDEO_ID, "duration": {"start_sec": 1.0, "end_sec": 2.0}, "bbox": box},
        "gone_0": {"ytb_id": "Gone_video1", "duration": {"start_sec": 1.0, "end_sec": 2.0}, "bbox": box},
        "late_0": {"ytb_id": VIDEO_ID, "duration": {"start_sec": 3.5, "end_sec": 9.0}, "bbox": box},
    }


def test_a_list_entry_is_cut_by_the_youtube_path(served, tmp_path, params):  # noqa: F811 - the fixture
    """Download from 127.0.0.1, cut 1.0-2.0 s and crop the CelebV-HQ box, as the flow does (no Prefect)."""
    _, port = served
    info = _write(tmp_path, "celebvhq_info.json", json.dumps({"meta_info": {}, "clips": _served_clips()}))
    entries, _ = lists.read_celebvhq(info, params.ingest.celebvhq.licence, 600)
    entry = next(e for e in entries if e.name == "served_0")
    row = lists.entry_row(entry, tmp_path / "out")
    reference = youtube.fetch_reference(
        entry.youtube_id, f"http://127.0.0.1:{port}/{{youtube_id}}.mp4", tmp_path / "dl", ytdlp_format="best"
    )
    frames, boxes = lists.track(entry, *youtube.frame_size(reference))
    Path(row["media_path"]).parent.mkdir(parents=True)
    assert frames.tolist() == [25, 49] and youtube.frame_size(reference) == (WIDTH, HEIGHT)
    cut = youtube.cut_and_crop(reference, frames, boxes, Path(row["media_path"]), size=64, enlarge=1.0, smooth_frames=1)
    assert (cut["n_frames"], cut["start_s"], cut["end_s"]) == (25, 1.0, 2.0)
    assert cut["max_outside_fraction"] == pytest.approx(0.0, abs=1e-9)  # the 180 px square lies inside
    probed = row | probe_media(row["media_path"])
    assert (probed["status"], probed["n_frames"], probed["width"], probed["height"]) == ("ok", 25, 64, 64)
    assert probed["duration_s"] == pytest.approx(1.0, abs=0.05)
    assert probed["licence"] == params.ingest.celebvhq.licence and probed["source_kind"] == "celebvhq"


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # 2 busy cores can take minutes
        yield


@pytest.mark.slow
def test_ingest_flow_cuts_celebvhq_entries(prefect_harness, served, tmp_path, params):  # noqa: F811 - the fixture
    """The whole stage: statuses per entry, the licence on every row, the clip's length and size."""
    _, port = served
    info = _write(tmp_path, "celebvhq_info.json", json.dumps({"meta_info": {}, "clips": _served_clips()}))
    youtube_cfg = params.ingest.youtube.replace(
        url_template=f"http://127.0.0.1:{port}/{{youtube_id}}.mp4", format="best", size=64, retries=0
    )
    cfg = params.ingest.replace(sources=("celebvhq",), youtube=youtube_cfg)
    counts = run(cfg, tmp_path / "out", celebvhq_json=info, downloads_dir=tmp_path / "dl")
    assert counts == {"ok": 1, "unavailable": 1, "unreadable_media": 1}
    rows = {row["clip_id"]: row for row in manifest.read_manifest(tmp_path / "out" / "manifest.parquet")}
    ok = rows["celebvhq:served_0"]
    assert (ok["source_kind"], ok["n_frames"], ok["width"], ok["height"], ok["fps"]) == ("celebvhq", 25, 64, 64, FPS)
    assert ok["duration_s"] == pytest.approx(1.0, abs=0.05)
    assert rows["celebvhq:gone_0"]["status"] == manifest.UNAVAILABLE
    assert "lie outside" in rows["celebvhq:late_0"]["error"]  # the span runs past the 4 s video
    assert {row["licence"] for row in rows.values()} == {params.ingest.celebvhq.licence}
