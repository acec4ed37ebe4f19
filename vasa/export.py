"""Export (`vasa export`, DVC stage `export`): the self-describing real-time bundle.

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

import hashlib
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from vasa.config import Params
from vasa.errors import InputError
from vasa.models.face_latent import FaceLatent, load_face_latent
from vasa.models.motion_dit import MotionDiT
from vasa.models.presets import get_motion_preset, preset_from_json
from vasa.training.checkpoint import MODEL_JSON, load_weights, sha256_file, write_weights

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "vasa-bundle"
BUNDLE_VERSION = 1
FACE, DIT = "face_latent", "motion_dit"
FPS = 25
PACKAGES = ("torch", "numpy", "safetensors", "av", "mediapipe", "librosa", "accelerate")
CODE_DIRS = ("vasa", "preprocessing")
DIT_KEYS = ("preset", "motion_dim", "audio_dim", "emotion_dim", "window", "context")


def code_digest(root: Path | None = None) -> str:
    """sha256 over the Python sources of the packages that define the models and their inputs (sorted
    relative paths and contents): a code version that does not need git and ignores everything else."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


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
        "fps": FPS,
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


def export(params: Params, latent: Path, motion_dit: Path, out: Path, dvc_lock: Path | None = None) -> str:
    """Write the bundle for the stage-1 output `latent` and the stage-2 output `motion_dit` (their
    `model/` folders) into `out`. Returns the bundle's sha256."""
    try:
        face, face_meta = load_face_latent(latent)
        dit_weights, dit_meta = load_weights(motion_dit)
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"export needs trained stage outputs: {err}") from None
    except (ValueError, KeyError) as err:
        raise InputError(f"export: {err}") from None
    dit_task = dit_meta.get("task", {})
    if dit_task.get("task") != "train_motion" or "dit" not in dit_weights:
        raise InputError(f"{motion_dit}: not a train-motion output (task {dit_task.get('task')!r})")
    dit = build_dit(dit_task)
    dit.load_state_dict(dit_weights["dit"], strict=True)
    stage1_sha = face_meta["weights"]["generator"]["sha256"]
    if dit_meta["lineage"].get("stage1_weights_sha256") not in (None, stage1_sha):
        raise InputError(
            f"{motion_dit} was trained on motion from another stage-1 model "
            f"({dit_meta['lineage']['stage1_weights_sha256'][:12]} != {stage1_sha[:12]}): re-run extract_motion"
        )
    lineage = {
        "train_latent": {**face_meta.get("lineage", {}), "step": face_meta.get("step"), "weights_sha256": stage1_sha},
        "train_motion": {
            **dit_meta.get("lineage", {}),
            "step": dit_meta.get("step"),
            "weights_sha256": dit_meta["weights"]["dit"]["sha256"],
        },
        "speakers": face_meta.get("speakers", []),
        "dvc_lock": upstream_digests(dvc_lock) if dvc_lock else {},
    }
    meta = bundle_meta(params, face, face_meta["task"]["n_speakers"], dit_task, dit_meta["normalisation"], lineage)
    digest = write_bundle(out, face, dit, meta)
    log.info("bundle %s in %s", digest[:12], out)
    return digest


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
