"""Resumable, verified downloads against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import logging
import random
import socket
import zipfile
from pathlib import Path

import pytest

from preprocessing.ingest.archive import join_parts
from preprocessing.ingest.download import (
    AuthError,
    ChecksumError,
    DeadlineError,
    DownloadError,
    RemoteFile,
    download,
    download_with_retries,
    expand_env,
    file_digest,
    redact_url,
    url_file_name,
)
from tests.http_server import Server

USER, PASSWORD = "vox", "s3cret-Pa55word"
WRONG_PASSWORD = "not-the-Pa55word-42"
CHUNK = 1024  # small chunks, so an interrupted transfer has written something before the cut


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _remote(url: str, name: str, body: bytes) -> RemoteFile:
    """A RemoteFile that names the size and both digests of `body`."""
    return RemoteFile(
        url, name, size=len(body), md5=hashlib.md5(body).hexdigest(), sha256=hashlib.sha256(body).hexdigest()
    )


def test_download_verifies_size_md5_and_sha256(server: Server, tmp_path: Path) -> None:
    body = _payload(100_000)
    remote = _remote(server.serve("/vox2_test_mp4.zip", body), "vox2_test_mp4.zip", body)

    path = download(remote, tmp_path / "raw", chunk_bytes=CHUNK)

    assert path == tmp_path / "raw" / "vox2_test_mp4.zip"
    assert path.read_bytes() == body
    assert file_digest(path, "md5") == remote.md5
    assert file_digest(path, "sha256") == remote.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["vox2_test_mp4.zip"]  # no .partial left
    assert [s.range for s in server.state.requests] == [None]


def test_split_parts_are_downloaded_then_joined_into_a_readable_zip(server: Server, tmp_path: Path) -> None:
    members = {f"dev/mp4/id0000{i}/abcdefghijk/00001.mp4": _payload(5_000, seed=i) for i in range(4)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    whole = buffer.getvalue()
    cuts = [0, len(whole) // 3, 2 * len(whole) // 3, len(whole)]
    remotes = []
    for suffix, start, end in zip(("aa", "ab", "ac"), cuts, cuts[1:], strict=False):
        name = f"vox2_dev_mp4_part{suffix}"
        remotes.append(_remote(server.serve(f"/{name}", whole[start:end]), name, whole[start:end]))

    parts = [download(remote, tmp_path / "parts", chunk_bytes=CHUNK) for remote in remotes]
    joined = join_parts(parts, tmp_path / "vox2_dev_mp4.zip")

    assert joined.read_bytes() == whole
    with zipfile.ZipFile(joined) as zf:
        assert zf.testzip() is None
        assert {name: zf.read(name) for name in zf.namelist()} == members


def test_interrupted_transfer_keeps_partial_and_resumes_with_range(server: Server, tmp_path: Path) -> None:
    body = _payload(100_000)
    remote = _remote(server.serve("/part", body), "part", body)
    server.state.cut_after["/part"] = 40_000

    with pytest.raises(DownloadError, match="interrupted") as excinfo:
        download(remote, tmp_path, chunk_bytes=CHUNK)
    assert not isinstance(excinfo.value, ChecksumError)
    partial = tmp_path / "part.partial"
    kept = partial.stat().st_size
    assert 0 < kept <= 40_000
    assert partial.read_bytes() == body[:kept]
    assert not (tmp_path / "part").exists()

    path = download(remote, tmp_path, chunk_bytes=CHUNK)

    assert server.state.requests[-1].range == f"bytes={kept}-"
    assert path.read_bytes() == body
    assert not partial.exists()


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    body = _payload(20_000)
    remote = _remote(server.serve("/part", body), "part", body)
    server.state.ignore_range = True
    (tmp_path / "part.partial").write_bytes(b"stale bytes from another file")

    path = download(remote, tmp_path, chunk_bytes=CHUNK)

    assert server.state.requests[-1].range == "bytes=29-"
    assert path.read_bytes() == body


def test_partial_holding_every_byte_gets_416_and_is_verified(server: Server, tmp_path: Path) -> None:
    body = _payload(20_000)
    url = server.serve("/part", body)
    (tmp_path / "part.partial").write_bytes(body)

    # No size given, so only the server can say the partial is complete (416).
    path = download(RemoteFile(url, "part", md5=hashlib.md5(body).hexdigest()), tmp_path)

    assert [s.range for s in server.state.requests] == [f"bytes={len(body)}-"]
    assert path.read_bytes() == body


def test_partial_of_the_expected_size_is_verified_without_a_request(server: Server, tmp_path: Path) -> None:
    body = _payload(20_000)
    remote = _remote(server.serve("/part", body), "part", body)
    (tmp_path / "part.partial").write_bytes(body)

    assert download(remote, tmp_path).read_bytes() == body
    assert server.state.requests == []


@pytest.mark.parametrize(
    "wrong",
    [{"md5": "0" * 32}, {"sha256": "f" * 64}, {"size": 20_001}, {"size": 19_999}],
    ids=["md5", "sha256", "size-larger", "size-smaller"],
)
def test_wrong_checksum_or_size_deletes_the_file(server: Server, tmp_path: Path, wrong: dict) -> None:
    body = _payload(20_000)
    url = server.serve("/part", body)

    with pytest.raises(ChecksumError) as excinfo:
        download(RemoteFile(url, "part", **wrong), tmp_path, chunk_bytes=CHUNK)

    assert url in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor a .partial


def test_existing_file_that_does_not_verify_is_fetched_again(server: Server, tmp_path: Path) -> None:
    body = _payload(20_000)
    remote = _remote(server.serve("/part", body), "part", body)
    (tmp_path / "part").write_bytes(body[:-1] + b"\0")

    assert download(remote, tmp_path).read_bytes() == body
    assert len(server.state.requests) == 1


def test_missing_credentials_raise_auth_error(server: Server, tmp_path: Path) -> None:
    body = _payload(1_000)
    url = server.serve("/part", body)
    server.state.credentials = (USER, PASSWORD)

    with pytest.raises(AuthError, match="credentials") as excinfo:
        download(RemoteFile(url, "part"), tmp_path)

    assert "401" in str(excinfo.value) and url in str(excinfo.value)
    assert not (tmp_path / "part").exists()


def test_wrong_credentials_never_leak_the_password(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.serve("/part", _payload(1_000))
    server.state.credentials = (USER, PASSWORD)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(AuthError, match="credentials") as excinfo:
        download(RemoteFile(url, "part"), tmp_path, auth=(USER, WRONG_PASSWORD))
    userinfo_url = url.replace("http://", f"http://{USER}:{WRONG_PASSWORD}@")
    with pytest.raises(AuthError) as userinfo_excinfo:
        download(RemoteFile(userinfo_url, "part"), tmp_path)

    for err in (excinfo.value, userinfo_excinfo.value):
        for text in (str(err), repr(err), str(err.__cause__), str(err.__context__)):
            assert WRONG_PASSWORD not in text
    assert WRONG_PASSWORD not in caplog.text


def test_correct_credentials_succeed(server: Server, tmp_path: Path) -> None:
    body = _payload(10_000)
    remote = _remote(server.serve("/part", body), "part", body)
    server.state.credentials = (USER, PASSWORD)

    assert download(remote, tmp_path, auth=(USER, PASSWORD)).read_bytes() == body


def test_complete_file_is_returned_without_any_request(server: Server, tmp_path: Path) -> None:
    body = _payload(10_000)
    remote = _remote(server.serve("/part", body), "part", body)
    first = download(remote, tmp_path)
    count = len(server.state.requests)

    assert download(remote, tmp_path) == first
    assert len(server.state.requests) == count == 1


def test_http_error_is_a_download_error_not_an_auth_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404") as excinfo:
        download(RemoteFile(server.base + "/missing", "missing"), tmp_path)
    assert not isinstance(excinfo.value, AuthError)


def test_refused_connection_is_a_download_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}/part"):
        download(RemoteFile(f"http://127.0.0.1:{port}/part", "part"), tmp_path, timeout_s=5)


@pytest.mark.parametrize("as_url", [True, False], ids=["file-url", "plain-path"])
def test_local_sources_are_copied_and_verified(tmp_path: Path, as_url: bool) -> None:
    body = _payload(30_000)
    source = tmp_path / "mirror dir" / "vox2_test_txt.zip"
    source.parent.mkdir()
    source.write_bytes(body)
    url = source.as_uri() if as_url else str(source)

    path = download(_remote(url, "vox2_test_txt.zip", body), tmp_path / "raw", chunk_bytes=CHUNK)

    assert path.read_bytes() == body
    assert sorted(p.name for p in path.parent.iterdir()) == ["vox2_test_txt.zip"]
    with pytest.raises(ChecksumError):
        download(RemoteFile(url, "copy.zip", md5="0" * 32), tmp_path / "raw")
    assert not (tmp_path / "raw" / "copy.zip.partial").exists()


def test_missing_local_source_is_a_download_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not found"):
        download(RemoteFile(str(tmp_path / "absent.zip"), "absent.zip"), tmp_path / "raw")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../evil", "/etc/passwd", "a\\b", "nul\0byte"])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        RemoteFile("http://127.0.0.1/x", name)


def test_unsupported_scheme_is_rejected() -> None:
    with pytest.raises(ValueError, match="ftp"):
        RemoteFile("ftp://example.org/x.zip", "x.zip")


# --- retries only where another attempt can help; secrets never shown --------------------------


class _Clock:
    """A fake monotonic clock that sleeping advances: retry tests take no real time."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _retrying(remote: RemoteFile, dest: Path, clock: _Clock, **kwargs) -> Path:
    options = {"retries": 3, "retry_delay_s": 10.0, "deadline_s": 3600.0} | kwargs
    return download_with_retries(remote, dest, sleep=clock.sleep, clock=clock, **options)


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        (lambda s: None, DownloadError),  # 404: the file is not there, asking again will not change that
        (lambda s: setattr(s.state, "credentials", (USER, PASSWORD)), AuthError),  # 401
        (lambda s: s.serve("/part", b"x" * 1000), ChecksumError),  # served, but the md5 is wrong
    ],
    ids=["404", "401", "wrong-md5"],
)
def test_permanent_failures_are_not_retried(server: Server, tmp_path: Path, setup, error) -> None:
    setup(server)
    clock = _Clock()

    with pytest.raises(error) as excinfo:
        _retrying(RemoteFile(server.base + "/part", "part", md5="0" * 32), tmp_path, clock)

    assert not excinfo.value.transient
    assert len(server.state.requests) == 1 and clock.slept == []  # one request, no waiting


