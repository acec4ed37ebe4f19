"""Resumable, verified downloads of large files (VoxCeleb2 archive parts are tens of GB each).

One call makes one attempt: retries belong to the caller (a Prefect task with retries), so an
interrupted transfer leaves `<name>.partial` behind and the next call resumes it with an HTTP
Range request. A file only appears under its final name after its size and checksums verified,
so a file that exists under its final name is trusted on re-runs without touching the network.

Credentials travel only as HTTP Basic auth; no message or log line carries them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import requests

log = logging.getLogger(__name__)

_HTTP_SCHEMES = ("http", "https")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_READ_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A download failed; a transfer cut short keeps its `.partial` so the next call resumes it."""


class AuthError(DownloadError):
    """The server refused the request (HTTP 401/403): credentials missing or wrong."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected size or digest; the bad file was deleted."""


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: where from, the plain name to store it under, and what it must match."""

    url: str  # http(s)://, file://, or a plain local filesystem path
    name: str  # file name under dest_dir; never a path, so a manifest cannot write outside dest_dir
    size: int | None = None  # bytes
    md5: str | None = None  # hex
    sha256: str | None = None  # hex

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"RemoteFile.name must be a plain file name, got {self.name!r}")
        scheme = urlsplit(self.url).scheme.lower()
        # A one-letter scheme is a Windows drive letter ("C:\\data\\x.zip"): a local path.
        if len(scheme) > 1 and scheme not in (*_HTTP_SCHEMES, "file"):
            raise ValueError(f"unsupported URL scheme {scheme!r} in {_redact(self.url)}")
        if self.size is not None and self.size < 0:
            raise ValueError(f"RemoteFile.size must be >= 0, got {self.size}")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of `path` with a hashlib algorithm ("md5", "sha256"), read in chunks."""
    return _hexdigests(path, (algorithm,))[algorithm]


def download(
    remote: RemoteFile,
    dest_dir: Path,
    *,
    auth: tuple[str, str] | None = None,
    chunk_bytes: int = 8 << 20,
    timeout_s: float = 60.0,
) -> Path:
    """Fetch `remote` into `dest_dir / remote.name` (one attempt) and return that path.

    Raises AuthError on HTTP 401/403, ChecksumError when the bytes do not verify (the file is
    deleted), and DownloadError for other failures (a cut transfer keeps its `.partial`).
    `timeout_s` bounds connecting and each wait for data, not the whole transfer.
    """
    dest_dir = Path(dest_dir)
    final = dest_dir / remote.name
    if final.is_file():
        problem = _mismatch(final, remote)
        if problem is None:
            return final
        log.info("%s: existing %s does not verify (%s); fetching again", _redact(remote.url), final, problem)
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / (remote.name + ".partial")

    scheme = urlsplit(remote.url).scheme.lower()
    if scheme in _HTTP_SCHEMES:
        if _fetch_http(remote, partial, auth=auth, chunk_bytes=chunk_bytes, timeout_s=timeout_s):
            _check_not_short(remote, partial)
    else:
        _copy_local(remote, partial, chunk_bytes=chunk_bytes)

    problem = _mismatch(partial, remote)
    if problem is not None:
        partial.unlink()
        raise ChecksumError(f"{_redact(remote.url)}: {problem}; deleted the downloaded file")
    os.replace(partial, final)
    return final


def _fetch_http(
    remote: RemoteFile, partial: Path, *, auth: tuple[str, str] | None, chunk_bytes: int, timeout_s: float
) -> bool:
    """Transfer `remote` into `partial`, resuming what is there; False if nothing was transferred.

    Nothing is transferred when the partial already holds every byte: either `remote.size` says
    so, or the server answers 416 (range starts at or past the end of the file).
    """
    url = _redact(remote.url)
    offset = partial.stat().st_size if partial.is_file() else 0
    if remote.size is not None and offset >= remote.size:
        if offset == remote.size:
            return False
        log.info("%s: partial file is larger than the expected %d bytes; starting over", url, remote.size)
        offset = 0
    # identity: a compressed body would make byte offsets (and Content-Length) meaningless for resuming.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with requests.get(remote.url, headers=headers, auth=auth, stream=True, timeout=timeout_s) as response:
            status = response.status_code
            if status in (401, 403):
                why = (
                    "credentials are required but none were given"
                    if auth is None and urlsplit(remote.url).username is None
                    else "the server rejected the credentials (wrong, or without access to this file)"
                )
                raise AuthError(f"{url}: HTTP {status}: {why}")
            if status == 416 and offset:
                return False
            if status == 206 and offset:
                mode = "ab"
                _check_content_range(url, response.headers.get("Content-Range", ""), offset)
            elif status == 200:
                if offset:
                    log.info("%s: server ignored the Range request; restarting from byte 0", url)
                mode, offset = "wb", 0
            else:
                raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")
            _check_reported_total(remote, partial, _reported_total(response, offset))
            with partial.open(mode) as out:
                for chunk in response.iter_content(chunk_size=chunk_bytes):
                    out.write(chunk)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        message = f"{url}: transfer interrupted ({type(err).__name__}); {partial.name} kept for resume"
        raise DownloadError(message) from _scrubbed(err, remote.url, auth)
    except requests.RequestException as err:
        raise DownloadError(f"{url}: request failed ({type(err).__name__})") from _scrubbed(err, remote.url, auth)
    return True


