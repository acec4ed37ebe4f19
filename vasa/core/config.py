"""Typed, frozen views of params.yaml, one section per pipeline stage.

params.yaml is the single source of defaults: no field here declares one, so a key missing from the
file is an error, as is an unknown or mistyped key. Library code receives these objects; only entry
points (CLI, DVC stage commands, flows) call `load_params`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vasa.core.errors import InputError


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
    heldout_clips_per_identity: int = Field(ge=0)  # clips of unseen sentences per identity: split `test`
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


SOURCE_KINDS = ("sample", "local", "voxceleb2", "youtube", "hdtf", "celebvhq", "talkvid")


class LocalSourceConfig(Section):
    """A folder of talking-head videos, with an optional CSV of per-file metadata."""

    extensions: tuple[str, ...] = Field(min_length=1)  # ".mp4": with the dot, as Path.suffix gives
    csv_columns: dict[str, str]  # our field (file, speaker_id, licence, source_url) -> CSV column
    default_licence: str
    split: str = Field(pattern=r"^(train|test)$")  # val is drawn from train speakers by ingest.val_fraction

    @model_validator(mode="after")
    def _check(self) -> LocalSourceConfig:
        undotted = [e for e in self.extensions if not e.startswith(".") or len(e) < 2 or "/" in e]
        if undotted:
            raise ValueError(f"extensions must look like '.mp4' (a dot, then the suffix), got {undotted}")
        unknown = set(self.csv_columns) - {"file", "speaker_id", "licence", "source_url"}
        if unknown or "file" not in self.csv_columns:
            raise ValueError(
                f"csv_columns needs `file` and only file/speaker_id/licence/source_url, got {sorted(self.csv_columns)}"
            )
        return self


class RemotePartConfig(Section):
    url: str  # http(s)://, file:// or a local path; ${VAR} is replaced from the environment at download time
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
    retries: int = Field(ge=0)  # extra attempts after a transient failure (network, HTTP 5xx); never after 4xx/md5
    retry_delay_s: float = Field(ge=0)
    part_deadline_s: float = Field(gt=0)  # wall-clock budget per part, all attempts included
    max_extract_bytes: int = Field(gt=0)  # refuse an archive whose members declare more in total (zip bomb)
    max_compression_ratio: float = Field(ge=1)  # refuse a member inflating more than this (zip bomb)

    @model_validator(mode="after")
    def _check(self) -> VoxCeleb2Config:
        names = [archive.name for archive in self.archives]
        if len(set(names)) != len(names):
            raise ValueError(f"archive names must be unique (each is a file and a folder), got {names}")
        return self


class YoutubeConfig(Section):
    url_template: str
    format: str
    size: int = Field(ge=64)
    enlarge: float = Field(ge=1)
    smooth_frames: int = Field(ge=1)
    retries: int = Field(ge=0)
    retry_delay_s: float = Field(ge=0)


class CorpusListConfig(Section):
    """A corpus published as a list of YouTube ids, time spans and face boxes (CelebV-HQ, TalkVid):
    cut through the YouTube path (ingest.youtube: url_template, format, size, retries)."""

    licence: str  # recorded on every clip of the list
    enlarge: float = Field(ge=1)  # crop side = enlarge x the larger side of the list's box
    max_span_s: float = Field(gt=0)  # a longer span is refused as a bad list entry


class HdtfConfig(CorpusListConfig):
    subsets: tuple[str, ...] = Field(min_length=1)  # HDTF_dataset/<subset>_*.txt files to read

    @model_validator(mode="after")
    def _check(self) -> HdtfConfig:
        odd = [s for s in self.subsets if not s.isalnum()]
        if odd:
            raise ValueError(f"subsets name files <subset>_video_url.txt: letters and digits only, got {odd}")
        return self


class IngestConfig(Section):
    """Stage `ingest`: sources -> media files + one parquet manifest."""

    sources: tuple[str, ...] = Field(min_length=1)
    holdout_speakers: tuple[str, ...]  # always split "test", never trained on
    val_fraction: float = Field(ge=0, lt=1)  # of the non-test speakers, chosen by a hash of the speaker id
    probe_batch: int = Field(ge=1)
    workers: int = Field(ge=1)
    local: LocalSourceConfig
    voxceleb2: VoxCeleb2Config
    youtube: YoutubeConfig
    hdtf: HdtfConfig
    celebvhq: CorpusListConfig
    talkvid: CorpusListConfig

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        unknown = [s for s in self.sources if s not in SOURCE_KINDS]
        if unknown:
            raise ValueError(f"unknown sources {unknown}; choose from {list(SOURCE_KINDS)}")
        return self


class FaceConfig(Section):
    """MediaPipe FaceMesh tracking, track splitting and the aligned crop."""

    min_detection_confidence: float = Field(ge=0, le=1)
    min_tracking_confidence: float = Field(ge=0, le=1)
    min_face_px: float = Field(gt=0)  # face height (forehead to chin) in source pixels
    max_jump: float = Field(gt=0)  # per-frame move of the face centre, in face heights: a cut
    smooth_frames: int = Field(ge=1)  # moving-average window of the `aligned` crop transform
    crop_scale: float = Field(gt=1)  # crop side / face height
    duplicate_iou: float = Field(gt=0, le=1)  # two detections overlapping this much are one face
    max_gap_frames: int = Field(ge=0)  # runs of up to this many frames without one face are bridged


class CropConfig(Section):
    """How a face segment becomes crop pixels (see preprocessing/schema.py for the frames)."""

    mode: str = Field(pattern=r"^(box|aligned)$")  # box: one fixed box per segment; aligned: de-rotated
    border: str = Field(pattern=r"^(replicate|reflect)$")  # fill of crop pixels outside the source frame


class AudioFeatureConfig(Section):
    """Log-mel (librosa) aligned to video frames, optionally a pretrained speech encoder."""

    n_mels: int = Field(ge=8)
    n_fft: int = Field(ge=64)
    hop_length: int = Field(ge=1)  # samples; sample_rate / fps must be a multiple of it
    fmin: float = Field(ge=0)
    fmax: float = Field(gt=0)
    encoder_dir: str | None  # local wav2vec2/HuBERT directory (transformers format); None = log-mel only

    @model_validator(mode="after")
    def _check(self) -> AudioFeatureConfig:
        if self.fmin >= self.fmax:
            raise ValueError(f"fmin ({self.fmin}) must be below fmax ({self.fmax})")
        if self.encoder_dir is not None and not Path(self.encoder_dir).is_dir():
            raise ValueError(f"encoder_dir: {self.encoder_dir!r} is not a directory")
        return self


class FilterConfig(Section):
    """Quality filters; a clip failing one is recorded with the reason and left out of the shards."""

    min_seconds: float = Field(gt=0)
    min_sharpness: float = Field(ge=0)  # median variance of the Laplacian of the face at a fixed size
    max_outside_fraction: float = Field(ge=0, le=1)  # of the crop area outside the source frame
    max_upscale: float = Field(gt=0)  # crop pixels per decoded source pixel
    max_abs_yaw_deg: float = Field(gt=0)
    max_abs_pitch_deg: float = Field(gt=0)
    max_abs_roll_deg: float = Field(gt=0)  # in-plane tilt in the crop (box crops keep it; aligned ones remove it)
    max_av_offset: int = Field(ge=0)  # |VoxCeleb "Offset"| in frames


class ShardConfig(Section):
    """Shards are key ranges: a trie over sample keys from prefixes of `bucket_hex_digits` hex digits,
    a range split by the next digit while it holds more than `max_clips_per_shard` samples
    (preprocessing/shards.py): a new clip rewrites only the shard whose range it falls in."""

    bucket_hex_digits: int = Field(ge=0, le=4)
    max_clips_per_shard: int = Field(ge=1)
    # A pin file (`vasa pin-shards`): a generation per clip key, one trie per generation, so clips added
    # later write new shards only. None, or a file without keys: one trie over the key set alone.
    pin: str | None = None


class RunnerConfig(Section):
    """Where per-clip work runs: threads or processes here, or a Dask cluster (prefect-dask)."""

    kind: str = Field(pattern=r"^(threads|processes|dask)$")
    workers: int = Field(ge=1)
    clips_per_task: int = Field(ge=1)  # clips per Prefect task: fewer tasks, less scheduling overhead
    dask_address: str | None  # scheduler address; None with kind=dask starts a LocalCluster


class DecodeConfig(Section):
    """How clips are decoded: a cap on the decoded resolution and the frames held at once."""

    max_side: int | None = Field(ge=64)  # longer side of decoded frames, pixels (even); None = source size
    chunk_frames: int = Field(ge=1)  # output frames decoded and held at once: memory ~ chunk x frame bytes

    @model_validator(mode="after")
    def _check(self) -> DecodeConfig:
        if self.max_side is not None and self.max_side % 2:
            raise ValueError(f"max_side must be even (H.264 yuv420p frame sizes), got {self.max_side}")
        return self


class PreprocessConfig(Section):
    """Stage `preprocess`: manifest -> webdataset shards of crops, pose, gaze and audio features."""

    fps: int = Field(gt=0)
    sample_rate: int = Field(gt=0)
    crop_size: int = Field(ge=32)
    crop_crf: int = Field(ge=0, le=51)  # libx264 quality of the crop videos in the shards
    crop_preset: str = Field(pattern=r"^(ultrafast|superfast|veryfast|faster|fast|medium|slow|slower|veryslow)$")
    decode: DecodeConfig
    crop: CropConfig
    face: FaceConfig
    audio: AudioFeatureConfig
    filters: FilterConfig
    shards: ShardConfig
    runner: RunnerConfig

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if self.crop_size % 2:
            raise ValueError(f"crop_size must be even (H.264 yuv420p), got {self.crop_size}")
        if self.audio.fmax > self.sample_rate / 2:
            raise ValueError(
                f"audio.fmax ({self.audio.fmax} Hz) is above the Nyquist frequency sample_rate / 2 "
                f"({self.sample_rate / 2:g} Hz)"
            )
        per_frame = self.sample_rate / self.fps
        if per_frame != int(per_frame) or per_frame % self.audio.hop_length:
            raise ValueError(
                f"sample_rate / fps = {per_frame} samples per video frame must be a whole multiple of "
                f"audio.hop_length ({self.audio.hop_length})"
            )
        return self


class TrainConfig(Section):
    """The shared training engine (vasa/training): optimisation, EMA, logging and checkpoint cadence.

    `batch_size` is per process and micro-step: the global batch is batch_size x processes x grad_accum.
    Reused by stage 1, stage 2 and the evaluation networks.
    """

    steps: int = Field(ge=1)  # optimiser steps (each = grad_accum micro-batches per process)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    lr: float = Field(gt=0)  # peak AdamW learning rate (times the task's per-module lr_scale)
    betas: tuple[float, float]
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)  # linear warm-up from 0, then cosine decay to min_lr_ratio x lr
    min_lr_ratio: float = Field(ge=0, le=1)
    clip_norm: float = Field(ge=0)  # max global gradient norm per module; 0 = no clipping
    ema_decay: float = Field(ge=0, lt=1)
    precision: str = Field(pattern=r"^(auto|fp32|bf16|fp16)$")  # auto: bf16 on a GPU that has it, else fp32
    seed: int = Field(ge=0)
    log_every: int = Field(ge=1)  # steps between DVCLive metric rows
    image_every: int = Field(ge=1)  # steps between PNG grids
    checkpoint_every: int = Field(ge=1)  # steps between resumable states; also the data-epoch length
    keep_checkpoints: int = Field(ge=1)  # newest resumable states kept on disk
    activation_checkpointing: bool  # the task's heavy blocks recompute activations in backward (less memory)
    compile: bool  # torch.compile every module's forward (nn.Module.compile, in place)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self


class LatentDataConfig(Section):
    """Stage-1 loader (vasa/loaders/pairs.py): frame pairs from the train shards, held-out frames for evaluation."""

    shuffle_buffer: int = Field(ge=1)  # clips' worth of pairs each loader worker shuffles (memory: vasa.loaders.pairs)
    pairs_per_clip: int = Field(ge=1)  # source/driver pairs drawn from a clip each time it is decoded
    min_frame_gap: int = Field(ge=0)  # frames between source and driver, at least
    # Share of pairs whose source is a frame with the mouth at rest (opening at or below the clip's
    # rest_percentile), as generation's portrait is; 0 = every source drawn like the driver.
    source_at_rest: float = Field(default=0.0, ge=0, le=1)
    rest_percentile: float = Field(default=25.0, gt=0, le=100)
    holdout_fraction: float = Field(ge=0, lt=0.5)  # last part of every train clip: never trained on, evaluated
    eval_pairs: int = Field(ge=1)  # held-out pairs for the end-of-training PSNR vs the copy baseline
    workers: int = Field(ge=0)  # DataLoader processes per training process (0 = decode in the trainer)


class LatentLossConfig(Section):
    """Stage-1 loss weights and settings (vasa/losses.py, vasa/training/latent_task.py). A weight of 0 turns a
    term off (and skips its computation where it has its own forward pass)."""

    l1: float = Field(ge=0)  # multi-scale L1 reconstruction of the driver frame
    l1_scales: int = Field(ge=1, le=5)  # full, 1/2, 1/4 ... resolution
    perceptual: float = Field(ge=0)  # VGG19 feature L1; off (logged once) while perceptual_weights is None
    perceptual_weights: str | None  # local safetensors of VGG19 `features` (torchvision keys); None = off
    adversarial: float = Field(ge=0)  # hinge GAN, multi-scale PatchGAN
    feature_matching: float = Field(ge=0)  # L1 between discriminator features of real and fake
    pose: float = Field(ge=0)  # supervision of the motion encoder's head pose by the shards' pose
    expression: float = Field(ge=0)  # supervision of z_dyn's first dims by the shards' FaceMesh expression
    mouth: float = Field(ge=0)  # L1 of the reconstruction inside the driver's mouth box (lip motion)
    warp: float = Field(ge=0)  # multi-scale L1 of the source warped by the flow alone, outside the mouth box
    transfer: float = Field(ge=0)  # VASA-1 pairwise pose/dynamics transfer consistency
    cross_identity: float = Field(ge=0)  # identity must survive re-rendering with another speaker's motion
    identity: float = Field(ge=0)  # CosFace loss of the identity encoder on the speaker labels
    cosface_margin: float = Field(ge=0, lt=1)  # CosFace m (cosine units)
    cosface_scale: float = Field(gt=0)  # CosFace s

    @model_validator(mode="after")
    def _check(self) -> LatentLossConfig:
        if self.cross_identity > 0 and self.identity == 0:
            raise ValueError("cross_identity > 0 needs identity > 0: its judge is the identity encoder trained by it")
        return self


class TrainLatentConfig(Section):
    """Stage `train_latent`: the disentangled face latent space (VASA-1 section 3.1)."""

    model: str  # preset name in vasa.models.presets.LATENT_PRESETS
    cpu_threads: int = Field(ge=0)  # torch intra-op threads; 0 keeps torch's default (one per core)
    loss: LatentLossConfig
    train: TrainConfig
    data: LatentDataConfig


# --- stage 2: motion DiT (vasa/models/motion_dit.py, vasa/diffusion.py, vasa/training/motion_task.py)


class DiffusionConfig(Section):
    """Noise schedule and DDIM sampler of the motion DiT (x0-prediction, VASA-1 §3.2)."""

    train_steps: int = Field(ge=2)  # T: discrete noise levels seen in training
    schedule: str = Field(pattern=r"^(cosine|linear)$")  # cosine: Nichol & Dhariwal 2021; linear: DDPM betas
    sampling_steps: int = Field(ge=1)  # DDIM steps at generation (paper: 50; 10 is ~5x faster)
    eta: float = Field(ge=0, le=1)  # DDIM stochasticity: 0 = deterministic given the initial noise

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if self.sampling_steps > self.train_steps:
            raise ValueError(f"sampling_steps ({self.sampling_steps}) exceeds train_steps ({self.train_steps})")
        return self


class GuidanceConfig(Section):
    """Classifier-free guidance: condition dropout in training, per-condition scales at generation."""

    p_drop: float = Field(ge=0, lt=1)  # each of audio, gaze, distance, emotion replaced by its null embedding
    p_drop_context: float = Field(ge=0, lt=1)  # the previous window's motion and audio (X_pre, A_pre) dropped
    cfg_audio: float = Field(ge=0)  # λ_audio (paper: 0.5); 0 = no audio guidance
    cfg_gaze: float = Field(ge=0)  # λ_gaze (paper: 1.0)


class MotionLossConfig(Section):
    """Weights of the terms added to the x0 loss ‖X0 − H(Xt, t, C)‖² (weight 1); 0 turns a term off."""

    velocity: float = Field(ge=0)  # MSE of frame-to-frame differences, predicted vs true (against flicker)
    smoothness: float = Field(ge=0)  # mean squared second difference (acceleration) of the prediction
    transition: float = Field(ge=0)  # MSE of the step from the last context frame to the first window frame


class ExtractMotionConfig(Section):
    """Stage `extract_motion`: the stage-1 motion encoder run over every shard sample (VASA-1 §3.2 data)."""

    batch_size: int = Field(ge=1)  # frames per encoder forward pass
    device: str = Field(pattern=r"^(auto|cpu|cuda)$")  # auto: the GPU when there is one
    std_floor: float = Field(gt=0)  # a motion dimension whose train std is below this is scaled by 1, not 1/std


class MotionDataConfig(Section):
    """The stage-2 loader: windows of W frames (+ K context frames) from the train split's memory-mapped arrays."""

    eval_windows: int = Field(ge=1)  # held-out (val/test, else train) windows for the end-of-training figures
    workers: int = Field(ge=0)  # DataLoader processes per training process (0 = read in the trainer)


