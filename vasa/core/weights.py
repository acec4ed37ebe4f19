"""Model weights on disk without pickle: one `<module>.safetensors` per module plus `model.json` (task
description, params, step, lineage and each file's sha256, checked on load). Every stage output and the
bundle use it; training checkpoints (vasa/training/checkpoint.py) add the resumable states.

`model.json` is sealed: it carries `json_sha256`, the sha256 of its own canonical serialisation without
that key, and must be byte-for-byte that canonical serialisation. A changed setting (a crop size, a
guidance scale, a normalisation value) therefore cannot pass as the same model: the loader refuses the
folder and names the file. The seal catches corruption and careless edits, not a forger who re-seals
(that is what the bundle's sha256 in C2PA manifests and dvc.lock is for).

Reading is bounded: `model.json` at most MAX_JSON_BYTES, weight files named by a plain file name inside
the folder (no path, no `..`), each a regular file (a symlink into the DVC cache is fine, a device or a
FIFO is not) of at most MAX_WEIGHTS_BYTES, hashed before safetensors parses it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vasa.core.digests import sha256_file
from vasa.core.errors import InputError, StorageError
from vasa.core.files import atomic_path

MODEL_JSON = "model.json"
SEAL = "json_sha256"  # model.json's digest of itself (without this key)
MAX_JSON_BYTES = 1 << 20  # a bundle's model.json is ~10 kB; a megabyte is room for any lineage
MAX_WEIGHTS_BYTES = 64 << 30  # 64 GiB: 10x the fp32 weights of the largest preset (base), so never a real limit


class WeightsError(InputError):
    """A model folder that is missing, tampered with, truncated or not a model folder at all."""


# The OS errors that mean "the disk, not the program": reported as StorageError by `storage_errors`.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
# A write that fails on a full disk leaves the disk (nearly) full: below this many free bytes a failed write
# whose error names no OS error (torch.save's "PytorchStreamWriter failed writing file ..." or "[enforce
# fail at inline_container.cc] unexpected pos") is taken for "no space left on device".
FULL_DISK_BYTES = 16 << 20
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer names the OS error


def _free_bytes(path: Path) -> int | None:
    """Free bytes (for this user) on the filesystem that holds `path` or its nearest existing folder."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def storage_errno(err: BaseException, path: Path) -> int | None:
    """The storage errno (one of STORAGE_ERRNOS) behind a failed write to `path`, else None: an OSError's
    errno, the `(os error N)` that safetensors puts in its message, or ENOSPC for a writer's RuntimeError
    when the disk under `path` is (nearly) full."""
    if isinstance(err, OSError):
        return err.errno if err.errno in STORAGE_ERRNOS else None
    found = _RUST_OS_ERROR.search(str(err))
    if found:
        code = int(found.group(1))
        return code if code in STORAGE_ERRNOS else None
    free = _free_bytes(path)
    return errno.ENOSPC if free is not None and free < FULL_DISK_BYTES else None


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Writes to `path` (a file or a folder) inside this block that fail for lack of space, quota or a
    working disk raise one StorageError line, "no space left on device while writing <path>", instead of
    the writer's own error (torch's never says "no space"). Other failures pass through unchanged."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        code = storage_errno(err, path)
        if code is None:
            raise
        reason = os.strerror(code)
        raise StorageError(f"{reason[:1].lower()}{reason[1:]} while writing {path}") from err


def contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}


def canonical_json(payload: dict) -> bytes:
    """The one serialisation of model.json: sorted keys, indent 1, a final newline (as write_json)."""
    return (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()


def seal(meta: dict) -> dict:
    """`meta` with its SEAL: the sha256 of its canonical serialisation (any SEAL already there ignored)."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    return {**body, SEAL: hashlib.sha256(canonical_json(body)).hexdigest()}


def write_weights(folder: Path, weights: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Write `<name>.safetensors` for each module's state dict and the sealed `model.json` = meta + file
    sha256s. Same tensors and meta give the same bytes (sorted keys, no time stamps). A full or failing disk
    raises StorageError naming the file (`storage_errors`)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, state in sorted(weights.items()):
        path = folder / f"{name}.safetensors"
        with atomic_path(path) as tmp, storage_errors(path):  # the free space is looked at before tmp goes
            save_file(contiguous_cpu(state), str(tmp), metadata={"module": name})
        path.chmod(0o644)  # the temporary file's private mode must not stick to a published artifact
        files[name] = {"file": path.name, "sha256": sha256_file(path)}
    with atomic_path(folder / MODEL_JSON) as tmp, storage_errors(folder / MODEL_JSON):
        tmp.write_bytes(canonical_json(seal({**meta, "weights": files})))


def _regular_file(path: Path, limit: int) -> int:
    """Size of `path` in bytes if it is a regular file (after symlinks) of at most `limit` bytes."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise WeightsError(f"{path}: {info.st_size} bytes, over the limit of {limit}")
    return info.st_size


def read_model_json(folder: Path) -> dict:
    """The sealed model.json of `folder`. FileNotFoundError when it is missing; WeightsError when it is
    not a regular file, too large, not JSON, not canonical or its seal does not match its content."""
    path = folder / MODEL_JSON
    _regular_file(path, MAX_JSON_BYTES)
    raw = path.read_bytes()
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: a JSON nested thousands deep
        raise WeightsError(f"{path}: not JSON ({type(err).__name__})") from None
    if not isinstance(meta, dict) or SEAL not in meta:
        raise WeightsError(f"{path}: no {SEAL} (not a model folder, or written before model.json was sealed)")
    if seal(meta)[SEAL] != meta[SEAL] or canonical_json(meta) != raw:
        raise WeightsError(f"{path}: changed since it was written ({SEAL} does not match its content)")
    return meta


def weight_path(folder: Path, entry: object) -> Path:
    """The file a model.json `weights` entry names, confined to `folder` (a plain file name)."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or name in (".", "..") or os.sep in name or "/" in name:
        raise WeightsError(f"{folder / MODEL_JSON}: weight file {name!r} is not a file name inside the folder")
    return folder / name


def load_weights(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read what `write_weights` wrote; verifies the seal and each file's sha256 before parsing it.
    Returns (weights by module, meta). FileNotFoundError without model.json, WeightsError otherwise."""
    meta = read_model_json(folder)
    entries = meta.get("weights")
    if not isinstance(entries, dict):
        raise WeightsError(f"{folder / MODEL_JSON}: no weights table")
    weights = {}
    for name, entry in entries.items():
        path = weight_path(folder, entry)
        _regular_file(path, MAX_WEIGHTS_BYTES)
        if sha256_file(path) != entry.get("sha256"):
            raise WeightsError(f"{path}: sha256 does not match {MODEL_JSON} (truncated, replaced or corrupted)")
        try:
            weights[name] = load_file(str(path))
        except SafetensorError as err:
            raise WeightsError(f"{path}: not a safetensors file ({err})") from None
    return weights, meta


def non_finite(weights: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """`module.tensor` names of floating-point tensors holding NaN or infinity."""
    return [
        f"{module}.{key}"
        for module, state in sorted(weights.items())
        for key, tensor in sorted(state.items())
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