def _copy_local(remote: RemoteFile, partial: Path, *, chunk_bytes: int) -> None:
    """Copy a file:// URL or plain path into `partial` (from scratch: local copies are cheap to redo)."""
    parts = urlsplit(remote.url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{remote.url}: file:// URLs on another host are not supported")
        source = Path(url2pathname(parts.path))
    else:
        source = Path(remote.url)
    try:
        with source.open("rb") as src, partial.open("wb") as out:
            shutil.copyfileobj(src, out, chunk_bytes)
    except FileNotFoundError as err:
        raise DownloadError(f"{remote.url}: source file not found") from err
    except IsADirectoryError as err:
        raise DownloadError(f"{remote.url}: source is a directory") from err


def _check_content_range(url: str, content_range: str, offset: int) -> None:
    """A 206 must start where the partial ends, or appending would splice the wrong bytes."""
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None or int(match[1]) != offset:
        raise DownloadError(f"{url}: asked for bytes from {offset}, server sent Content-Range {content_range!r}")


def _reported_total(response: requests.Response, offset: int) -> int | None:
    """Full file size as the server reports it, or None when it does not say."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if response.status_code == 206 and match is not None:
        return None if match[3] == "*" else int(match[3])
    length = response.headers.get("Content-Length")
    return int(length) + offset if length is not None and length.isdigit() else None


def _check_reported_total(remote: RemoteFile, partial: Path, total: int | None) -> None:
    """Fail before streaming tens of GB when the server already says the size is wrong."""
    if remote.size is not None and total is not None and total != remote.size:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"{_redact(remote.url)}: server reports {total} bytes, expected {remote.size}; deleted the partial file"
        )


def _check_not_short(remote: RemoteFile, partial: Path) -> None:
    """A transfer that ended early (connection closed without error) is resumable, not corrupt."""
    if remote.size is not None:
        got = partial.stat().st_size
        if got < remote.size:
            raise DownloadError(
                f"{_redact(remote.url)}: transfer ended at {got} of {remote.size} bytes; {partial.name} kept for resume"
            )


def _mismatch(path: Path, remote: RemoteFile) -> str | None:
    """Why `path` does not match `remote`'s size and digests, or None if it matches."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size {size} bytes, expected {remote.size}"
    expected = {alg: value.lower() for alg, value in (("md5", remote.md5), ("sha256", remote.sha256)) if value}
    if not expected:
        return None
    actual = _hexdigests(path, expected)
    for alg, value in expected.items():
        if actual[alg] != value:
            return f"{alg} {actual[alg]}, expected {value}"
    return None


def _hexdigests(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Several digests in one pass: archive parts are tens of GB, reading them twice costs minutes."""
    hashers = {alg: hashlib.new(alg) for alg in algorithms}
    with Path(path).open("rb") as f:
        while block := f.read(_READ_BYTES):
            for hasher in hashers.values():
                hasher.update(block)
    return {alg: hasher.hexdigest() for alg, hasher in hashers.items()}


def _redact(url: str) -> str:
    """`url` without any user:password@ part, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in _HTTP_SCHEMES or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _scrubbed(err: Exception, url: str, auth: tuple[str, str] | None) -> Exception | None:
    """The cause to chain, or None when its text would leak a password into a traceback."""
    secrets = [auth[1] if auth else None, urlsplit(url).password]
    if any(secret and secret in str(err) for secret in secrets):
        return None
    return err
