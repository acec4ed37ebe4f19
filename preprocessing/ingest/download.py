"""Resumable, verified downloads of large files (VoxCeleb2 archive parts are tens of GB each).

`download` makes one attempt: an interrupted transfer leaves `<name>.partial` behind and the next
call resumes it with an HTTP Range request. `download_with_retries` retries only what can heal
(network errors, HTTP 5xx/408/429, a transfer cut short) within an overall deadline; a 404, a
401/403 or a wrong checksum fails at once, since asking again gives the same answer (and a wrong
md5 would cost a whole re-download each time). A file only appears under its final name after
its size and checksums verified, so a file that exists under its final name is trusted on
re-runs without touching the network.

Secrets: credentials travel as HTTP Basic auth or in the URL's user-info; signed URLs carry
tokens in their query string. `redact_url` removes both, and every message, log line and file
name here goes through it. Progress bars (bytes, on stderr) are labelled with the plain file
name, never the URL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import requests
from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

log = logging.getLogger(__name__)

_HTTP_SCHEMES = ("http", "https")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_READ_BYTES = 1 << 20
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Worth asking again: the server is overloaded or timed out, or asks us to slow down.
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class _RedactQueries(logging.Filter):
    """urllib3 logs every request line, signed-URL query tokens included, at debug level
    (`vasa -v`): replace each query string in those records by `<redacted>`."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = self._QUERY.sub("?<redacted>", message), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactQueries())


class DownloadError(RuntimeError):
    """A download failed; a transfer cut short keeps its `.partial` so the next call resumes it.

    `transient`: whether another attempt may succeed (network trouble, HTTP 5xx) or not (404, a
    wrong checksum, a missing local file).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class AuthError(DownloadError):
    """The server refused the request (HTTP 401/403): credentials missing or wrong. Never retried."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected size or digest; the bad file was deleted. Never retried."""


class DeadlineError(DownloadError):
    """The part's overall deadline passed; the `.partial` is kept, so the next run resumes it."""


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
            raise ValueError(f"unsupported URL scheme {scheme!r} in {redact_url(self.url)}")
        if self.size is not None and self.size < 0:
            raise ValueError(f"RemoteFile.size must be >= 0, got {self.size}")


def redact_url(url: str) -> str:
    """`url` without user-info (`user:password@`) and with any query string (signed-URL tokens)
    or fragment replaced by `<redacted>`: fit for messages, logs, manifests and flow parameters."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:
        return url  # a local path (or a Windows drive letter): nothing secret in it
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    fragment = "<redacted>" if parts.fragment else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def url_file_name(url: str) -> str:
    """The last path segment of `url` (never its query or user-info), for naming the downloaded file."""
    parts = urlsplit(url)
    path = parts.path if parts.scheme and len(parts.scheme) > 1 else url
    return unquote(path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])


def expand_env(url: str, env: Mapping[str, str]) -> str:
    """Replace each `${NAME}` in `url` by env[NAME], so params (and dvc.lock) name a secret, never
    hold it. Raises KeyError naming the first variable that is not set."""

    def value(match: re.Match) -> str:
        name = match[1]
        if name not in env:
            raise KeyError(f"environment variable {name} (used in a download URL) is not set")
        return env[name]

    return _ENV_REF.sub(value, url)


def has_secrets(url: str) -> bool:
    """Whether `url` carries user-info or a query string (possibly a signed-URL token)."""
    parts = urlsplit(url)
    return bool(parts.scheme) and len(parts.scheme) > 1 and ("@" in parts.netloc or bool(parts.query))


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
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Fetch `remote` into `dest_dir / remote.name` (one attempt) and return that path.

    Raises AuthError on HTTP 401/403, ChecksumError when the bytes do not verify (the file is
    deleted), and DownloadError for other failures (a cut transfer keeps its `.partial`).
    `timeout_s` bounds connecting and each wait for data; `deadline` (a value of `clock`)
    the whole transfer: past it, DeadlineError (the partial is kept for the next run).
    """
    dest_dir = Path(dest_dir)
    final = dest_dir / remote.name
    if final.is_file():
        problem = _mismatch(final, remote)
        if problem is None:
            return final
        log.info("%s: existing %s does not verify (%s); fetching again", redact_url(remote.url), final, problem)
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / (remote.name + ".partial")

    scheme = urlsplit(remote.url).scheme.lower()
    if scheme == "http" and (auth is not None or has_secrets(remote.url)):
        log.warning(
            "%s: sending credentials or a signed URL over plain http: anyone on the network path can read them"
            " (use https)",
            redact_url(remote.url),
        )
    if scheme in _HTTP_SCHEMES:
        fetched = _fetch_http(
            remote, partial, auth=auth, chunk_bytes=chunk_bytes, timeout_s=timeout_s, deadline=deadline, clock=clock
        )
        if fetched:
            _check_not_short(remote, partial)
    else:
        _copy_local(remote, partial, chunk_bytes=chunk_bytes)

    problem = _mismatch(partial, remote)
    if problem is not None:
        partial.unlink()
        raise ChecksumError(f"{redact_url(remote.url)}: {problem}; deleted the downloaded file")
    os.replace(partial, final)
    return final