class TrainMotionConfig(Section):
    """Stage `train_motion`: the audio-conditioned motion diffusion transformer (VASA-1 section 3.2)."""

    model: str  # preset name in vasa.models.presets.MOTION_PRESETS
    window: int = Field(ge=2)  # W frames per generated window
    context: int = Field(ge=1)  # K frames of the previous window conditioning the next
    diffusion: DiffusionConfig
    guidance: GuidanceConfig
    loss: MotionLossConfig
    train: TrainConfig
    data: MotionDataConfig

    @model_validator(mode="after")
    def _check(self) -> TrainMotionConfig:
        if self.context >= self.window:
            raise ValueError(f"context ({self.context}) must be shorter than the window ({self.window})")
        return self


class C2paConfig(Section):
    """Signing of generated videos (vasa/labelling/labels.py). Paths only: a key's passphrase comes from the
    environment (VASA_C2PA_KEY_PASSWORD), never from params."""

    chain: str | None  # PEM certificate chain, leaf first; null = no C2PA manifest (logged)
    key: str | None  # PEM private key of the leaf
    dev_certificate: bool  # no chain/key given: sign with a throwaway, untrusted development certificate


class GenerateConfig(Section):
    """`vasa generate` and the `demo` stage: portrait + speech -> talking-face mp4 (vasa/inference/generate.py)."""

    device: Literal["auto", "cpu", "cuda", "mps"]  # auto: cuda, else mps, else cpu (`--device` overrides)
    threads: int = Field(ge=1)  # torch intra-op and OpenCV threads, set by the entry point (vasa/cli.py)
    steps: int | None = Field(ge=1)  # DDIM steps; null = the bundle's default
    max_guidance: float = Field(ge=0, allow_inf_nan=False)  # upper bound of the guidance scales a run may ask
    seed: int
    max_audio_seconds: float = Field(gt=0)
    min_audio_rms: float = Field(ge=0)  # quieter speech is refused as silent
    max_side: int = Field(ge=64)  # the portrait's longer side is reduced to this before pasting back
    feather: float = Field(ge=0, le=0.5)  # paste-back blend ramp, fraction of the crop side
    render_batch: int = Field(ge=1)  # frames rendered per forward call
    stream_hop: int = Field(ge=1)  # low-latency streaming: frames per DiT window shown (>= W: whole windows)
    stream_lookahead: int = Field(ge=0)  # ... frames of audio heard after them first
    stream_steps: int | None = Field(ge=1)  # ... DDIM steps of those windows; null = `steps`
    stream_overlap: int = Field(ge=0)  # ... frames already shown held fixed at the start of each window
    smooth_pose: float = Field(ge=0)  # Gaussian sigma (frames) on the generated head pose; 0 = raw
    smooth_dynamics: float = Field(ge=0)  # ... on the generated facial dynamics (lips: keep small)
    encoder: Literal["auto", "libx264", "h264_nvenc"]  # auto: NVENC when rendering on CUDA and it opens
    crf: int = Field(ge=0, le=51)  # libx264's constant rate factor; NVENC's cq
    preset: str  # libx264's speed preset
    encoder_threads: int = Field(ge=1)  # libx264 threads (the same count gives the same bytes)
    nvenc_preset: str  # h264_nvenc's preset, p1 (fastest) .. p7
    audio_bit_rate: int = Field(ge=16000, le=512000)  # AAC bits/s of the user's audio (lowered to AAC's limit)
    c2pa: C2paConfig


