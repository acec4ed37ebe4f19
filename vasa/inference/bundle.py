"""The self-describing real-time bundle: its format, `write_bundle` (stage `export`) and `load_bundle`.

One folder in the checkpoint format of every stage (vasa/core/weights.py): safetensors + JSON, no
pickle, each file's sha256 in a sealed `model.json`, which `load_bundle` checks before loading anything.

    face_latent.safetensors   stage 1 EMA generator: appearance/identity/motion encoders, warping, decoder
    motion_dit.safetensors    stage 2 EMA motion diffusion transformer
    model.json                format, presets, audio-feature settings, frame rate, crop geometry, motion
                              normalisation, default sampling and guidance, lineage (both stages' lineage,
                              dvc.lock digests of the upstream outputs, code digest, package versions)

The bundle's identity is the sha256 of its model.json (`Bundle.sha256`): it names the file digests, so
it changes when any weight changes. Generated videos carry it (container tags, C2PA, watermark).
Nothing in the bundle depends on the wall clock: same inputs, params and code give the same bytes.

A bundle is whole or refused (`load_bundle`, InputError naming the file): model.json sealed and
checked against BundleMeta (every setting generation reads, typed and bounded, finite), weight files
confined to the folder and matching their digests, tensors of exactly the shapes the settings build
(compared on the meta device, so an absurd preset size costs nothing) and finite, and the ONNX
files of `onnx/`, when present, made from this very bundle (onnx.json's bundle_sha256 and file digests).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vasa.core.config import AudioFeatureConfig, Params
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError
from vasa.core.files import read_json
from vasa.core.weights import MODEL_JSON, WeightsError, load_weights, non_finite, weight_path, write_weights
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_dit import MotionDiT
from vasa.models.presets import get_motion_preset, preset_from_json

log = logging.getLogger(__name__)


BUNDLE_FORMAT = "vasa-bundle"


BUNDLE_VERSION = 2  # 2: model.json sealed (vasa/core/weights.py SEAL) and checked against BundleMeta


FACE, DIT = "face_latent", "motion_dit"


PACKAGES = ("torch", "numpy", "safetensors", "av", "mediapipe", "librosa", "accelerate")


DIT_KEYS = ("preset", "motion_dim", "audio_dim", "emotion_dim", "window", "context")


MAX_GUIDANCE = 100.0  # classifier-free guidance scales in use are 0-10; far above that the motion is noise


class _Strict(BaseModel):
    # strict and finite: "25" is not an int and NaN is not a number here.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Width = Annotated[int, Field(ge=1, le=4096)]


class LatentPresetMeta(_Strict):
    """model.json `face_latent.preset` (vasa/models/presets.py LatentPreset.describe())."""

    name: str
    resolution: int = Field(ge=16, le=2048)
    appearance_widths: list[int] = Field(min_length=1, max_length=8)
    volume_channels: Width
    volume_depth: int = Field(ge=1, le=256)
    volume_blocks: int = Field(ge=0, le=16)
    identity_widths: list[int] = Field(min_length=1, max_length=10)
    identity_dim: Width
    motion_widths: list[int] = Field(min_length=1, max_length=10)
    dynamics_dim: Width
    flow_widths: list[int] = Field(min_length=1, max_length=8)
    decoder_widths: list[int] = Field(min_length=1, max_length=8)
    discriminator_widths: list[int] = Field(min_length=1, max_length=8)
    discriminator_scales: int = Field(ge=1, le=6)
    canonical_scale: float = Field(gt=0, le=1)
    source_skip: bool
    expression_side: int = Field(ge=0, le=512)
    measured_pose: bool = False  # absent from bundles exported before it existed

    @model_validator(mode="after")
    def _widths(self) -> LatentPresetMeta:
        for name in ("appearance_widths", "identity_widths", "motion_widths", "flow_widths", "decoder_widths"):
            if not all(1 <= w <= 4096 for w in getattr(self, name)):
                raise ValueError(f"{name}: every width must be 1-4096")
        return self


class FaceLatentMeta(_Strict):
    preset: LatentPresetMeta
    n_speakers: int = Field(ge=0, le=10_000_000)


class MotionPresetMeta(_Strict):
    name: str
    layers: int = Field(ge=1, le=64)
    width: Width
    heads: int = Field(ge=1, le=64)
    mlp_ratio: int = Field(ge=1, le=16)


class MotionDiTMeta(_Strict):
    preset: MotionPresetMeta
    motion_dim: int = Field(ge=1, le=4096)
    audio_dim: int = Field(ge=1, le=4096)
    emotion_dim: int = Field(ge=0, le=64)
    window: int = Field(ge=1, le=1000)
    context: int = Field(ge=0, le=1000)


class AudioMeta(_Strict):
    sample_rate: int = Field(ge=8000, le=192_000)
    features: dict

    @model_validator(mode="after")
    def _features(self) -> AudioMeta:
        AudioFeatureConfig.from_data(self.features)  # the same rules as params.yaml's preprocess.audio
        return self


class CropMeta(_Strict):
    crop_size: int = Field(ge=16, le=4096)
    crop_scale: float = Field(gt=0, le=10)


class SamplingMeta(_Strict):
    steps: int = Field(ge=1)
    eta: float = Field(ge=0, le=1)
    schedule: str = Field(pattern=r"^(cosine|linear)$")
    train_steps: int = Field(ge=2, le=100_000)
    cfg_audio: float = Field(ge=0, le=MAX_GUIDANCE)
    cfg_gaze: float = Field(ge=0, le=MAX_GUIDANCE)

    @model_validator(mode="after")
    def _steps(self) -> SamplingMeta:
        if self.steps > self.train_steps:
            raise ValueError(f"steps {self.steps} > train_steps {self.train_steps} (DDIM visits trained levels)")
        return self


class BundleMeta(_Strict):
    """Every block of a bundle's model.json that generation reads, typed and bounded. Lineage is free
    provenance (read by audits, never by generation), so it is only required to be an object."""

    format: str = Field(pattern=f"^{BUNDLE_FORMAT}$")
    version: int
    fps: int = Field(ge=1, le=120)
    face_latent: FaceLatentMeta
    motion_dit: MotionDiTMeta
    audio: AudioMeta
    crop: CropMeta
    normalisation: dict
    sampling: SamplingMeta
    lineage: dict
    weights: dict
    json_sha256: str

    @model_validator(mode="after")
    def _normalisation(self) -> BundleMeta:
        for name, block in self.normalisation.items():
            if isinstance(block, dict) and {"mean", "std"} <= set(block):
                mean, std = block["mean"], block["std"]
                if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
                    raise ValueError(f"normalisation.{name}: mean and std must be lists of one length")
                values = [*mean, *std]
                if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                    raise ValueError(f"normalisation.{name}: mean and std must be finite numbers")
                if not all(v > 0 for v in std):
                    raise ValueError(f"normalisation.{name}: std must be positive")
        return self


def check_meta(folder: Path, meta: dict) -> BundleMeta:
    """model.json validated against BundleMeta; WeightsError naming the file and the first bad field."""
    if meta.get("format") != BUNDLE_FORMAT:
        raise WeightsError(f"{folder}: not a {BUNDLE_FORMAT} folder (format {meta.get('format')!r})")
    if meta.get("version") != BUNDLE_VERSION:
        raise WeightsError(
            f"{folder}: bundle version {meta.get('version')} (this code reads {BUNDLE_VERSION}); re-export it"
        )
    try:
        return BundleMeta.model_validate(meta)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise WeightsError(f"{folder / MODEL_JSON}: {where}: {first['msg']}") from None


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
    """model.json of a bundle (without the file digests, which write_weights adds); `lineage` as the export
    stage gives it (with the code digest), plus the package versions."""
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
        "lineage": {**lineage, "packages": package_versions()},
    }


def write_bundle(out: Path, face: FaceLatent, dit: MotionDiT, meta: dict) -> str:
    """Write the bundle files; returns the bundle's sha256 (of model.json)."""
    write_weights(out, {FACE: face.state_dict(), DIT: dit.state_dict()}, meta)
    return sha256_file(out / MODEL_JSON)


