"""Stage `ingest`: sources -> one manifest, with every failure a recorded row."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from flows.ingest import MANIFEST_NAME, run
from preprocessing.ingest import manifest, probe, sources, splits, voxceleb
from preprocessing.media import write_mp4
from vasa.core.errors import InputError

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
    # object dtype: a media path may hold an undecodable byte (a surrogate) that arrow strings refuse
    return pd.DataFrame(manifest.read_manifest(out / MANIFEST_NAME), dtype=object).set_index("clip_id")


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


def test_youtube_source_recuts_tracks_and_records_unavailable(prefect_harness, params, tmp_path, monkeypatch):
    from tests.http_server import running_server

    reference = _talking_clip(tmp_path / "reference.mp4", seconds=6, size=320)
    meta = tmp_path / "vox" / "txt"
    for speaker, youtube_id, first in (("id00012", "21Uxsk56VDQ", 25), ("id00012", "GoneGoneGon", 0)):
        (meta / speaker / youtube_id).mkdir(parents=True)
        (meta / speaker / youtube_id / "00001.txt").write_text(metadata_text(speaker, youtube_id, first, count=50))
    with running_server() as server:
        server.serve("/21Uxsk56VDQ.mp4", reference.read_bytes())
        # retries: a 404 must not be retried (each retry would wait 30 s and ask the server again)
        youtube = params.ingest.youtube.replace(
            url_template=server.base + "/{youtube_id}.mp4", size=128, retries=2, retry_delay_s=30
        )
        cfg = _config(params, sources=("youtube",), youtube=youtube)
        run(cfg, tmp_path / "out", voxceleb_dirs=[tmp_path / "vox"], downloads_dir=tmp_path / "dl")
        requests_made = len(server.state.requests)
        parsed = []
        real_parse = voxceleb.parse_metadata
        monkeypatch.setattr(voxceleb, "parse_metadata", lambda text: parsed.append(text) or real_parse(text))
        run(cfg, tmp_path / "out", voxceleb_dirs=[tmp_path / "vox"], downloads_dir=tmp_path / "dl")
        assert len(server.state.requests) == requests_made + 1  # only the unavailable one is asked again
        assert parsed == []  # unchanged metadata is not read again, not even for the youtube-only rows
    df = _manifest(tmp_path / "out")
    cut = df.loc["youtube:id00012/21Uxsk56VDQ/00001"]
    assert (cut.status, cut.source_kind, cut.n_frames, cut.width, cut.fps) == ("ok", "youtube", 50, 128, 25)
    assert (cut.frame_start, cut.frame_end) == (25, 74)
    assert 0.0 <= cut.max_outside_fraction < 1.0  # recorded at the cut, kept by the second (no-op) run
    gone = df.loc["youtube:id00012/GoneGoneGon/00001"]
    assert gone.status == "unavailable" and "GoneGoneGon" in gone.error


ENV_SECRET, URL_SECRET, QUERY_SECRET, TOKEN_SECRET = "EnvPa55-q1w2", "UrlPa55-e3r4", "QuerySig-t5y6", "TokEnv-u7i8"
SECRETS = (ENV_SECRET, URL_SECRET, QUERY_SECRET, TOKEN_SECRET)


def test_secrets_never_land_in_prefect_db_logs_manifest_or_file_names(
    prefect_harness, params, tmp_path, monkeypatch, caplog, capfd
):
    """A secret in the environment, in a URL's user-info and in signed-URL query strings (literal and
    `${VAR}`): downloads work, a 404 and a wrong md5 fail at once, and no secret is stored or shown."""
    import logging

    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

    from tests.http_server import running_server

    caplog.set_level(logging.DEBUG)
    archive = tmp_path / "vox2_test_mp4.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("mp4/id07312/AbCdEfGhIjK/00067.mp4", _talking_clip(tmp_path / "c.mp4").read_bytes())
    monkeypatch.setenv("VOX_USER", "vox")
    monkeypatch.setenv("VOX_PASSWORD", ENV_SECRET)
    monkeypatch.setenv("VOX_TOKEN", TOKEN_SECRET)
    with running_server() as server:
        server.state.credentials = ("vox", ENV_SECRET)
        server.serve("/vox2_test_mp4.zip", archive.read_bytes())
        signed = server.base.replace("http://", f"http://vox:{URL_SECRET}@")
        query = f"?sig={QUERY_SECRET}&token=${{VOX_TOKEN}}"

        def one_part(name, url, md5=None):
            return {"name": name, "md5": None, "parts": [{"url": url, "md5": md5, "size": None}]}

        vox = params.ingest.voxceleb2.replace(
            archives=[
                one_part("vox2_test_mp4.zip", f"{signed}/vox2_test_mp4.zip{query}"),
                one_part("vox2_gone.zip", f"{signed}/gone.zip{query}"),  # 404
                one_part("vox2_bad_md5.zip", f"{signed}/vox2_test_mp4.zip{query}", md5="0" * 32),
            ],
            retries=3,
            retry_delay_s=30,  # a retry of a permanent error would make this test take minutes
        )
        cfg = _config(params, sources=("voxceleb2",), voxceleb2=vox)
        run(cfg, tmp_path / "out", downloads_dir=tmp_path / "downloads")
        seen = [request.path for request in server.state.requests]
    APILogWorker.drain_all()

    assert len(seen) == 3 and all(TOKEN_SECRET in path for path in seen)  # ${VOX_TOKEN} expanded; no retries
    df = _manifest(tmp_path / "out")
    assert df.loc["voxceleb2:id07312/AbCdEfGhIjK/00067", "status"] == "ok"
    assert df.loc["voxceleb2-archive:vox2_gone.zip", "status"] == "download_failed"
    assert "HTTP 404" in df.loc["voxceleb2-archive:vox2_gone.zip", "error"]
    assert "?<redacted>" in df.loc["voxceleb2-archive:vox2_gone.zip", "error"]
    assert "ChecksumError" in df.loc["voxceleb2-archive:vox2_bad_md5.zip", "error"]

    stores = {"captured log": caplog.text, "captured output": "".join(capfd.readouterr())}
    roots = [tmp_path / "out", tmp_path / "downloads", Path(PREFECT_HOME.value())]
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    db_bytes = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert b"vox2_gone.zip" in db_bytes  # the flow's parameters and logs are in this database
    for root in roots:
        for path in root.rglob("*"):
            stores[f"name {path}"] = str(path)
            if path.is_file():
                stores[str(path)] = path.read_bytes().decode("latin-1")
    stores["prefect database"] = db_bytes.decode("latin-1")
    for secret in SECRETS:
        leaks = [where for where, text in stores.items() if secret in text]
        assert not leaks, f"{secret} found in {leaks}"


# --- paths, bad local inputs, incremental re-runs, splits --------------------------------------


def test_read_manifest_resolves_paths_from_anywhere_and_refuses_a_missing_file(tmp_path, monkeypatch):
    media = tmp_path / "data" / "media" / "alice" / "a.mp4"
    raw_name = tmp_path / "data" / "media" / "bad\udcffname\\x.mp4"  # an undecodable byte and a backslash
    rows = [
        manifest.new_row("local:alice/a.mp4", "local", media_path=str(media)),
        manifest.new_row(f"local:{manifest.escape_text(raw_name.name)}", "local", media_path=str(raw_name)),
    ]
    path = tmp_path / "data" / "ingest" / MANIFEST_NAME
    manifest.write_manifest(path, rows)
    stored = pd.read_parquet(path).set_index("clip_id").media_path.to_dict()
    assert stored["local:alice/a.mp4"] == "../media/alice/a.mp4"  # relative to the manifest's folder
    assert stored["local:bad\\xffname\\\\x.mp4"] == "../media/bad\\xffname\\\\x.mp4"
    media.parent.mkdir(parents=True)
    monkeypatch.chdir(media.parent)  # another working directory
    back = {row["clip_id"]: row["media_path"] for row in manifest.read_manifest(path)}
    assert back["local:alice/a.mp4"] == str(media)
    assert back["local:bad\\xffname\\\\x.mp4"] == str(raw_name)  # the exact original name
    with pytest.raises(manifest.ManifestNotFoundError, match="manifst.parquet: manifest not found") as err:
        manifest.read_manifest(tmp_path / "data" / "ingest" / "manifst.parquet")
    assert isinstance(err.value, InputError)


def _local_tree(folder: Path) -> None:
    """alice/ (2 clips), bob.mp4, a non-UTF-8 name, a symlinked folder, an unlisted folder."""
    (folder / "alice").mkdir(parents=True)
    _talking_clip(folder / "alice" / "one.mp4")
    _talking_clip(folder / "alice" / "two.mp4")
    _talking_clip(folder / "bob.mp4")
    _talking_clip(Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.mp4")))  # latin-1 byte in the name
    (folder / "elsewhere").mkdir()
    (folder.parent / "outside").mkdir()
    _talking_clip(folder.parent / "outside" / "x.mp4")
    (folder / "linked").symlink_to(folder.parent / "outside", target_is_directory=True)
    (folder / "locked").mkdir()


def test_local_bad_inputs_are_rows_and_good_clips_land(prefect_harness, params, tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    _local_tree(folder)
    real_scandir = os.scandir

    def scandir(path):  # root ignores permissions, so "permission denied" is simulated
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    csv_path = tmp_path / "meta.csv"
    csv_path.write_bytes(
        "file,speaker_id,licence\n"
        "bob.mp4,Bob Müller,CC-BY-4.0\n"
        "./bob.mp4,mallory,CC0\n"  # the same file again: must not overwrite line 2
        "alice/one.mp4,alice,CC0,extra field\n"
        'alice/two.mp4,"alice,CC0\n'  # unterminated quote: swallows the rest of the file
        "never.mp4,never,CC0\n".encode("latin-1")
    )
    cfg = _config(params, sources=("local",), val_fraction=0.0)
    run(cfg, tmp_path / "out", local_dir=folder, local_csv=csv_path)
    df = _manifest(tmp_path / "out")
    status = df.status.to_dict()
    assert status == {
        "local:alice/one.mp4": "ok",
        "local:alice/two.mp4": "ok",
        "local:bob.mp4": "ok",
        "local:caf\\xe9.mp4": "ok",
        "local:linked/": "skipped_link",
        "local:locked/": "unreadable_path",
        "local:meta.csv:line3": "bad_metadata",
        "local:meta.csv:line4": "bad_metadata",
        "local:meta.csv:line5": "bad_metadata",
    }
    assert df.loc["local:bob.mp4", "speaker_id"] == "Bob Müller"  # latin-1 CSV read, first row kept
    assert "duplicate of line 2" in df.loc["local:meta.csv:line3", "error"]
    assert "4 fields, the header has 3" in df.loc["local:meta.csv:line4", "error"]
    assert "lines 5-6 lost" in df.loc["local:meta.csv:line5", "error"]
    assert "Permission denied" in df.loc["local:locked/", "error"]
    assert Path(df.loc["local:caf\\xe9.mp4", "media_path"]).is_file()  # resolves to the real file

    # A UTF-8 CSV with the BOM Excel writes reads the same as one without.
    csv_path.write_bytes("\ufefffile,speaker_id,licence\nbob.mp4,Bob Müller,CC-BY-4.0\n".encode())
    run(cfg, tmp_path / "bom", local_dir=folder, local_csv=csv_path)
    assert _manifest(tmp_path / "bom").loc["local:bob.mp4", "speaker_id"] == "Bob Müller"


def test_replaced_file_is_rehashed_vanished_file_is_marked(prefect_harness, params, tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    (folder / "alice").mkdir(parents=True)
    one, two = _talking_clip(folder / "alice" / "one.mp4"), _talking_clip(folder / "alice" / "two.mp4", seconds=2)
    cfg = _config(params, sources=("local",))
    out = tmp_path / "out"
    run(cfg, out, local_dir=folder)
    first = _manifest(out)

    # Same size, other bytes, written in place (a later mtime): must be hashed again.
    data = bytearray(one.read_bytes())
    data[len(data) // 2] ^= 0xFF
    one.write_bytes(bytes(data))
    stamp = one.stat()
    os.utime(one, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 2_000_000_000))
    two.unlink()
    probed = []
    real_probe = probe.probe_media
    monkeypatch.setattr(probe, "probe_media", lambda path: probed.append(Path(path).name) or real_probe(path))
    run(cfg, out, local_dir=folder)
    second = _manifest(out)
    assert probed == ["one.mp4"]
    assert second.loc["local:alice/one.mp4", "sha256"] == hashlib.sha256(data).hexdigest()
    assert second.loc["local:alice/one.mp4", "sha256"] != first.loc["local:alice/one.mp4", "sha256"]
    gone = second.loc["local:alice/two.mp4"]
    assert (gone.status, gone.sha256) == ("missing_media", first.loc["local:alice/two.mp4", "sha256"])
    assert "vanished" in gone.error

    # Nothing changed: nothing is read again, same bytes.
    before = (out / MANIFEST_NAME).read_bytes()
    probed.clear()
    run(cfg, out, local_dir=folder)
    assert probed == [] and (out / MANIFEST_NAME).read_bytes() == before


def test_val_split_is_whole_speakers_by_hash_and_holdout_stays_test(prefect_harness, params, tmp_path):
    folder = tmp_path / "videos"
    for speaker in ("alice", "bob", "carol", "id00012"):
        (folder / speaker).mkdir(parents=True)
        for n in range(2):
            _talking_clip(folder / speaker / f"{n}.mp4", seconds=0.4)
    # sha256-derived units: alice 0.17, carol 0.30, bob 0.51, id00012 0.77
    cfg = _config(params, sources=("local",), val_fraction=0.35, holdout_speakers=("carol",))
    run(cfg, tmp_path / "out", local_dir=folder)
    df = _manifest(tmp_path / "out")
    by_speaker = df.groupby("speaker_id").split.agg(set).to_dict()
    assert by_speaker == {"alice": {"val"}, "bob": {"train"}, "carol": {"test"}, "id00012": {"train"}}
    assert splits.speaker_unit("alice") < 0.35 <= splits.speaker_unit("bob")
    # Lowering the fraction moves alice back to train on a re-run; the manifest never holds another split name.
    run(cfg.replace(val_fraction=0.0), tmp_path / "out", local_dir=folder)
    assert set(_manifest(tmp_path / "out").split) == {"train", "test"}


def test_corrupt_archive_and_zip_bomb_do_not_lose_other_rows(prefect_harness, params, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    _talking_clip(folder / "alice.mp4")
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("mp4/id00001/abcdefghijk/00001.mp4", b"\0" * 3_000_000)
    with zipfile.ZipFile(tmp_path / "conflicts.zip", "w") as handle:
        clip = (folder / "alice.mp4").read_bytes()
        handle.writestr("mp4/id00002/abcdefghijk/00001.mp4", clip)
        handle.writestr("mp4/id00002/abcdefghijk/00001.mp4", b"second copy")
        handle.writestr("mp4/id00002/abcdefghijk/00001.mp4/inner", b"member under a file")

    def archive(name):
        return {"name": name, "md5": None, "parts": [{"url": str(tmp_path / name), "md5": None, "size": None}]}

    vox = params.ingest.voxceleb2.replace(
        archives=[archive("corrupt.zip"), archive("bomb.zip"), archive("conflicts.zip")],
        max_extract_bytes=2_000_000,
        retries=0,
    )
    cfg = _config(params, sources=("local", "voxceleb2"), voxceleb2=vox)
    run(cfg, tmp_path / "out", local_dir=folder, downloads_dir=tmp_path / "dl")
    df = _manifest(tmp_path / "out")
    assert df.loc["local:alice.mp4", "status"] == "ok"
    assert df.loc["voxceleb2:id00002/abcdefghijk/00001", "status"] == "ok"
    assert df.loc["voxceleb2-archive:corrupt.zip", "status"] == "bad_archive"
    assert "not a readable zip" in df.loc["voxceleb2-archive:corrupt.zip", "error"]
    assert df.loc["voxceleb2-archive:bomb.zip", "status"] == "bad_archive"
    assert "over the limit" in df.loc["voxceleb2-archive:bomb.zip", "error"]
    assert not (tmp_path / "out" / "voxceleb2" / "bomb").exists()
    refused = df[df.status == "unsafe_archive_member"].error.to_dict()
    assert len(refused) == 2, refused
    assert any("duplicate member" in e for e in refused.values()) and any(
        "path conflict" in e for e in refused.values()
    )