class ServeConfig(Section):
    """`vasa serve`: the streaming server's address and bounds (vasa/inference/serve.py). Portrait, guidance and
    sampling settings come from `generate`."""

    host: str = Field(min_length=1)
    port: int = Field(ge=0, le=65535)  # 0 = any free port
    max_sessions: int = Field(ge=1)  # sessions open at once; one more is refused as busy
    workers: int = Field(ge=1)  # sessions doing model work at once; the others wait for a slot
    max_audio_seconds: float = Field(gt=0)  # audio one session may send
    idle_timeout_s: float = Field(gt=0)  # a client that sends nothing (or reads nothing) this long is dropped
    max_message_bytes: int = Field(ge=1024)  # one WebSocket message, the base64 portrait included
    sample_rates: tuple[int, ...] = Field(min_length=1)  # PCM rates accepted; others are refused
    max_side: int = Field(ge=64)  # the portrait's longer side for streamed frames
    jpeg_quality: int = Field(ge=1, le=100)
    pending_chunks: int = Field(ge=1)  # frame chunks made but not yet sent before the model waits for the client

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        odd = [rate for rate in self.sample_rates if not 4000 <= rate <= 192000]
        if odd:
            raise ValueError(f"sample_rates must lie within 4000-192000 Hz, got {odd}")
        return self