def _check_shapes(path: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The tensors in `path` are exactly those `model` (built on the meta device) has, shape for shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if set(expected) != set(found):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise WeightsError(f"{path}: tensors do not match model.json (unexpected {extra[:3]}, missing {missing[:3]})")
    for key, shape in expected.items():
        if found[key] != shape:
            raise WeightsError(f"{path}: {key} has shape {list(found[key])}, model.json builds {list(shape)}")


def check_onnx(folder: Path, sha256: str) -> None:
    """`folder/onnx/`, when present, holds the ONNX export of this bundle: onnx.json names the bundle's
    sha256 and each file's digest (a kill between writing the weights and the ONNX files, or files
    copied from another bundle, would otherwise pair one model's weights with another's graphs)."""
    onnx_dir = folder / "onnx"
    if not onnx_dir.exists():
        return
    report = read_json(onnx_dir / "onnx.json")
    if report is None or report.get("bundle_sha256") != sha256:
        raise WeightsError(f"{onnx_dir / 'onnx.json'}: ONNX files of another bundle (or none); re-export")
    for kind in ("renderer", "denoiser"):
        entry = report.get(kind)
        path = weight_path(onnx_dir, entry)  # WeightsError unless entry is {"file": a plain name, ...}
        assert isinstance(entry, dict)
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise WeightsError(f"{path}: does not match onnx.json's sha256")


def load_bundle(folder: Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle after checking it whole (module docstring). InputError naming the file on a
    missing, foreign, malformed or tampered bundle; never a traceback from torch or safetensors."""
    try:
        weights, meta = load_weights(folder)
    except FileNotFoundError as err:
        raise InputError(f"no bundle: {err}") from None
    except OSError as err:
        raise InputError(f"{folder}: not a valid bundle ({err})") from None
    checked = check_meta(folder, meta)
    if set(weights) != {FACE, DIT}:
        raise WeightsError(f"{folder / MODEL_JSON}: weights {sorted(weights)}, a bundle has {[DIT, FACE]}")
    preset = preset_from_json(meta["face_latent"]["preset"])
    with torch.device("meta"):
        skeletons = {
            FACE: FaceLatent(preset, n_speakers=checked.face_latent.n_speakers),
            DIT: build_dit(meta["motion_dit"]),
        }
    for name, skeleton in skeletons.items():
        _check_shapes(weight_path(folder, meta["weights"][name]), skeleton, weights[name])
    bad = non_finite(weights)
    if bad:
        raise WeightsError(f"{folder}: non-finite weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    sha256 = sha256_file(folder / MODEL_JSON)
    check_onnx(folder, sha256)
    # The checked skeletons take the loaded tensors as they are (assign): no second model is built and
    # randomly initialised only to be overwritten (0.6 CPU-s for `base`; the networks hold no tensor
    # outside their state dicts, so nothing stays on the meta device).
    for name, skeleton in skeletons.items():
        dtypes = skeleton.state_dict()
        skeleton.load_state_dict({key: value.to(dtypes[key].dtype) for key, value in weights[name].items()},
                                 strict=True, assign=True)  # fmt: skip
    face, dit = skeletons[FACE], skeletons[DIT]
    assert isinstance(face, FaceLatent) and isinstance(dit, MotionDiT)
    target = torch.device(device)
    return Bundle(face.to(target).eval(), dit.to(target).eval(), meta, sha256, target)
