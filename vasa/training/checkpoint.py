"""Checkpoints that describe themselves, loadable without pickle.

Two kinds:
- the stage's OUTPUT (vasa.core.weights `write_weights` / `load_weights`): one `<module>.safetensors`
  per EMA module and `model.json` (task description, params, step, lineage, file digests). This is what
  users load: safetensors + JSON only, never pickle. `write_model` publishes it whole or not at all.
- RESUMABLE STATES under `checkpoints/step_NNNNNNN/`: Accelerate's `save_state` (model weights as
  safetensors; optimiser and RNG states in Accelerate's own format, read back only by this engine
  from a run's own folder) plus `ema.safetensors`, `engine.json` and, written last, `manifest.json`:
  the sha256 of every other file of the state. A state without a manifest is incomplete; one whose
  files do not match it, or whose safetensors hold NaN or infinity, is not intact, and resuming falls
  back to the newest state that is (`find_resumable`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vasa.core.digests import sha256_file
from vasa.core.files import PARTIAL_SUFFIX, atomic_path, read_json, write_json
from vasa.core.weights import contiguous_cpu, storage_errors, write_weights

ENGINE_JSON = "engine.json"


EMA_FILE = "ema.safetensors"


MANIFEST = "manifest.json"  # {"files": {relative path: sha256}} of the state's other files; written last


STEP_PREFIX = "step_"


def shards_lineage(index_path: Path) -> dict:
    """Where the training data came from: sha256 of the shards' index.json and, when the index carries
    a `dataset` block (schema version, crop size, manifest digest), that block's manifest digest."""
    data = json.loads(index_path.read_text())
    dataset = data.get("dataset") if isinstance(data.get("dataset"), dict) else {}
    lineage = {"index_sha256": sha256_file(index_path)}
    for key in ("manifest_sha256", "schema_version"):
        if key in dataset:
            lineage[f"dataset_{key}"] = dataset[key]
    return lineage


def state_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:07d}"


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_NNNNNNN` folder under `root`, complete or not, oldest first."""
    found = []
    for path in root.glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX) :]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def complete_states(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every state under `root` whose manifest was written (intact or not), oldest first."""
    return [(step, path) for step, path in step_folders(root) if (path / MANIFEST).is_file()]


def latest_state(root: Path) -> tuple[int, Path] | None:
    states = complete_states(root)
    return states[-1] if states else None


def write_engine_state(folder: Path, ema: dict[str, dict[str, torch.Tensor]], info: dict) -> None:
    """EMA shadows (keys `<module>/<param>`), the engine's JSON and last the manifest of the folder's
    digests, which marks the state complete. Same tensors and info give the same bytes."""
    flat = {f"{name}/{key}": value for name, state in ema.items() for key, value in state.items()}
    with atomic_path(folder / EMA_FILE) as tmp:
        save_file(contiguous_cpu(flat), str(tmp))
    write_json(folder / ENGINE_JSON, info)
    write_manifest(folder)


def _state_files(folder: Path) -> list[Path]:
    """Every regular file of a state but its manifest (Accelerate's, ours, every rank's), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path) -> None:
    """sha256 of each file of the state, atomically: a state is complete once its manifest exists."""
    files = {path.relative_to(folder).as_posix(): sha256_file(path) for path in _state_files(folder)}
    write_json(folder / MANIFEST, {"files": files})


def _non_finite_tensor(path: Path) -> str | None:
    """The first (by name) floating-point tensor of a safetensors file holding NaN or infinity, else None.
    One tensor in memory at a time: a paper-size state is checked without loading it whole."""
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return key
    return None


def state_problem(folder: Path) -> str | None:
    """Why the state in `folder` cannot be resumed from, in a few words, or None when it is intact: its
    manifest is there and lists engine.json and the EMA, every listed file has its recorded sha256, and
    no safetensors tensor holds NaN or infinity (a diverged run's state must not be resumed into)."""
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files") if manifest is not None else None
    if not isinstance(files, dict):
        return f"no readable {MANIFEST} (an incomplete state, or one written before states had digests)"
    for needed in (ENGINE_JSON, EMA_FILE):
        if needed not in files:
            return f"{MANIFEST} does not list {needed}"
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            if sha256_file(path) != digest:
                return f"{name} does not match its sha256 in {MANIFEST}"
        except OSError as err:
            return f"{name} is unreadable ({err.strerror or err})"
    for name in sorted(n for n in files if n.endswith(".safetensors")):
        try:
            bad = _non_finite_tensor(folder / name)
        except (OSError, SafetensorError) as err:
            return f"{name} is not a readable safetensors file ({err})"
        if bad is not None:
            return f"{name}: tensor {bad} holds NaN or infinity"
    return None


def find_resumable(root: Path) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
    """The newest intact state under `root` as (step, folder), or None, and each newer state passed over
    with the reason (`state_problem`), newest first. Only the states down to the first intact one are read."""
    skipped: list[tuple[Path, str]] = []
    for step, folder in reversed(step_folders(root)):
        problem = state_problem(folder)
        if problem is None:
            return (step, folder), skipped
        skipped.append((folder, problem))
    return None, skipped


def read_engine_state(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """EMA shadows by module and engine.json of a state (check it first with `state_problem`)."""
    info = read_json(folder / ENGINE_JSON)
    if info is None:
        raise FileNotFoundError(f"{folder / ENGINE_JSON}: missing or unreadable")
    ema: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in load_file(str(folder / EMA_FILE)).items():
        name, key = flat.split("/", 1)
        ema.setdefault(name, {})[key] = value
    return ema, info


def prune_states(root: Path, keep: int, step: int) -> None:
    """After the state at `step` was written: delete all but the newest `keep` complete states up to
    `step`, and folders older than `step` that never completed (no manifest, or a `.partial` left by a
    killed save). States after `step` stay: they are the ones a resume passed over as not intact, and
    the run replaces each when it reaches its step (counting them would prune the intact ones)."""
    states = [(s, path) for s, path in complete_states(root) if s <= step]
    for _, path in states[:-keep]:
        shutil.rmtree(path)
    complete = {path for _, path in states}
    for older, path in step_folders(root):
        if older < step and path not in complete:
            shutil.rmtree(path)
    for path in root.glob(f"{STEP_PREFIX}*{PARTIAL_SUFFIX}"):
        suffix = path.name[len(STEP_PREFIX) : -len(PARTIAL_SUFFIX)]
        if suffix.isdigit() and int(suffix) < step:
            shutil.rmtree(path)


def write_model(folder: Path, weights: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Publish the stage's output whole or not at all: `write_weights` into `<folder>.partial`, then swap
    it in for `folder`. A full disk raises StorageError naming the file and leaves `folder` as it was."""
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)  # a killed earlier write
    try:
        write_weights(partial, weights, meta)
        with storage_errors(folder):
            if folder.exists():
                shutil.rmtree(folder)
            partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