class ExportConfig(Section):
    """`vasa export`: the real-time bundle (vasa/stages/export.py)."""

    onnx: bool  # also export the renderer and the motion DiT to ONNX, checked on onnxruntime


# --- evaluation: the judges (vasa/evaluation/sync.py, capp.py) and the `evaluate` stage (vasa/stages/evaluate.py)


class SyncJudgeConfig(Section):
    """The SyncNet-style audio-visual sync expert (S_C / S_D)."""

    model: str  # preset name in vasa.evaluation.sync.SYNC_PRESETS
    negatives: int = Field(ge=1)  # shifted audio windows per mouth window in the contrastive loss
    min_shift: int = Field(ge=1)  # frames: the smallest shift used as a negative
    max_shift: int = Field(ge=1)  # frames: the largest
    temperature: float = Field(gt=0)  # InfoNCE temperature over cosine similarities
    train: TrainConfig

    @model_validator(mode="after")
    def _check(self) -> SyncJudgeConfig:
        if self.min_shift > self.max_shift:
            raise ValueError(f"min_shift ({self.min_shift}) exceeds max_shift ({self.max_shift})")
        return self


class CappJudgeConfig(Section):
    """CAPP: contrastive audio-pose judge over windows of `window` frames."""

    model: str  # preset name in vasa.evaluation.capp.CAPP_PRESETS
    window: int = Field(ge=2)  # frames (VASA-1: 3 s)
    train: TrainConfig


