"""Model weights on disk without pickle: one `<module>.safetensors` per module plus `model.json` (task
description, params, step, lineage and each file's sha256, checked on load). Every stage output and the
bundle use it; training checkpoints (vasa/training/checkpoint.py) add the resumable states."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vasa.core.digests import sha256_file
from vasa.core.files import atomic_path, read_json, write_json

MODEL_JSON = "model.json"


def contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}


def write_weights(folder: Path, weights: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Write `<name>.safetensors` for each module's state dict and `model.json` = meta + file sha256s.

    Same tensors and meta give the same bytes (sorted keys, no time stamps).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, state in sorted(weights.items()):
        path = folder / f"{name}.safetensors"
        with atomic_path(path) as tmp:
            save_file(contiguous_cpu(state), str(tmp), metadata={"module": name})
        path.chmod(0o644)  # the temporary file's private mode must not stick to a published artifact
        files[name] = {"file": path.name, "sha256": sha256_file(path)}
    write_json(folder / MODEL_JSON, {**meta, "weights": files})


def load_weights(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read what `write_weights` wrote; verifies each file's sha256. Returns (weights by module, meta)."""
    meta = read_json(folder / MODEL_JSON)
    if meta is None:
        raise FileNotFoundError(f"{folder / MODEL_JSON}: missing or unreadable")
    weights = {}
    for name, entry in meta["weights"].items():
        path = folder / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 does not match {MODEL_JSON}")
        weights[name] = load_file(str(path))
    return weights, meta