def test_transient_failures_are_retried_and_resume(server: Server, tmp_path: Path) -> None:
    body = _payload(50_000)
    remote = _remote(server.serve("/part", body), "part", body)
    server.state.cut_after["/part"] = 20_000  # the first transfer is cut short
    clock = _Clock()

    assert _retrying(remote, tmp_path, clock, chunk_bytes=CHUNK).read_bytes() == body

    assert clock.slept == [10.0]
    assert [r.range is not None for r in server.state.requests] == [False, True], server.state.requests


def test_deadline_stops_retrying_and_keeps_the_partial(tmp_path: Path) -> None:
    with socket.socket() as sock:  # nothing listens here: every attempt fails with a connection error
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "part.partial").write_bytes(b"kept")
    clock = _Clock()

    with pytest.raises(DeadlineError, match="deadline of 25 s reached after 3 attempts"):
        _retrying(RemoteFile(f"http://127.0.0.1:{port}/part", "part"), tmp_path, clock, retries=10, deadline_s=25)

    assert clock.slept == [10.0, 10.0]
    assert (tmp_path / "part.partial").read_bytes() == b"kept"


def test_urls_are_redacted_and_named_without_secrets() -> None:
    url = "https://vox:Pa55@mirror.example.org/data/vox2_dev_mp4_partaa?X-Amz-Signature=abc123&token=t0k#frag"
    assert redact_url(url) == "https://mirror.example.org/data/vox2_dev_mp4_partaa?<redacted>#<redacted>"
    assert url_file_name(url) == "vox2_dev_mp4_partaa"
    assert url_file_name("/data/parts/vox2_test_mp4.zip") == "vox2_test_mp4.zip"
    assert redact_url("/data/parts/a.zip") == "/data/parts/a.zip"
    assert expand_env("https://h/p?token=${TOKEN}", {"TOKEN": "t0k"}) == "https://h/p?token=t0k"
    with pytest.raises(KeyError, match="TOKEN"):
        expand_env("https://h/p?token=${TOKEN}", {})


def test_signed_url_token_and_userinfo_never_appear_in_errors_or_logs(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = "sig-Very-Secret-Token-77"
    url = server.base.replace("http://", f"http://{USER}:{PASSWORD}@") + f"/missing?token={token}"

    with pytest.raises(DownloadError) as excinfo:
        download(RemoteFile(url, url_file_name(url)), tmp_path)

    shown = [str(excinfo.value), repr(excinfo.value), str(excinfo.value.__cause__), caplog.text]
    for text in shown:
        assert token not in text and PASSWORD not in text
    assert "404" in str(excinfo.value) and "?<redacted>" in str(excinfo.value)
    assert "plain http" in caplog.text  # credentials over http: warned
    assert [p.name for p in tmp_path.iterdir()] == []