class JudgesConfig(Section):
    """Stage `train_judges`: the evaluation judges, trained on the train split minus the evaluation clips."""

    cpu_threads: int = Field(ge=0)  # torch intra-op threads; 0 keeps torch's default
    sync: SyncJudgeConfig
    capp: CappJudgeConfig


class EvaluateConfig(Section):
    """Stage `evaluate`: VASA-1's figures on real, generated and audio-shifted evaluation clips."""

    sync_offsets: int = Field(ge=1)  # S_C/S_D search offsets -V..V frames (SyncNet's evaluation: 15)
    shift_frames: int  # the control's audio shift, frames; beyond sync_offsets no offset search realigns it
    capp_stride: int = Field(ge=1)  # frames between CAPP windows of a clip
    steps: int | None = Field(ge=1)  # DDIM steps for generation; null = generate.steps / the bundle's
    identity_weights: str | None  # TorchScript face-embedding network; null = identity similarity skipped
    fvd_weights: str | None  # TorchScript I3D (StyleGAN-V's i3d_torchscript.pt interface); null = FVD skipped

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if abs(self.shift_frames) <= self.sync_offsets:
            raise ValueError(
                f"|shift_frames| ({self.shift_frames}) must exceed sync_offsets ({self.sync_offsets}): S_C/S_D search "
                "the offsets and would realign a smaller shift"
            )
        return self


