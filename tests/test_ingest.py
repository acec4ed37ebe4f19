"""Stage `ingest`: sources -> one manifest, with every failure a recorded row."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from flows.ingest import MANIFEST_NAME, run
from preprocessing.ingest import manifest, probe, sources, voxceleb
from preprocessing.media import write_mp4

pytestmark = pytest.mark.slow

METADATA = (
    "Identity  :\t{speaker}\nReference :\t{youtube}\nOffset    :\t{offset}\nFV Conf   :\t16.140\t(1)\n"
    "ASD Conf  :\t5.142\n\nFRAME \tX \tY \tW \tH \n{rows}"  # column names keep their trailing spaces
)


def metadata_text(speaker: str, youtube: str, first: int = 100, count: int = 20, offset: int = 2) -> str:
    rows = "\n".join(f"{first + i:06d} \t0.300 \t0.200 \t0.400 \t0.600 " for i in range(count))
    return METADATA.format(speaker=speaker, youtube=youtube, offset=offset, rows=rows) + "\n"


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # 2 busy cores can take minutes
        yield


def _config(params, **updates):
    return params.ingest.replace(**updates)


def _manifest(out: Path) -> pd.DataFrame:
    """The manifest as read_manifest gives it (media paths absolute)."""
    return pd.DataFrame(manifest.read_manifest(out / MANIFEST_NAME)).set_index("clip_id")


def _talking_clip(path: Path, seconds: float = 1.0, audio: bool = True, size: int = 64) -> Path:
    n = int(seconds * 25)
    frames = np.zeros((n, size, size, 3), np.uint8)
    frames[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = np.linspace(50, 200, n, dtype=np.uint8)[
        :, None, None, None
    ]
    sound = (0.1 * np.sin(np.arange(n * 640) * 0.05)).astype(np.float32) if audio else None
    write_mp4(path, frames, 25, sound, 16000)
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# --- manifest ------------------------------------------------------------------------------


def test_manifest_is_sorted_typed_and_byte_stable(tmp_path):
    rows = [manifest.new_row(f"local:{name}", "local", speaker_id="s", licence="x") for name in ("b", "a", "c")]
    manifest.write_manifest(tmp_path / "one.parquet", rows)
    manifest.write_manifest(tmp_path / "two.parquet", list(reversed(rows)))
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    back = manifest.read_manifest(tmp_path / "one.parquet")
    assert [r["clip_id"] for r in back] == ["local:a", "local:b", "local:c"]
    assert back[0]["key"] == hashlib.sha1(b"local:a").hexdigest()[:16]
    with pytest.raises(ValueError, match="duplicate"):
        manifest.write_manifest(tmp_path / "x.parquet", rows + rows[:1])
    with pytest.raises(ValueError, match="unknown statuses"):
        manifest.write_manifest(tmp_path / "x.parquet", [rows[0] | {"status": "fine"}])
    with pytest.raises(KeyError, match="not manifest columns"):
        manifest.new_row("local:a", "local", speakr="s")


def test_merge_keeps_unseen_rows_and_takes_this_runs_view():
    old = manifest.new_row("local:a", "local", sha256="1", size_bytes=1, licence="unknown")
    gone = manifest.new_row("local:gone", "local", sha256="9", size_bytes=9)
    relicensed = old | {"licence": "CC-BY-4.0"}  # provenance from this run's CSV must not go stale
    changed = old | {"sha256": "2"}
    assert manifest.merge([old, gone], [relicensed]) == [relicensed, gone]
    assert manifest.merge([old], [changed]) == [changed]


# --- VoxCeleb metadata -------------------------------------------------------------------------


def test_parse_metadata_fractions_pixels_and_errors():
    track = voxceleb.parse_metadata(metadata_text("id00017", "_mjZ87sK6cA", first=8809, count=3))
    assert (track.speaker_id, track.youtube_id, track.offset, track.units) == ("id00017", "_mjZ87sK6cA", 2, "fraction")
    assert track.frames.tolist() == [8809, 8810, 8811]
    assert track.fv_conf == pytest.approx(16.14) and track.asd_conf == pytest.approx(5.142)
    assert track.summary()["bbox_w"] == pytest.approx(0.4)
    pixels = metadata_text("id10001", "1zcIwhmdeo4").replace("0.300 \t0.200 \t0.400 \t0.600", "120 \t80 \t160 \t240")
    assert voxceleb.parse_metadata(pixels).units == "pixel"
    broken = metadata_text("id00017", "_mjZ87sK6cA").replace("000105 \t0.300", "000105 \tabc")
    with pytest.raises(voxceleb.MetadataError, match="non-numeric"):
        voxceleb.parse_metadata(broken)
    with pytest.raises(voxceleb.MetadataError, match="FRAME"):
        voxceleb.parse_metadata("Identity  :\tid00017\n")
    with pytest.raises(voxceleb.MetadataError, match="line 8: expected 5 fields"):
        voxceleb.parse_metadata(metadata_text("id00017", "_mjZ87sK6cA").replace("0.600 \n", "\n", 1))


def test_utterance_paths():
    utterance = voxceleb.parse_utterance_path("test/mp4/id00017/_mjZ87sK6cA/00001.mp4")
    assert utterance == voxceleb.Utterance("id00017", "_mjZ87sK6cA", "00001", "test")
    assert utterance.clip_id == "voxceleb2:id00017/_mjZ87sK6cA/00001"
    assert voxceleb.parse_utterance_path("dev/mp4/id00012/21Uxsk56VDQ/00001.mp4").split == "train"
    with pytest.raises(voxceleb.MetadataError):
        voxceleb.parse_utterance_path("mp4/id17/_mjZ87sK6cA/00001.mp4")


# --- probing -------------------------------------------------------------------------------------


def test_probe_statuses(tmp_path):
    good = probe.probe_media(_talking_clip(tmp_path / "good.mp4"))
    assert good["status"] == manifest.OK and good["n_frames"] == 25 and good["fps"] == 25
    assert good["audio_sample_rate"] == 16000 and good["duration_s"] == pytest.approx(1.0)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    expected = {
        "truncated.mp4": manifest.UNREADABLE,
        "empty.mp4": manifest.UNREADABLE,
        "noise.mp4": manifest.UNREADABLE,
        "silent.mp4": manifest.MISSING_AUDIO,
        "audio_only.mp4": manifest.NO_VIDEO,
        "absent.mp4": manifest.MISSING_MEDIA,
    }
    _talking_clip(tmp_path / "silent.mp4", audio=False)
    _audio_only(tmp_path / "audio_only.mp4")
    for name, status in expected.items():
        result = probe.probe_media(tmp_path / name)
        assert result["status"] == status, (name, result)
        assert result["error"]


# --- sources through the flow ------------------------------------------------------------------


def test_sample_source_manifest(prefect_harness, params, sample_corpus, tmp_path):
    cfg = _config(params, sources=("sample",))
    counts = run(cfg, tmp_path / "a", sample_dir=sample_corpus)
    assert counts == {"ok": 8}
    df = _manifest(tmp_path / "a")
    assert set(df.speaker_id) == {"astronaut", "grace_hopper"}
    assert set(df.licence) == {"public-domain"} and set(df.split) == {"train"}
    for clip_id, row in df.iterrows():
        assert hashlib.sha256(Path(row.media_path).read_bytes()).hexdigest() == row.sha256, clip_id
        assert row.fps == 25 and row.audio_sample_rate == 16000 and 3 <= row.duration_s <= 6
    run(cfg, tmp_path / "b", sample_dir=sample_corpus)
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()


def test_local_source_bad_inputs_and_incremental(prefect_harness, params, tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    (folder / "alice").mkdir(parents=True)
    _talking_clip(folder / "alice" / "one.mp4")
    _talking_clip(folder / "bob.mp4", seconds=2)
    _talking_clip(folder / "silent.mp4", audio=False)
    _audio_only(folder / "audio_only.mp4")
    data = (folder / "bob.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("not a video")
    csv = tmp_path / "meta.csv"
    csv.write_text(
        "file,speaker_id,licence,source_url\n"
        "bob.mp4,bob,CC-BY-4.0,https://example.org/bob\n"
        "missing.mp4,carol,CC0,\n"
        "../escape.mp4,mallory,CC0,\n"
    )
    cfg = _config(params, sources=("local",))
    out = tmp_path / "out"
    run(cfg, out, local_dir=folder, local_csv=csv)
    df = _manifest(out)
    status = df.status.to_dict()
    assert status == {
        "local:alice/one.mp4": "ok",
        "local:bob.mp4": "ok",
        "local:silent.mp4": "missing_audio",
        "local:audio_only.mp4": "no_video",
        "local:truncated.mp4": "unreadable_media",
        "local:zero.mp4": "unreadable_media",
        "local:missing.mp4": "missing_media",
        "local:meta.csv:line4": "bad_metadata",
    }
    assert df.loc["local:bob.mp4", "speaker_id"] == "bob" and df.loc["local:bob.mp4", "licence"] == "CC-BY-4.0"
    assert df.loc["local:alice/one.mp4", "speaker_id"] == "alice"
    assert df.loc["local:alice/one.mp4", "licence"] == cfg.local.default_licence
    before = (out / MANIFEST_NAME).read_bytes()

    # Incremental: a new file is probed; nothing already ingested is probed (or changed) again.
    _talking_clip(folder / "alice" / "two.mp4")
    probed = []
    real_probe = probe.probe_media
    monkeypatch.setattr(probe, "probe_media", lambda path: probed.append(Path(path).name) or real_probe(path))
    run(cfg, out, local_dir=folder, local_csv=csv)
    assert probed == ["two.mp4"]
    after = _manifest(out)
    assert after.loc["local:alice/two.mp4", "status"] == "ok"
    assert after.drop(index="local:alice/two.mp4").equals(df)
    assert before != (out / MANIFEST_NAME).read_bytes()


def test_missing_source_folder_is_a_clear_error(prefect_harness, params, tmp_path):
    with pytest.raises(sources.SourceError, match="local source folder not found"):
        run(_config(params, sources=("local",)), tmp_path / "out", local_dir=tmp_path / "nope")
    with pytest.raises(sources.SourceError, match="--sample-dir"):
        run(_config(params, sources=("sample",)), tmp_path / "out")


def test_shared_fixtures_as_local_source(prefect_harness, params, fixtures_dir, tmp_path):
    columns = {"file": "file", "licence": "repo_license", "source_url": "source_repo"}
    local = params.ingest.local.replace(csv_columns=columns)
    cfg = _config(params, sources=("local",), local=local)
    run(cfg, tmp_path / "out", local_dir=fixtures_dir, local_csv=fixtures_dir / "PROVENANCE.csv")
    df = _manifest(tmp_path / "out")
    videos = sorted(p.name for p in fixtures_dir.glob("*.mp4"))
    assert sorted(df.index) == [f"local:{name}" for name in videos]
    assert set(df.status) == {"ok"}, df[df.status != "ok"][["status", "error"]]
    info = pd.read_csv(fixtures_dir / "MEDIAINFO.csv").set_index("file")
    for name in videos:
        row = df.loc[f"local:{name}"]
        assert row.width == info.loc[name, "width"] and row.audio_sample_rate == info.loc[name, "audio_sample_rate"]
        assert row.duration_s == pytest.approx(info.loc[name, "duration_s"], abs=0.1)
        assert row.licence and row.source_url
    assert df.loc["local:vid03_retalking_face1.mp4", "fps"] < 25  # the variable-frame-rate clip


# --- VoxCeleb2-shaped archives -----------------------------------------------------------------


def _vox_archives(root: Path, clip: bytes) -> dict[str, Path]:
    """A miniature VoxCeleb2 release: dev mp4 split in two parts, a test mp4 zip, a txt zip."""
    root.mkdir(parents=True, exist_ok=True)
    dev = root / "vox2_dev_mp4.zip"
    with zipfile.ZipFile(dev, "w") as archive:
        archive.writestr("dev/mp4/id00012/21Uxsk56VDQ/00001.mp4", clip)
        archive.writestr("dev/mp4/id00012/21Uxsk56VDQ/00002.mp4", clip[: len(clip) // 4])  # truncated
        archive.writestr("dev/mp4/id00015/0fijmz4vTVU/00001.mp4", clip)
        archive.writestr("../../evil.mp4", b"zip-slip")
    data = dev.read_bytes()
    (root / "vox2_dev_mp4_partaa").write_bytes(data[: len(data) // 2])
    (root / "vox2_dev_mp4_partab").write_bytes(data[len(data) // 2 :])
    dev.unlink()
    with zipfile.ZipFile(root / "vox2_test_mp4.zip", "w") as archive:
        archive.writestr("mp4/id06811/AbCdEfGhIjK/00216.mp4", clip)
    with zipfile.ZipFile(root / "vox2_txt.zip", "w") as archive:
        archive.writestr("txt/id00012/21Uxsk56VDQ/00001.txt", metadata_text("id00012", "21Uxsk56VDQ", offset=-1))
        archive.writestr("txt/id00012/21Uxsk56VDQ/00002.txt", metadata_text("id00012", "21Uxsk56VDQ"))
        archive.writestr("txt/id00012/21Uxsk56VDQ/00003.txt", metadata_text("id00012", "21Uxsk56VDQ"))
        archive.writestr("txt/id00015/0fijmz4vTVU/00001.txt", "Identity  :\tid00015\ngarbage line\n")
        archive.writestr("txt/id06811/AbCdEfGhIjK/00216.txt", metadata_text("id06811", "AbCdEfGhIjK", first=500))
        archive.writestr("txt/id09999/ZZZZZZZZZZZ/00001.txt", metadata_text("id09999", "ZZZZZZZZZZZ"))
    return {p.name: p for p in root.iterdir()}


def test_voxceleb2_archives(prefect_harness, params, fixtures_dir, tmp_path):
    clip = (fixtures_dir / "vox2_681100216.mp4").read_bytes()
    files = _vox_archives(tmp_path / "release", clip)

    def part(name):
        return {"url": str(files[name]), "md5": hashlib.md5(files[name].read_bytes()).hexdigest(), "size": None}

    archives = [
        {"name": "vox2_dev_mp4.zip", "parts": [part("vox2_dev_mp4_partaa"), part("vox2_dev_mp4_partab")], "md5": None},
        {"name": "vox2_test_mp4.zip", "parts": [part("vox2_test_mp4.zip")], "md5": None},
        {"name": "vox2_txt.zip", "parts": [part("vox2_txt.zip")], "md5": None},
    ]
    vox = params.ingest.voxceleb2.replace(archives=archives)
    cfg = _config(params, sources=("voxceleb2",), voxceleb2=vox, holdout_speakers=("id00015",))
    out = tmp_path / "out"
    run(cfg, out, downloads_dir=tmp_path / "downloads")
    df = _manifest(out)
    assert not (tmp_path / "evil.mp4").exists() and not (out.parent / "evil.mp4").exists()
    good = df.loc["voxceleb2:id00012/21Uxsk56VDQ/00001"]
    assert (good.status, good.speaker_id, good.youtube_id, good.utterance) == ("ok", "id00012", "21Uxsk56VDQ", "00001")
    assert (good.frame_start, good.frame_end, good.track_frames, good.av_offset) == (100, 119, 20, -1)
    assert good.bbox_units == "fraction" and good.split == "train" and good.fps == 25
    assert good.sha256 == hashlib.sha256(clip).hexdigest()
    assert df.loc["voxceleb2:id00012/21Uxsk56VDQ/00002", "status"] == "unreadable_media"
    assert df.loc["voxceleb2:id00012/21Uxsk56VDQ/00003", "status"] == "missing_media"
    assert df.loc["voxceleb2:id00015/0fijmz4vTVU/00001", "status"] == "bad_metadata"
    assert df.loc["voxceleb2:id00015/0fijmz4vTVU/00001", "split"] == "test"  # holdout param
    test_clip = df.loc["voxceleb2:id06811/AbCdEfGhIjK/00216"]
    assert (test_clip.status, test_clip.split, test_clip.frame_start) == ("ok", "test", 500)
    assert not any("id09999" in c for c in df.index)  # metadata of a speaker whose media was not ingested
    unsafe = df[df.status == "unsafe_archive_member"]
    assert len(unsafe) == 1 and "evil" in unsafe.index[0]
    # Re-running ingests nothing twice and gives the same bytes.
    before = (out / MANIFEST_NAME).read_bytes()
    run(cfg, out, downloads_dir=tmp_path / "downloads")
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_failed_download_is_a_row_not_a_crash(prefect_harness, params, tmp_path):
    broken = {
        "name": "vox2_test_mp4.zip",
        "parts": [{"url": str(tmp_path / "absent"), "md5": None, "size": None}],
        "md5": None,
    }
    vox = params.ingest.voxceleb2.replace(archives=[broken], retries=0)
    run(_config(params, sources=("voxceleb2",), voxceleb2=vox), tmp_path / "out")
    df = _manifest(tmp_path / "out")
    assert df.loc["voxceleb2-archive:vox2_test_mp4.zip", "status"] == "download_failed"


def test_extracted_tree_copy_is_scanned(prefect_harness, params, fixtures_dir, tmp_path):
    tree = tmp_path / "vox" / "test" / "mp4" / "id07312" / "AbCdEfGhIjK"
    tree.mkdir(parents=True)
    shutil.copy(fixtures_dir / "vox2_731200067.mp4", tree / "00067.mp4")
    run(_config(params, sources=("voxceleb2",)), tmp_path / "out", voxceleb_dirs=[tmp_path / "vox"])
    row = _manifest(tmp_path / "out").loc["voxceleb2:id07312/AbCdEfGhIjK/00067"]
    assert (row.status, row.split, row.speaker_id) == ("ok", "test", "id07312")


# --- YouTube re-download and credentials, against a server on 127.0.0.1 -------------------------


def test_youtube_source_recuts_tracks_and_records_unavailable(prefect_harness, params, tmp_path):
    from tests.http_server import running_server

    reference = _talking_clip(tmp_path / "reference.mp4", seconds=6, size=320)
    meta = tmp_path / "vox" / "txt"
    for speaker, youtube_id, first in (("id00012", "21Uxsk56VDQ", 25), ("id00012", "GoneGoneGon", 0)):
        (meta / speaker / youtube_id).mkdir(parents=True)
        (meta / speaker / youtube_id / "00001.txt").write_text(metadata_text(speaker, youtube_id, first, count=50))
    with running_server() as server:
        server.serve("/21Uxsk56VDQ.mp4", reference.read_bytes())
        youtube = params.ingest.youtube.replace(url_template=server.base + "/{youtube_id}.mp4", size=128, retries=0)
        cfg = _config(params, sources=("youtube",), youtube=youtube)
        run(cfg, tmp_path / "out", voxceleb_dirs=[tmp_path / "vox"], downloads_dir=tmp_path / "dl")
        requests_made = len(server.state.requests)
        run(cfg, tmp_path / "out", voxceleb_dirs=[tmp_path / "vox"], downloads_dir=tmp_path / "dl")
        assert len(server.state.requests) == requests_made + 1  # only the unavailable one is asked again
    df = _manifest(tmp_path / "out")
    cut = df.loc["youtube:id00012/21Uxsk56VDQ/00001"]
    assert (cut.status, cut.source_kind, cut.n_frames, cut.width, cut.fps) == ("ok", "youtube", 50, 128, 25)
    assert (cut.frame_start, cut.frame_end) == (25, 74)
    gone = df.loc["youtube:id00012/GoneGoneGon/00001"]
    assert gone.status == "unavailable" and "GoneGoneGon" in gone.error


def test_credentials_come_from_env_and_never_land_anywhere(prefect_harness, params, tmp_path, monkeypatch, caplog):
    from tests.http_server import running_server

    secret = "Sup3r-Secret-Pa55"
    archive = tmp_path / "vox2_test_mp4.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("mp4/id07312/AbCdEfGhIjK/00067.mp4", _talking_clip(tmp_path / "c.mp4").read_bytes())
    with running_server() as server:
        server.state.credentials = ("vox", secret)
        url = server.serve("/vox2_test_mp4.zip", archive.read_bytes())
        vox = params.ingest.voxceleb2.replace(
            archives=[{"name": "vox2_test_mp4.zip", "parts": [{"url": url, "md5": None, "size": None}], "md5": None}],
            retries=0,
        )
        cfg = _config(params, sources=("voxceleb2",), voxceleb2=vox)
        run(cfg, tmp_path / "denied")  # no credentials in the environment: a recorded 401
        denied = _manifest(tmp_path / "denied").loc["voxceleb2-archive:vox2_test_mp4.zip"]
        assert denied.status == "download_failed" and "AuthError" in denied.error
        monkeypatch.setenv("VOX_USER", "vox")
        monkeypatch.setenv("VOX_PASSWORD", secret)
        run(cfg, tmp_path / "granted")
    df = _manifest(tmp_path / "granted")
    assert df.loc["voxceleb2:id07312/AbCdEfGhIjK/00067", "status"] == "ok"
    assert df.loc["voxceleb2:id07312/AbCdEfGhIjK/00067", "split"] == "test"
    for path in (tmp_path / "granted").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text
    assert secret not in json.dumps(cfg.model_dump())
