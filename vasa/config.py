"""Typed, frozen views of params.yaml, one section per pipeline stage.

params.yaml is the single source of defaults: no field here declares one, so a key missing from the
file is an error, as is an unknown or mistyped key. Library code receives these objects; only entry
points (CLI, DVC stage commands, flows) call `load_params`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


class Section(BaseModel):
    # strict: "25" is not an int. Validation goes through JSON mode so YAML lists fill tuples.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class IdentityConfig(Section):
    """One synthetic speaker of the sample corpus: a bundled portrait and an espeak-ng voice."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    portrait: str
    voice: str
    rate_wpm: int = Field(ge=80, le=450)
    pitch: int = Field(ge=0, le=100)


class MotionConfig(Section):
    """Amplitudes of the synthetic head motion (degrees; shift and scale as fractions of size)."""

    yaw_deg: float = Field(ge=0, le=45)
    pitch_deg: float = Field(ge=0, le=45)
    roll_deg: float = Field(ge=0, le=45)
    shift: float = Field(ge=0, le=0.2)
    scale: float = Field(ge=0, le=0.2)
    nod_with_speech_deg: float = Field(ge=0, le=20)


class SampleConfig(Section):
    """Stage `sample`: the embedded synthetic talking-face corpus."""

    seed: int
    identities: tuple[IdentityConfig, ...] = Field(min_length=1)
    clips_per_identity: int = Field(ge=1)
    min_seconds: float = Field(gt=0)
    max_seconds: float = Field(gt=0)
    size: int = Field(ge=128, le=1024)
    fps: int = Field(gt=0)
    sample_rate: int = Field(gt=0)
    mouth_max_open: float = Field(gt=0, le=1)
    blinks_per_minute: float = Field(ge=0)
    motion: MotionConfig
    crf: int = Field(ge=0, le=51)
    workers: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds}) > max_seconds ({self.max_seconds})")
        names = [identity.name for identity in self.identities]
        if len(set(names)) != len(names):
            raise ValueError(f"identity names must be unique, got {names}")
        return self


class Params(Section):
    """The whole of params.yaml."""

    sample: SampleConfig


def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; every problem is reported with the file and dotted key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read params file: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate_json(json.dumps(data))
    except ValidationError as err:
        raise ConfigError(_describe(path, err)) from None


def _describe(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid params"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif problem["type"] == "missing":
            lines.append(f"  {key}: missing key")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)