class RetrainGateConfig(Section):
    """One promotion condition: the number (or flag) at dotted `key` of JSON `file` compared by `op` with `value`."""

    file: str  # relative to the repository root, e.g. data/latent/live/metrics.json
    key: str = Field(min_length=1)  # dotted path inside the JSON object, e.g. heldout_frames.margin_db
    op: Literal[">=", ">", "<=", "<", "==", "!="]
    value: float | bool


class RetrainConfig(Section):
    """Scheduled retraining (flows/retrain.py): what to rebuild, the promotion gate and how a bundle is promoted."""

    targets: tuple[str, ...]  # `dvc repro` targets (their upstream stages run too); empty = the whole pipeline
    gate: tuple[RetrainGateConfig, ...] = Field(min_length=1)  # every condition must hold for a promotion
    artifact: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")  # dvc.yaml artifact name: the git tags' prefix
    stage: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")  # registry stage a promoted version is assigned to
    git_tag: bool  # commit dvc.lock and the promotion record, tag `<artifact>@vX.Y.Z` and `<artifact>#<stage>#N`
    push: bool  # `dvc push` to the default remote on promotion
    pin_shards: bool  # `vasa pin-shards` after ingest: the run's new clips form a new shard generation
    # At most this many pinned generations: past it the newest are folded into one, size-tiered; 0 = no limit.
    max_shard_generations: int = Field(ge=0)
    cron: str  # schedule of `vasa retrain --serve` and of the deployment


