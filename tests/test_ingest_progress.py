"""Progress bars of download, join and extract: counts, totals and resume offsets on stderr, no secrets."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tqdm import tqdm

from preprocessing.ingest import archive, download
from preprocessing.ingest.archive import extract_zip, join_parts
from preprocessing.ingest.download import DownloadError, RemoteFile, url_file_name
from tests.http_server import Server
from tests.test_download import _payload

USER, PASSWORD = "vox", "s3cret-Pa55word"
TOKEN = "sig-0f1e2d3c4b5a69788796a5b4"
CHUNK = 1024


class _RecordedBar(tqdm):
    """tqdm that remembers every bar it made, so a test can read totals and counts after close."""

    made: list[tqdm] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[tqdm]:
    made: list[tqdm] = []
    recorded = type("RecordedBar", (_RecordedBar,), {"made": made})
    monkeypatch.setattr(download, "tqdm", recorded)
    monkeypatch.setattr(archive, "tqdm", recorded)
    return made


def _size(n: int) -> str:
    """How a bytes bar with unit_scale and divisor 1024 prints `n`."""
    return tqdm.format_sizeof(n, divisor=1024)


def _secret_url(server: Server, path: str, body: bytes) -> str:
    """A URL carrying a password in its user-info and a signed-URL token in its query."""
    server.state.credentials = (USER, PASSWORD)
    url = server.serve(path, body).replace("http://", f"http://{USER}:{PASSWORD}@")
    return f"{url}?X-Amz-Signature={TOKEN}&expires=9999999999"


def _assert_no_secret(err: str) -> None:
    for secret in (PASSWORD, TOKEN, "X-Amz-Signature", f"{USER}:"):
        assert secret not in err


def test_download_bar_names_the_file_counts_every_byte_and_hides_secrets(
    server: Server, tmp_path: Path, bars: list[tqdm], capsys: pytest.CaptureFixture[str]
) -> None:
    body = _payload(100_000)
    url = _secret_url(server, "/vox2_test_mp4.zip", body)
    name = url_file_name(url)

    path = download.download(RemoteFile(url, name, size=len(body)), tmp_path, chunk_bytes=CHUNK)

    assert path.read_bytes() == body
    [bar] = bars
    assert (bar.desc, bar.total, bar.n) == (f"download {name}", len(body), len(body))
    err = capsys.readouterr().err
    assert "download vox2_test_mp4.zip: 100%" in err
    assert f"{_size(len(body))}/{_size(len(body))}" in err
    _assert_no_secret(err)


def test_resumed_partial_starts_the_bar_at_the_bytes_already_there(
    server: Server, tmp_path: Path, bars: list[tqdm], capsys: pytest.CaptureFixture[str]
) -> None:
    body = _payload(100_000, seed=1)
    url = _secret_url(server, "/vox2_dev_mp4_partaa", body)
    parts = urlsplit(url)
    server.state.cut_after[f"{parts.path}?{parts.query}"] = 40_000  # the server keys cuts by the requested path
    remote = RemoteFile(url, "vox2_dev_mp4_partaa")  # no size: totals come from the server's headers

    with pytest.raises(DownloadError, match="interrupted"):
        download.download(remote, tmp_path, chunk_bytes=CHUNK)
    kept = (tmp_path / "vox2_dev_mp4_partaa.partial").stat().st_size
    assert 0 < kept < len(body)
    path = download.download(remote, tmp_path, chunk_bytes=CHUNK)

    assert path.read_bytes() == body
    cut, resumed = bars
    assert (cut.total, cut.n) == (len(body), kept)  # total from Content-Length
    assert resumed.total == len(body)  # total from Content-Range
    assert resumed.n == len(body)
    # The resumed bar's first line already shows the kept bytes.
    err = capsys.readouterr().err
    assert f"{_size(kept)}/{_size(len(body))}" in err
    assert f"{_size(len(body))}/{_size(len(body))}" in err
    _assert_no_secret(err)


def test_local_copy_bar_counts_the_source_size(tmp_path: Path, bars: list[tqdm]) -> None:
    body = _payload(30_000, seed=2)
    source = tmp_path / "src" / "vox2_meta.csv"
    source.parent.mkdir()
    source.write_bytes(body)

    path = download.download(RemoteFile(str(source), "vox2_meta.csv"), tmp_path / "out", chunk_bytes=CHUNK)

    assert path.read_bytes() == body
    [bar] = bars
    assert (bar.desc, bar.total, bar.n) == ("download vox2_meta.csv", len(body), len(body))


def test_verified_file_on_disk_shows_no_bar(
    server: Server, tmp_path: Path, bars: list[tqdm], capsys: pytest.CaptureFixture[str]
) -> None:
    body = _payload(5_000, seed=3)
    remote = RemoteFile(server.serve("/part", body), "part", size=len(body))
    download.download(remote, tmp_path)
    capsys.readouterr()

    download.download(remote, tmp_path)

    assert len(bars) == 1  # only the first call transferred anything
    assert capsys.readouterr().err == ""


def test_join_bar_counts_the_bytes_of_every_part(
    tmp_path: Path, bars: list[tqdm], capsys: pytest.CaptureFixture[str]
) -> None:
    sizes = (20_000, 20_000, 7_000)
    parts = []
    for i, size in enumerate(sizes):
        part = tmp_path / f"vox2_dev_mp4_parta{'abc'[i]}"
        part.write_bytes(_payload(size, seed=10 + i))
        parts.append(part)

    joined = join_parts(parts, tmp_path / "vox2_dev_mp4.zip")

    assert joined.read_bytes() == b"".join(p.read_bytes() for p in parts)
    [bar] = bars
    assert (bar.desc, bar.total, bar.n) == ("join vox2_dev_mp4.zip", sum(sizes), sum(sizes))
    assert f"{_size(sum(sizes))}/{_size(sum(sizes))}" in capsys.readouterr().err


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    return path


def test_extract_bar_counts_members_including_refused_and_present_ones(
    tmp_path: Path, bars: list[tqdm], capsys: pytest.CaptureFixture[str]
) -> None:
    members = {f"dev/mp4/id0000{i}/abcdefghijk/00001.mp4": _payload(2_000, seed=i) for i in range(4)}
    members["../escape.mp4"] = b"zip-slip"
    zip_path = _zip(tmp_path / "vox2_test_mp4.zip", members)

    first = extract_zip(zip_path, tmp_path / "out")
    again = extract_zip(zip_path, tmp_path / "out")  # every file already present: still counted

    assert len(first.extracted) == 4 and len(first.rejected) == 1
    assert again == first
    assert [(bar.desc, bar.total, bar.n) for bar in bars] == [("extract vox2_test_mp4.zip", 5, 5)] * 2
    err = capsys.readouterr().err
    assert err.count("extract vox2_test_mp4.zip: 100%") == 2
    assert "5/5" in err


def test_empty_archive_shows_no_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zip_path = _zip(tmp_path / "empty.zip", {})

    assert extract_zip(zip_path, tmp_path / "out").extracted == ()
    assert capsys.readouterr().err == ""
