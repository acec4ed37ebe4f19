"""The self-describing real-time bundle: its format, `write_bundle` (stage `export`) and `load_bundle`.

One folder in the checkpoint format of every stage (vasa/training/checkpoint.py): safetensors + JSON,
no pickle, each file's sha256 in `model.json`, which `load_bundle` checks before loading anything.

    face_latent.safetensors   stage 1 EMA generator: appearance/identity/motion encoders, warping, decoder
    motion_dit.safetensors    stage 2 EMA motion diffusion transformer
    model.json                format, presets, audio-feature settings, frame rate, crop geometry, motion
                              normalisation, default sampling and guidance, lineage (both stages' lineage,
                              dvc.lock digests of the upstream outputs, code digest, package versions)

The bundle's identity is the sha256 of its model.json (`Bundle.sha256`): it names the file digests, so
it changes when any weight changes. Generated videos carry it (container tags, C2PA, watermark).
Nothing in the bundle depends on the wall clock: same inputs, params and code give the same bytes.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from vasa.core import digests
from vasa.core.config import Params
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.weights import MODEL_JSON, load_weights, write_weights
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_dit import MotionDiT
from vasa.models.presets import get_motion_preset, preset_from_json

log = logging.getLogger(__name__)


BUNDLE_FORMAT = "vasa-bundle"


BUNDLE_VERSION = 1


FACE, DIT = "face_latent", "motion_dit"


PACKAGES = ("torch", "numpy", "safetensors", "av", "mediapipe", "librosa", "accelerate")


DIT_KEYS = ("preset", "motion_dim", "audio_dim", "emotion_dim", "window", "context")


def code_digest() -> str:
    """sha256 of the code that builds and runs a bundle (the import closure of the export stage and of
    generation): a code version that does not need git and ignores everything else."""
    return digests.code_digest(("vasa.stages.export", "vasa.inference.generate"))


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def upstream_digests(dvc_lock: Path, stages: tuple[str, ...] = ("train_latent", "train_motion")) -> dict[str, dict]:
    """md5 of each output of `stages` as recorded in dvc.lock ({} when there is no dvc.lock: a library run)."""
    if not dvc_lock.is_file():
        return {}
    lock = yaml.safe_load(dvc_lock.read_text()) or {}
    found = {}
    for stage in stages:
        outs = (lock.get("stages", {}).get(stage) or {}).get("outs") or []
        found[stage] = {o["path"]: o.get("md5") for o in outs if isinstance(o, dict) and "path" in o}
    return found


@dataclass
class Bundle:
    """A loaded bundle: both networks in eval mode on `device`, model.json, and the bundle's sha256."""

    face: FaceLatent
    dit: MotionDiT
    meta: dict
    sha256: str
    device: torch.device

    @property
    def resolution(self) -> int:
        return self.face.preset.resolution


def build_dit(task: dict) -> MotionDiT:
    """A MotionDiT from stage 2's model.json `task` block."""
    return MotionDiT(
        get_motion_preset(task["preset"]["name"]),
        motion_dim=task["motion_dim"],
        audio_dim=task["audio_dim"],
        emotion_dim=task["emotion_dim"],
        window=task["window"],
        context=task["context"],
    )


def bundle_meta(
    params: Params, face: FaceLatent, n_speakers: int, dit_task: dict, normalisation: dict, lineage: dict
) -> dict:
    """model.json of a bundle (without the file digests, which write_weights adds)."""
    pre = params.preprocess
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "fps": pre.fps,
        "face_latent": {"preset": face.preset.describe(), "n_speakers": n_speakers},
        "motion_dit": {k: dit_task[k] for k in DIT_KEYS},
        "audio": {"sample_rate": pre.sample_rate, "features": pre.audio.model_dump(mode="json")},
        "crop": {"crop_size": pre.crop_size, "crop_scale": pre.face.crop_scale},
        "normalisation": normalisation,
        "sampling": {
            "steps": dit_task["diffusion"]["sampling_steps"],
            "eta": dit_task["diffusion"]["eta"],
            "schedule": dit_task["diffusion"]["schedule"],
            "train_steps": dit_task["diffusion"]["train_steps"],
            "cfg_audio": dit_task["guidance"]["cfg_audio"],
            "cfg_gaze": dit_task["guidance"]["cfg_gaze"],
        },
        "lineage": {**lineage, "code_sha256": code_digest(), "packages": package_versions()},
    }


def write_bundle(out: Path, face: FaceLatent, dit: MotionDiT, meta: dict) -> str:
    """Write the bundle files; returns the bundle's sha256 (of model.json)."""
    write_weights(out, {FACE: face.state_dict(), DIT: dit.state_dict()}, meta)
    return sha256_file(out / MODEL_JSON)


def load_bundle(folder: Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle; every file is checked against model.json first (no pickle). InputError on a
    missing, foreign or tampered bundle."""
    try:
        weights, meta = load_weights(folder)
    except FileNotFoundError as err:
        raise InputError(f"no bundle: {err}") from None
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"{folder}: not a valid bundle ({err})") from None
    if meta.get("format") != BUNDLE_FORMAT or set(weights) != {FACE, DIT}:
        raise InputError(f"{folder}: not a {BUNDLE_FORMAT} folder (format {meta.get('format')!r})")
    if meta.get("version") != BUNDLE_VERSION:
        raise InputError(f"{folder}: bundle version {meta.get('version')} (this code reads {BUNDLE_VERSION})")
    face = FaceLatent(preset_from_json(meta["face_latent"]["preset"]), n_speakers=meta["face_latent"]["n_speakers"])
    face.load_state_dict(weights[FACE], strict=True)
    dit = build_dit(meta["motion_dit"])
    dit.load_state_dict(weights[DIT], strict=True)
    target = torch.device(device)
    return Bundle(face.to(target).eval(), dit.to(target).eval(), meta, sha256_file(folder / MODEL_JSON), target)