# --- the per-clip score table and its filters (stage `score`, vasa/stages/score.py)


class ScoreSyncConfig(Section):
    """A/V sync filter on the sync expert's S_C and best offset (SyncNet's search over evaluate.sync_offsets)."""

    min_confidence: float = Field(ge=0)  # S_C below this: rejected (audio not this face's speech, or far off)
    max_offset: int = Field(ge=0)  # |best offset| up to this many frames is corrected (audio shifted), beyond: rejected
    # The judge's S_C margin (aligned - shifted audio) on the scored clips; below it the sync filter is off
    # (recorded): a judge that cannot tell timing on this corpus decides nothing.
    min_judge_margin: float


class ScoreQualityConfig(Section):
    """No-reference image quality of the crops (vasa/evaluation/image_quality.py)."""

    max_blur: float = Field(ge=0, le=1)  # Crété-Roffet blur index of the face above this: rejected (image_blur)
    max_frozen: float = Field(ge=0, le=1)  # fraction of face blocks frozen between frames above this: image_compression
    blur_frames: int = Field(ge=1)  # frames (evenly spread) whose blur index is measured; the median counts


class ScoreConfig(Section):
    """Stage `score`: per-clip sync and image-quality scores, and the filters training applies."""

    cpu_threads: int = Field(ge=0)  # torch intra-op threads; 0 keeps torch's default
    sync: ScoreSyncConfig
    quality: ScoreQualityConfig


class Params(Section):
    """The whole of params.yaml."""

    sample: SampleConfig
    ingest: IngestConfig
    preprocess: PreprocessConfig
    train_latent: TrainLatentConfig
    extract_motion: ExtractMotionConfig
    train_motion: TrainMotionConfig
    export: ExportConfig
    generate: GenerateConfig
    retrain: RetrainConfig
    judges: JudgesConfig
    evaluate: EvaluateConfig
    score: ScoreConfig
    serve: ServeConfig


