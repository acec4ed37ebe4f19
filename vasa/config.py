"""Typed, frozen views of params.yaml, one section per pipeline stage.

params.yaml is the single source of defaults: no field here declares one, so a key missing from the
file is an error, as is an unknown or mistyped key. Library code receives these objects; only entry
points (CLI, DVC stage commands, flows) call `load_params`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vasa.errors import InputError


class ConfigError(InputError):
    """params.yaml is missing, unreadable or does not match the schema."""


class Section(BaseModel):
    # strict: "25" is not an int. Validation goes through JSON mode so YAML lists fill tuples.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def from_data(cls, data: dict) -> Self:
        """Validate plain data (as read from YAML) with the same rules as params.yaml."""
        return cls.model_validate_json(json.dumps(data))

    def replace(self, **changes) -> Self:
        """A validated copy with some fields changed (nested sections given as plain data or objects)."""
        return self.from_data(
            self.model_dump(mode="json")
            | {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in changes.items()}
        )


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


SOURCE_KINDS = ("sample", "local", "voxceleb2", "youtube")


class LocalSourceConfig(Section):
    """A folder of talking-head videos, with an optional CSV of per-file metadata."""

    extensions: tuple[str, ...] = Field(min_length=1)
    csv_columns: dict[str, str]  # our field (file, speaker_id, licence, source_url) -> CSV column
    default_licence: str
    split: str = Field(pattern=r"^(train|test)$")

    @model_validator(mode="after")
    def _check(self) -> LocalSourceConfig:
        unknown = set(self.csv_columns) - {"file", "speaker_id", "licence", "source_url"}
        if unknown or "file" not in self.csv_columns:
            raise ValueError(
                f"csv_columns needs `file` and only file/speaker_id/licence/source_url, got {sorted(self.csv_columns)}"
            )
        return self


class RemotePartConfig(Section):
    url: str  # http(s)://, file:// or a local path
    md5: str | None
    size: int | None


class ArchiveConfig(Section):
    """One VoxCeleb2 archive: its parts are downloaded, joined in order (`cat`) and extracted."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.zip$")
    parts: tuple[RemotePartConfig, ...] = Field(min_length=1)
    md5: str | None  # of the joined archive


class VoxCeleb2Config(Section):
    archives: tuple[ArchiveConfig, ...]
    licence: str
    user_env: str  # names of the environment variables holding the credentials (never the values)
    password_env: str
    retries: int = Field(ge=0)
    retry_delay_s: float = Field(ge=0)


class YoutubeConfig(Section):
    url_template: str
    format: str
    size: int = Field(ge=64)
    enlarge: float = Field(ge=1)
    smooth_frames: int = Field(ge=1)
    retries: int = Field(ge=0)
    retry_delay_s: float = Field(ge=0)


class IngestConfig(Section):
    """Stage `ingest`: sources -> media files + one parquet manifest."""

    sources: tuple[str, ...] = Field(min_length=1)
    holdout_speakers: tuple[str, ...]  # always split "test", never trained on
    probe_batch: int = Field(ge=1)
    workers: int = Field(ge=1)
    local: LocalSourceConfig
    voxceleb2: VoxCeleb2Config
    youtube: YoutubeConfig

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        unknown = [s for s in self.sources if s not in SOURCE_KINDS]
        if unknown:
            raise ValueError(f"unknown sources {unknown}; choose from {list(SOURCE_KINDS)}")
        return self


class Params(Section):
    """The whole of params.yaml."""

    sample: SampleConfig
    ingest: IngestConfig


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
        return Params.from_data(data)
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
