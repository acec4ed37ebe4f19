"""Checkpoints that describe themselves, loadable without pickle.

Two kinds:
- the stage's OUTPUT (vasa.core.weights `write_weights` / `load_weights`): one `<module>.safetensors`
  per EMA module and `model.json` (task description, params, step, lineage, file digests). This is what
  users load: safetensors + JSON only, never pickle.
- RESUMABLE STATES under `checkpoints/step_NNNNNNN/`: Accelerate's `save_state` (model weights as
  safetensors; optimiser and RNG states in Accelerate's own format, read back only by this engine
  from a run's own folder) plus `ema.safetensors` and `engine.json` written last, so a state without
  `engine.json` is incomplete and ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vasa.core.digests import sha256_file
from vasa.core.files import atomic_path, read_json, write_json
from vasa.core.weights import contiguous_cpu

ENGINE_JSON = "engine.json"


EMA_FILE = "ema.safetensors"


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


def complete_states(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete resumable state under `root`, oldest first."""
    found = []
    for path in root.glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX) :]
        if suffix.isdigit() and (path / ENGINE_JSON).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_state(root: Path) -> tuple[int, Path] | None:
    states = complete_states(root)
    return states[-1] if states else None


def write_engine_state(folder: Path, ema: dict[str, dict[str, torch.Tensor]], info: dict) -> None:
    """EMA shadows (keys `<module>/<param>`) and the engine's JSON; engine.json last marks completion."""
    flat = {f"{name}/{key}": value for name, state in ema.items() for key, value in state.items()}
    with atomic_path(folder / EMA_FILE) as tmp:
        save_file(contiguous_cpu(flat), str(tmp))
    write_json(folder / ENGINE_JSON, info)


def read_engine_state(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    info = read_json(folder / ENGINE_JSON)
    if info is None:
        raise FileNotFoundError(f"{folder / ENGINE_JSON}: missing or unreadable")
    ema: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in load_file(str(folder / EMA_FILE)).items():
        name, key = flat.split("/", 1)
        ema.setdefault(name, {})[key] = value
    return ema, info


def prune_states(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete states, and incomplete ones older than the newest."""
    states = complete_states(root)
    for _, path in states[:-keep]:
        shutil.rmtree(path)
    newest = states[-1][0] if states else -1
    for path in root.glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX) :]
        if suffix.isdigit() and int(suffix) < newest and not (path / ENGINE_JSON).is_file():
            shutil.rmtree(path)