# Bounds on a params file, far above params.yaml (~20 KB, ~600 nodes): YAML aliases let a few hundred
# bytes stand for billions of nodes (the "billion laughs" bomb), which the duplicate-key walk and the
# validation would expand at 100 % CPU without end.
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_NODES = 100_000  # scalars, lists and mappings, each alias counted as the nodes it stands for


def load_params(path: str | Path, overlays: Sequence[str | Path] = ()) -> Params:
    """Read and validate params.yaml; every problem is reported with the file and dotted key.

    Each overlay (e.g. cluster/recipes/voxceleb2_512_8gpu.yaml) is a YAML mapping of some of the same keys,
    merged over the params in order: mappings merge key by key, any other value (scalar, list, null) replaces
    the one below. An overlay may only change keys the params file has, never add one, so a misspelt key is
    an error naming the overlay, not a silently ignored line; the merged result is validated as a whole.
    """
    path = Path(path)
    data = _read_yaml(path, "params file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for overlay in map(Path, overlays):
        changes = _read_yaml(overlay, "overlay")
        if not isinstance(changes, dict):
            raise ConfigError(f"{overlay}: an overlay is a mapping of params sections (like {path.name})")
        problems = _merge(data, changes)
        if problems:
            raise ConfigError("\n".join([f"{overlay}: invalid overlay of {path}", *problems]))
    try:
        return Params.from_data(data)
    except ValidationError as err:
        raise ConfigError(_describe(" + ".join(str(p) for p in [path, *overlays]), err)) from None


def _merge(tree: dict, changes: dict, prefix: str = "") -> list[str]:
    """Put `changes` into `tree` in place (mappings merged key by key, other values replaced); the problems
    (`  dotted.key: ...`) where a key is not in `tree` or a mapping would replace a value that is not one."""
    problems = []
    for key, value in changes.items():
        dotted = f"{prefix}{key}"
        if key not in tree:
            problems.append(f"  {dotted}: unknown key (an overlay only changes keys the params file has)")
        elif isinstance(value, dict):
            if isinstance(tree[key], dict):
                problems += _merge(tree[key], value, f"{dotted}.")
            else:
                problems.append(f"  {dotted}: a mapping given where the params file has {tree[key]!r}")
        else:
            tree[key] = value
    return problems


def _read_yaml(path: Path, what: str) -> object:
    """The YAML document in `path`, read within the size and alias bounds, refused with duplicate keys."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {what} larger than {MAX_PARAMS_BYTES} bytes: refused")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: {what} is not UTF-8 text: {err}") from None
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)  # an alias is a reference here: linear in the text
        size = _expanded_size(tree)
        if size > MAX_PARAMS_NODES:
            raise ConfigError(
                f"{path}: over {MAX_PARAMS_NODES} YAML nodes once aliases are expanded (an alias bomb?): refused"
            )
        duplicates = _duplicate_keys(tree)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:  # PyYAML composes recursively: thousands of nested [ or { exhaust the stack
        raise ConfigError(f"{path}: YAML nested too deeply: refused") from None
    if duplicates:
        # PyYAML keeps the last of two equal keys silently: a value edited in the first copy would be ignored.
        raise ConfigError("\n".join([f"{path}: invalid {'params' if what == 'params file' else what}", *duplicates]))
    return data


def _expanded_size(root: yaml.Node | None) -> float:
    """Nodes in the tree once every alias is replaced by a copy of its anchor's node; infinite for an
    alias inside its own anchor (a cycle). Each distinct node is counted once, so linear in the text."""
    sizes: dict[int, float] = {}

    def size(node: yaml.Node) -> float:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = float("inf")  # while its children are counted: met again, it contains itself
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    return size(root) if root is not None else 0


def _duplicate_keys(node: yaml.Node | None, prefix: str = "") -> list[str]:
    """`  dotted.key: duplicate key (lines A and B)` for every mapping key given twice in the YAML tree."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            dotted = f"{prefix}{key}"
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(f"  {dotted}: duplicate key (lines {seen[key]} and {line})")
            seen.setdefault(key, line)
            problems += _duplicate_keys(value_node, f"{dotted}.")
    elif isinstance(node, yaml.SequenceNode):
        for number, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{prefix}{number}.")
    return problems


def _describe(path: str, err: ValidationError) -> str:
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