def download_with_retries(
    remote: RemoteFile,
    dest_dir: Path,
    *,
    auth: tuple[str, str] | None = None,
    retries: int,
    retry_delay_s: float,
    deadline_s: float,
    timeout_s: float = 60.0,
    chunk_bytes: int = 8 << 20,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """`download`, attempted again up to `retries` times after transient failures only, each
    attempt resuming the last one's partial, all within `deadline_s` seconds. Raises the last
    error (DeadlineError once the deadline passes)."""
    deadline = clock() + deadline_s
    for attempt in range(retries + 1):
        try:
            return download(
                remote,
                dest_dir,
                auth=auth,
                chunk_bytes=chunk_bytes,
                timeout_s=timeout_s,
                deadline=deadline,
                clock=clock,
            )
        except DownloadError as err:
            if not err.transient or attempt == retries:
                raise
            if clock() + retry_delay_s >= deadline:
                raise DeadlineError(
                    f"{redact_url(remote.url)}: deadline of {deadline_s:g} s reached after {attempt + 1} attempts"
                    f" (last: {err}); the partial file is kept for the next run"
                ) from err
            log.warning("%s; attempt %d of %d in %g s", err, attempt + 2, retries + 1, retry_delay_s)
            sleep(retry_delay_s)
    raise AssertionError("unreachable")  # the loop returns or raises


def _fetch_http(
    remote: RemoteFile,
    partial: Path,
    *,
    auth: tuple[str, str] | None,
    chunk_bytes: int,
    timeout_s: float,
    deadline: float | None,
    clock: Callable[[], float],
) -> bool:
    """Transfer `remote` into `partial`, resuming what is there; False if nothing was transferred.

    Nothing is transferred when the partial already holds every byte: either `remote.size` says
    so, or the server answers 416 (range starts at or past the end of the file).
    """
    url = redact_url(remote.url)
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
                transient = status in _TRANSIENT_HTTP
                raise DownloadError(f"{url}: HTTP {status} {response.reason}", transient=transient)
            reported = _reported_total(response, offset)
            _check_reported_total(remote, partial, reported)
            total = remote.size if reported is None else reported
            with partial.open(mode) as out, _byte_bar(remote.name, total, offset) as bar:
                for chunk in response.iter_content(chunk_size=chunk_bytes):
                    out.write(chunk)
                    bar.update(len(chunk))
                    if deadline is not None and clock() > deadline:
                        raise DeadlineError(f"{url}: deadline reached mid-transfer; {partial.name} kept for resume")
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        message = f"{url}: transfer interrupted ({type(err).__name__}); {partial.name} kept for resume"
        raise DownloadError(message, transient=True) from _scrubbed(err, remote.url, auth)
    except requests.RequestException as err:
        raise DownloadError(f"{url}: request failed ({type(err).__name__})") from _scrubbed(err, remote.url, auth)
    return True


def _copy_local(remote: RemoteFile, partial: Path, *, chunk_bytes: int) -> None:
    """Copy a file:// URL or plain path into `partial` (from scratch: local copies are cheap to redo)."""
    parts = urlsplit(remote.url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{redact_url(remote.url)}: file:// URLs on another host are not supported")
        source = Path(url2pathname(parts.path))
    else:
        source = Path(remote.url)
    try:
        with (
            source.open("rb") as src,
            partial.open("wb") as out,
            _byte_bar(remote.name, os.fstat(src.fileno()).st_size) as bar,
        ):
            shutil.copyfileobj(src, CallbackIOWrapper(bar.update, out, "write"), chunk_bytes)
    except FileNotFoundError as err:
        raise DownloadError(f"{remote.url}: source file not found") from err
    except IsADirectoryError as err:
        raise DownloadError(f"{remote.url}: source is a directory") from err


def _byte_bar(name: str, total: int | None, initial: int = 0) -> tqdm:
    """A bytes progress bar on stderr labelled with the plain file `name` (never the URL, which may
    hold secrets), starting at the `initial` bytes a resumed partial already holds."""
    return tqdm(
        total=total,
        initial=initial,
        desc=f"download {name}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=total is not None and initial >= total,
    )


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
            f"{redact_url(remote.url)}: server reports {total} bytes, expected {remote.size}; deleted the partial file"
        )


def _check_not_short(remote: RemoteFile, partial: Path) -> None:
    """A transfer that ended early (connection closed without error) is resumable, not corrupt."""
    if remote.size is not None:
        got = partial.stat().st_size
        if got < remote.size:
            raise DownloadError(
                f"{redact_url(remote.url)}: transfer ended at {got} of {remote.size} bytes;"
                f" {partial.name} kept for resume",
                transient=True,
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


def _scrubbed(err: Exception, url: str, auth: tuple[str, str] | None) -> Exception | None:
    """The cause to chain, or None when its text would leak a secret (password, user-info or a
    signed query) into a traceback."""
    parts = urlsplit(url)
    secrets = [auth[1] if auth else None, parts.password, parts.query]
    text = f"{err} {err!r}"
    if any(secret and (secret in text or unquote(secret) in text) for secret in secrets):
        return None
    return err
