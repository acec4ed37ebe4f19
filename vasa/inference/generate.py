"""Generate talking faces (`vasa generate`): one portrait + one speech clip -> a labelled mp4.

    portrait --FaceMesh--> box crop (the shards' geometry) --encoders--> canonical face, z_id      (once)
    speech --log-mel--> audio features --motion DiT, window by window--> pose + z_dyn per frame
    per frame: warp + decode (stage 1 renderer) -> paste back into the portrait (feathered) -> watermark
    -> H.264 + the user's audio at its own rate and channels (PyAV) with container tags -> C2PA manifest
    (vasa/labelling/labels.py); everything after the renderer runs in threads beside it
    (vasa/inference/postprocess.py)

`stream` is the same path as a generator: audio chunks in, frame chunks out, one motion window at a
time (memory bounded by one window whatever the length). `generate` drives it over a whole file.
Reenactment: `driving` frames give pose and dynamics from the motion encoder instead of the DiT;
`pose_from` / `dynamics_from` take one factor from a driving video and keep the other.

Inputs fail with a clear `InputError` and leave no output file, checked before any work where they can
be (`check_request`): an output that names an input, is a folder or cannot be written; a condition or
setting that is not finite or outside its range (`condition_ranges`, the one place they are stated); no face
in the portrait (several: the largest is used and a warning says so), unreadable, silent, non-finite or
too long audio. Motion or frames that come out non-finite (a broken bundle) are never encoded or signed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from preprocessing import face as face_mod
from preprocessing import pose as pose_mod
from preprocessing.audio import log_mel
from preprocessing.decode import DecodeError
from vasa.core.config import AudioFeatureConfig, DiffusionConfig, FaceConfig, GenerateConfig
from vasa.core.errors import InputError
from vasa.core.files import check_output, unique_temp
from vasa.diffusion import Emitted, NoiseSchedule, WindowStream
from vasa.inference.bundle import Bundle
from vasa.inference.encoder import Stage1Encoder
from vasa.inference.portrait import IMAGE_SUFFIXES, Paster, Portrait, pose_columns, prepare_portrait
from vasa.inference.postprocess import Track, write_video
from vasa.inference.speech import ArrayTrack, AudioFeatures, audio_track, load_speech
from vasa.models.face_latent import Canonical
from vasa.models.images import to_tensor, to_uint8
from vasa.models.motion_dit import EMOTION_COLUMNS
from vasa.models.motion_encoder import POSE_DIM, shard_pose_to_model

log = logging.getLogger(__name__)


# --- what a run may ask for: the ranges of the conditions and sampling settings ------------------------

# Hard bounds: past them a value means nothing (or cannot be represented). The guidance scales' upper bound
# is a policy and lives in params (generate.max_guidance); the steps' is the bundle's number of noise levels.
GAZE_RANGE_DEG = (-90.0, 90.0)  # theta, phi: preprocessing.pose.gaze is an arcsin, so never beyond +-90
DISTANCE_RANGE = (0.0, 7.0)  # log(crop side / eye-corner span in crop pixels): 0 = the eye corners span the
# whole crop, 7 = the span is 1/1100 of it (under a pixel at the 512 crop); box crops measure ~1.2-1.3
EMOTION_RANGE = (-1.0, 1.0)  # smile, brow_raise in template units (outer eye-corner span = 1): a mouth corner
# or a brow one eye span from its rest is no longer a face
SEED_RANGE = (0, 2**63 - 1)  # torch.Generator takes 64-bit seeds; each window adds its first frame's index
VECTOR_LENGTHS = {"gaze": 2, "emotion": len(EMOTION_COLUMNS)}  # values per vector condition


def condition_ranges(cfg: GenerateConfig, train_steps: int | None = None) -> dict[str, tuple[float, float]]:
    """[low, high] of every condition and setting a run may set (`Conditions`' fields and `generate_file`'s
    overrides); steps' upper bound is the bundle's `train_steps` (DDIM picks that many of its noise levels),
    unbounded before the bundle is known."""
    return {
        "gaze": GAZE_RANGE_DEG,
        "distance": DISTANCE_RANGE,
        "emotion": EMOTION_RANGE,
        "cfg_audio": (0.0, cfg.max_guidance),
        "cfg_gaze": (0.0, cfg.max_guidance),
        "steps": (1, math.inf if train_steps is None else train_steps),
        "seed": SEED_RANGE,
    }


def check_conditions(
    values: dict,
    cfg: GenerateConfig,
    *,
    train_steps: int | None = None,
    emotion_dim: int | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """InputError naming the first value of `values` (condition -> number, vector or None = not set) that is
    not finite, outside `condition_ranges` or a vector of the wrong length (`emotion_dim`: the bundle's).
    `names` maps a condition to how the caller calls it (a CLI option); unknown keys are left alone."""
    ranges = condition_ranges(cfg, train_steps)
    lengths = VECTOR_LENGTHS | ({} if emotion_dim is None else {"emotion": emotion_dim})
    for key, value in values.items():
        if value is None or key not in ranges:
            continue
        name, (low, high) = (names or {}).get(key, key), ranges[key]
        numbers = np.asarray(value, dtype=np.float64).reshape(-1)
        if key in lengths and len(numbers) != lengths[key]:
            labels = ",".join(EMOTION_COLUMNS) if key == "emotion" else "THETA,PHI"
            raise InputError(f"{name} takes {lengths[key]} values ({labels}), got {len(numbers)}")
        exact = [value] if isinstance(value, int) else numbers  # ints compared exactly: seeds reach 2**63
        if not np.isfinite(numbers).all() or any(v < low or v > high for v in exact):
            shown = value if np.ndim(value) == 0 else ",".join(f"{v:g}" for v in numbers)
            raise InputError(f"{name} must be finite and within [{_number(low)}, {_number(high)}], got {shown}")
        if key in ("steps", "seed") and not float(numbers[0]).is_integer():
            raise InputError(f"{name} must be a whole number, got {value}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_request(out: Path, inputs: dict[str, Path | None], overrides: dict, cfg: GenerateConfig,
                  names: dict[str, str] | None = None, what: str = "--out") -> None:  # fmt: skip
    """Everything about a run that can be checked before the bundle is loaded: the output (`check_output`:
    not an input, not a folder, writable; an .mp4), every input file present, the overrides in range."""
    if Path(out).suffix.lower() != ".mp4":
        raise InputError(f"{what} {out}: the output must be an .mp4 file")
    check_output(Path(out), inputs, what)
    for label, path in inputs.items():
        if path is not None and not Path(path).is_file():
            raise InputError(f"{label} {path}: not found")
    check_conditions(overrides, cfg, names=names)


# --- the generator -----------------------------------------------------------------------------------


class NonFiniteError(InputError):
    """The bundle produced NaN or infinite motion or pixels: nothing is encoded or signed from them."""


@dataclass
class Conditions:
    """Per-clip conditions of the motion DiT (VASA-1 §3.2) and guidance/sampling settings."""

    gaze: np.ndarray  # (2,) degrees
    distance: float
    emotion: np.ndarray  # (E,)
    cfg_audio: float
    cfg_gaze: float
    steps: int
    seed: int
    smooth_pose: float = 0.0  # Gaussian sigma in frames on the generated head pose (0 = raw); see smooth_motion
    smooth_dynamics: float = 0.0  # ... on the facial dynamics


@dataclass
class Session:
    """A portrait ready to animate: the canonical face is computed once."""

    bundle: Bundle
    portrait: Portrait
    canonical: Canonical
    z_id: torch.Tensor  # (1, I)
    own_motion: torch.Tensor  # (1, 7 + Z) the portrait's own pose and dynamics (model units)
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def open_session(bundle: Bundle, portrait: Portrait) -> Session:
    start = time.perf_counter()
    image = to_tensor(portrait.crop)[None].to(bundle.device)
    # The portrait's own measured expression and head pose, as in training (a model that renders them).
    pose = None
    if portrait.pose is not None:
        crop_size = bundle.meta["crop"]["crop_size"]
        pose = shard_pose_to_model(torch.from_numpy(portrait.pose)[None], crop_size, bundle.face.preset.canonical_scale)
    code = bundle.face.measured(bundle.face.encode(image), torch.from_numpy(portrait.expression)[None], pose)
    canonical = bundle.face.canonical(code, image)
    if portrait.crop_full.shape[0] > portrait.crop.shape[0]:  # render at the crop side: the portrait's own pixels
        hires = to_tensor(portrait.crop_full)[None].to(bundle.device)
        canonical = replace(canonical, hires=hires)
    synchronize(bundle.device)
    session = Session(bundle, portrait, canonical, code.z_id, torch.cat([code.pose, code.dyn], dim=1))
    session.timings["encode_s"] = time.perf_counter() - start
    # librosa compiles its STFT helpers (numba) on first use: seconds that must not land on the first window.
    audio = bundle.meta["audio"]
    log_mel(np.zeros(audio["sample_rate"] // 5, np.float32), audio["sample_rate"], bundle.meta["fps"],
            AudioFeatureConfig(**audio["features"]))  # fmt: skip
    session.timings["warmup_s"] = time.perf_counter() - start - session.timings["encode_s"]
    return session


def at_rest_of(session: Session, units: torch.Tensor, stats: dict) -> torch.Tensor:
    """Generated motion (T, 7 + Z) whose expression dims and head pose are relative to a face at rest (the
    bundle's normalisation says which: `expression_rest`, `pose_rest`; vasa/models/motion_encoder.py
    REST_PERCENTILES, POSE_REST_PERCENTILE) -> absolute, at rest = the portrait's own measured expression and
    head pose. Dims no convention names are returned as generated."""
    dims = [d for key in ("expression_rest", "pose_rest") if stats.get(key) for d in stats[key]["motion_dims"]]
    if not dims:
        return units
    units = units.clone()
    units[:, dims] += session.own_motion[0, dims].to(units.dtype).cpu()
    return units


def smooth_motion(
    units: torch.Tensor, previous: torch.Tensor | None, sigma_pose: float, sigma_dyn: float
) -> torch.Tensor:
    """One window's motion (n, 7 + Z) low-passed in time by a Gaussian (sigma in frames) per factor: z_pose's
    columns with `sigma_pose`, z_dyn's with `sigma_dyn` (0 leaves a factor raw).

    Zero-phase within the window (the whole window is sampled before any of its frames is drawn, so this
    adds no latency and no lag against the speech), continued across window borders by the previous
    window's sampled motion (`previous`, unsmoothed, or None) on the left; the window's right edge repeats its
    last frame. Against the frame-to-frame sign flips of a briefly trained DiT's pose: a 1-frame sigma
    keeps 88 % of a 2 Hz nod and 0.7 % of a 12.5 Hz (every-other-frame) flicker. MediaPipe and LivePortrait
    likewise low-pass their tracked or driving motion."""
    if sigma_pose <= 0 and sigma_dyn <= 0:
        return units
    from scipy.ndimage import gaussian_filter1d  # type: ignore[import-untyped]

    halo = 0 if previous is None else min(len(previous), math.ceil(4 * max(sigma_pose, sigma_dyn)))
    joined = units if previous is None or not halo else torch.cat([previous[len(previous) - halo :], units])
    values = joined.double().numpy()
    out = values.copy()
    for columns, sigma in ((slice(0, POSE_DIM), sigma_pose), (slice(POSE_DIM, None), sigma_dyn)):
        if sigma > 0:
            out[:, columns] = gaussian_filter1d(values[:, columns], sigma, axis=0, mode="nearest", truncate=4.0)
    return torch.from_numpy(out[halo:]).to(units.dtype)


def autocast(device: torch.device):
    """bf16 autocast on a GPU that supports it (fp16 otherwise), plain fp32 on CPU."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def denormalise(motion: torch.Tensor, stats: dict) -> torch.Tensor:
    """Normalised DiT motion (..., M) -> model units (z_pose, z_dyn), as extract_motion encoded them."""
    mean = motion.new_tensor(stats["motion"]["mean"])
    std = motion.new_tensor(stats["motion"]["std"])
    return motion * std + mean


@torch.no_grad()
def render(session: Session, motion: torch.Tensor, batch: int) -> np.ndarray:
    """(T, 7 + Z) model-unit motion -> (T, R, R, 3) uint8 crops at the portrait crop's side R (the model's S
    when the decoder has no source path)."""
    face, out = session.bundle.face, []
    for start in range(0, len(motion), batch):
        part = motion[start : start + batch].to(session.bundle.device)
        n = len(part)
        canon = Canonical(
            volume=session.canonical.volume.expand(n, -1, -1, -1, -1),
            source_grid=session.canonical.source_grid.expand(n, -1, -1, -1, -1),
            image=session.canonical.image.expand(n, -1, -1, -1),
            hires=None if session.canonical.hires is None else session.canonical.hires.expand(n, -1, -1, -1),
            dyn=None if session.canonical.dyn is None else session.canonical.dyn.expand(n, -1),
        )
        with autocast(session.bundle.device):
            images = face.render(canon, session.z_id.expand(n, -1), part[:, :POSE_DIM], part[:, POSE_DIM:])
        if not torch.isfinite(images).all():  # to_uint8 would turn NaN into plausible-looking pixels
            raise NonFiniteError("the renderer drew non-finite pixels (a broken bundle?): no video written")
        out.append(to_uint8(images))
    return np.concatenate(out)


def stream(
    session: Session,
    audio_chunks: Iterable[np.ndarray],
    conditions: Conditions,
    *,
    crop_only: bool = False,
    render_batch: int = 25,
    feather: float = 0.12,
    hop: int | None = None,
    lookahead: int = 0,
    overlap: int = 0,
    driving: torch.Tensor | None = None,
    pose_from: torch.Tensor | None = None,
    dynamics_from: torch.Tensor | None = None,
) -> Iterator[np.ndarray]:
    """Audio chunks ((n,) float32 at the bundle's sample rate) in, frame chunks ((F, H, W, 3) uint8) out.

    Offline (`hop` None, `vasa generate`): a window of W frames is generated as soon as its audio (plus the
    STFT's look-ahead, `AudioFeatures.lookahead`) has arrived and drawn `render_batch` frames at a time, so
    the first frames come after W / fps seconds of audio plus one window's compute. Low latency (`hop` < W,
    `vasa serve`; params generate.stream_hop / stream_lookahead): a window is sampled every `hop` frames as
    soon as those frames and `lookahead` more have been heard (vasa.diffusion.WindowStream), and its `hop`
    frames are drawn and yielded one at a time: the first frame after (hop + lookahead) / fps s of audio plus
    the STFT's look-ahead and one window's compute, at W / hop times the DiT's offline cost per frame.
    `driving` (T, 7 + Z) replaces the DiT's motion (reenactment); `pose_from` / `dynamics_from` replace one
    factor only. Exactly one frame per whole 1/fps of audio.
    """
    bundle, meta = session.bundle, session.bundle.meta
    dit, stats, device = bundle.dit, meta["normalisation"], bundle.device
    features = AudioFeatures(meta["audio"]["sample_rate"], meta["fps"], AudioFeatureConfig(**meta["audio"]["features"]),
                             stats["audio"])  # fmt: skip
    sampling = meta["sampling"]
    schedule = NoiseSchedule(
        DiffusionConfig(train_steps=sampling["train_steps"], schedule=sampling["schedule"],
                        sampling_steps=conditions.steps, eta=sampling["eta"])
    )  # fmt: skip
    hop = dit.window if hop is None else min(hop, dit.window)  # whole windows: hop = W
    low_latency = hop < dit.window
    windows = WindowStream(
        dit, schedule, torch.as_tensor(conditions.gaze, dtype=torch.float32)[None],
        torch.tensor([[conditions.distance]], dtype=torch.float32),
        torch.as_tensor(conditions.emotion, dtype=torch.float32)[None], steps=conditions.steps,
        eta=float(sampling["eta"]), scales={"audio": conditions.cfg_audio, "gaze": conditions.cfg_gaze},
        seed=conditions.seed, hop=hop, lookahead=lookahead if low_latency else 0,
        overlap=overlap if low_latency else 0,
    )  # fmt: skip
    batch = 1 if low_latency else render_batch  # low latency: each frame out as soon as it is drawn
    paster = None if crop_only else Paster(session.portrait, feather)
    previous: torch.Tensor | None = None  # the raw motion (model units) emitted last: smooth_motion's halo

    def frames_of(emitted: Emitted) -> Iterator[np.ndarray]:
        """One sampled window's emitted frames, `batch` at a time."""
        nonlocal previous
        raw = at_rest_of(session, denormalise(emitted.motion[0].float().cpu(), stats), stats)
        # Smoothed with the window's own continuation on the right (already sampled: no added latency).
        units = smooth_motion(raw, previous, conditions.smooth_pose, conditions.smooth_dynamics)[: emitted.count]
        shown = raw[: emitted.count]
        previous = shown if previous is None else torch.cat([previous, shown])[-dit.window :]
        units = _override(units, emitted.start, driving, pose_from, dynamics_from)
        if not torch.isfinite(units).all():
            raise NonFiniteError(
                f"non-finite motion generated at frame {emitted.start} (a broken bundle?): no video written"
            )
        for start in range(0, emitted.count, batch):  # yield as soon as a batch is drawn, not after the window
            crops = render(session, units[start : start + batch], batch)
            yield crops if paster is None else paster(crops)  # paster is None exactly when crop_only

    def sampled(windows_out: Iterator[Emitted]) -> Iterator[Emitted]:
        """The windows, each sampled under autocast (entered per window: never while the caller runs)."""
        while True:
            with autocast(device):
                emitted = next(windows_out, None)
            if emitted is None:
                return
            yield emitted

    for chunk in audio_chunks:
        for emitted in sampled(windows.push(torch.from_numpy(features.push(chunk))[None])):
            yield from frames_of(emitted)
    for emitted in sampled(windows.push(torch.from_numpy(features.finish())[None])):
        yield from frames_of(emitted)
    for emitted in sampled(windows.finish()):
        yield from frames_of(emitted)


def _override(
    units: torch.Tensor,
    start: int,
    driving: torch.Tensor | None,
    pose_from: torch.Tensor | None,
    dynamics_from: torch.Tensor | None,
) -> torch.Tensor:
    """Reenactment: frames [start, start + len(units)) of the driving motion replace the generated ones
    (the last driving frame is held when the audio is longer)."""

    def take(source: torch.Tensor) -> torch.Tensor:
        index = torch.arange(start, start + len(units)).clamp(max=len(source) - 1)
        return source[index]

    if driving is not None:
        return take(driving)
    units = units.clone()
    if pose_from is not None:
        units[:, :POSE_DIM] = take(pose_from)[:, :POSE_DIM]
    if dynamics_from is not None:
        units[:, POSE_DIM:] = take(dynamics_from)[:, POSE_DIM:]
    return units


@torch.no_grad()
def encode_video(bundle: Bundle, path: Path, face_cfg: FaceConfig, crop_size: int) -> torch.Tensor:
    """(T, 7 + Z) motion-encoder output for a driving video: its face box-cropped as the shards crop it."""
    from preprocessing.decode import read_frames

    try:
        frames, rate = read_frames(path)  # video only: a driving video needs no audio
    except DecodeError as err:
        raise InputError(f"{path}: unreadable driving video ({err})") from None
    fps = bundle.meta["fps"]
    if rate > 0 and abs(rate - fps) > 0.01:  # resample in time to the bundle's frame rate (nearest frame)
        count = max(1, int(len(frames) * fps / rate))
        frames = frames[np.minimum((np.arange(count) * rate / fps).astype(np.int64), len(frames) - 1)]
    track = face_mod.get_tracker(face_cfg).track(frames)
    if not np.isfinite(track.landmarks[:, :, 0]).any():
        raise InputError(f"{path}: no face in the driving video")
    transform = face_mod.box_transform(
        track.landmarks, crop_size, face_cfg.crop_scale, (frames.shape[1], frames.shape[2])
    )
    crops = face_mod.apply_crops(frames, np.repeat(transform[None], len(frames), 0), crop_size)
    side = bundle.resolution
    small = np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in crops])
    expression = pose_mod.expression(track.landmarks, pose_mod.head_pose(track.landmarks))  # template units
    in_crop = face_mod.transform_points(track.landmarks, np.repeat(transform[None], len(frames), 0))  # crop pixels
    pose = pose_columns(pose_mod.head_pose(in_crop))
    preset = bundle.face.preset
    encoder = Stage1Encoder(
        bundle.face.motion,
        side,
        bundle.sha256,
        bundle.device,
        measured_expression=preset.expression_side > 0,
        measured_pose=preset.measured_pose,
        canonical_scale=preset.canonical_scale,
    )  # extract_motion's encoder
    return torch.from_numpy(encoder.encode(small, 64, expression=expression, pose=pose, crop_size=crop_size))


def chunks(audio: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


def conditions_for(portrait: Portrait, bundle: Bundle, cfg: GenerateConfig, **overrides) -> Conditions:
    """The portrait's own gaze, distance and emotion unless overridden; the bundle's guidance defaults."""
    sampling = bundle.meta["sampling"]
    values = {
        "gaze": portrait.gaze,
        "distance": portrait.distance,
        "emotion": portrait.emotion,
        "cfg_audio": sampling["cfg_audio"],
        "cfg_gaze": sampling["cfg_gaze"],
        "steps": cfg.steps or sampling["steps"],
        "seed": cfg.seed,
        "smooth_pose": cfg.smooth_pose,
        "smooth_dynamics": cfg.smooth_dynamics,
    }
    values |= {k: v for k, v in overrides.items() if v is not None}
    values["gaze"] = np.asarray(values["gaze"], np.float32)
    values["emotion"] = np.asarray(values["emotion"], np.float32)
    return Conditions(**values)


def write_labelled(
    out: Path,
    frames: Iterable[np.ndarray],
    audio: np.ndarray | Track,
    sample_rate: int,
    fps: int,
    cfg: GenerateConfig,
    bundle_sha256: str,
    key_password: str | None = None,
    *,
    paster: Paster | None = None,
    device_type: str = "cpu",
    threaded: bool = True,
) -> tuple[int, bool]:
    """Frame chunks holding generated faces + audio -> `out`, labelled as AI-generated (vasa/labelling/labels.py):
    container tags, the watermark in every frame, a C2PA manifest (params generate.c2pa). `audio`: a `Track`
    (the user's file at its own rate and channels) or samples ((N,) mono or (N, 2) stereo at `sample_rate`);
    `paster`: frames are crops, pasted back in the pipeline (vasa/inference/postprocess.py, `threaded` or in
    the calling thread; the same bytes either way). Written under a unique temporary name beside `out`
    (concurrent runs never collide) and renamed into place only when complete and signed. Returns (frames
    written, signed)."""
    from vasa.labelling import labels
    from vasa.labelling.watermark import Watermarker

    tags = labels.container_tags(bundle_sha256, package_version())
    marker = Watermarker(bytes.fromhex(bundle_sha256)[:8])
    track = ArrayTrack(audio, sample_rate) if isinstance(audio, np.ndarray) else audio
    out.parent.mkdir(parents=True, exist_ok=True)
    unsigned = unique_temp(out, ".unsigned.mp4")
    try:
        count = write_video(unsigned, frames, track, fps, cfg, tags, watermark=marker, paster=paster,
                            device_type=device_type, threaded=threaded)  # fmt: skip
        signed = _sign(unsigned, out, cfg, bundle_sha256, key_password)
    finally:
        unsigned.unlink(missing_ok=True)
    return count, signed


DEVICE_MISSING = {
    "cuda": "generate.device is cuda but no GPU is available",
    "mps": "generate.device is mps but MPS is not available (Apple Silicon and a torch built with MPS)",
}


def limit_threads(threads: int):
    """Generation's thread count (params generate.threads), for an entry point to set once: torch intra-op, OpenCV,
    and every BLAS / OpenMP pool the process has loaded (threadpoolctl: numpy's and scipy's OpenBLAS). OpenBLAS
    otherwise keeps a worker per core that busy-waits after each call (the watermark's small matrix products): on
    the 2-core VM 2 CPU-ms per frame of the post-processing at 512², a third of it, went to that spinning
    (docs/BENCHMARKS.md). Returns threadpoolctl's limiter (`restore_original_limits()` undoes the BLAS part)."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threadpool_limits(limits=threads)


def resolve_device(device: str, available: dict[str, bool] | None = None) -> torch.device:
    """`auto`: cuda if there is a GPU, else mps (Apple Silicon), else cpu; a named device that is not there
    is refused. `available` says which of cuda and mps this machine has (default: torch's answer).

    On mps, operators without an MPS kernel run on the CPU when PYTORCH_ENABLE_MPS_FALLBACK=1, which torch
    reads once at import: `vasa` sets it before importing torch (vasa/cli.py); a library caller sets it
    itself. Generation runs in float32 there (autocast is CUDA-only here)."""
    if available is None:
        available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return torch.device(next((name for name in ("cuda", "mps") if available.get(name)), "cpu"))
    if device in DEVICE_MISSING and not available.get(device):
        raise InputError(DEVICE_MISSING[device])
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings): CUDA and MPS run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# --- one call: files in, a labelled mp4 out ------------------------------------------------------------


def package_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("vasa-pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class Result:
    path: Path
    frames: int
    seconds: float  # audio duration
    bundle_sha256: str
    signed: bool
    timings: dict[str, float]


def generate_file(
    bundle: Bundle,
    image: Path,
    audio_path: Path,
    out: Path,
    params_generate: GenerateConfig,
    face_cfg: FaceConfig,
    *,
    crop_only: bool = False,
    driving_video: Path | None = None,
    pose_from: Path | None = None,
    dynamics_from: Path | None = None,
    key_password: str | None = None,
    names: dict[str, str] | None = None,
    **overrides,
) -> Result:
    """portrait + speech -> `out` (mp4, H.264 + AAC), labelled: container tags, watermark, C2PA manifest.

    `key_password`: the passphrase of an encrypted C2PA signing key (the CLI reads it from the
    environment). `overrides`: gaze, distance, emotion, cfg_audio, cfg_gaze, steps, seed (None = default),
    checked against `condition_ranges`; `names`: what to call them in messages (the CLI's options).
    Nothing is left at `out` (or beside it) when anything fails; every check that needs no work comes first.
    """
    cfg = params_generate
    inputs = {"portrait": image, "audio": audio_path, "driving video": driving_video, "pose video": pose_from,
              "dynamics video": dynamics_from}  # fmt: skip
    check_request(out, inputs, overrides, cfg, names=names, what="output")
    if Path(image).suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{image}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    meta = bundle.meta
    rate, fps, crop_size = meta["audio"]["sample_rate"], meta["fps"], meta["crop"]["crop_size"]
    limits = {"train_steps": meta["sampling"]["train_steps"], "emotion_dim": bundle.dit.emotion_dim}
    check_conditions(overrides, cfg, **limits, names=names)
    start = time.perf_counter()
    portrait = prepare_portrait(Path(image), bundle.resolution, crop_size, face_cfg, cfg.max_side)
    speech = load_speech(Path(audio_path), rate, fps, cfg)
    conditions = conditions_for(portrait, bundle, cfg, **overrides)
    defaults = {key: f"{key} (the portrait's, the bundle's or params' default)" for key in vars(conditions)}
    check_conditions(vars(conditions), cfg, **limits, names=defaults)
    motion_sources = {}
    for name, path in (("driving", driving_video), ("pose_from", pose_from), ("dynamics_from", dynamics_from)):
        if path is not None:
            motion_sources[name] = encode_video(bundle, Path(path), face_cfg, crop_size)
    track = audio_track(Path(audio_path))  # the user's audio as the video carries it (its rate and channels)
    paster = None if crop_only else Paster(portrait, cfg.feather)
    session = open_session(bundle, portrait)
    # Crops: pasted back in write_labelled's pipeline, beside the renderer. Whole windows (hop None): a file
    # has no one waiting for its first frame.
    crops = stream(session, chunks(speech, rate), conditions, crop_only=True, render_batch=cfg.render_batch,
                   feather=cfg.feather, hop=None, lookahead=0, overlap=0, **motion_sources)  # fmt: skip
    count, signed = write_labelled(out, crops, track, rate, fps, cfg, bundle.sha256, key_password, paster=paster,
                                   device_type=bundle.device.type)  # fmt: skip
    seconds = len(speech) / rate
    timings = {"total_s": time.perf_counter() - start, **session.timings}
    log.info("%s: %d frames (%.2f s of audio), bundle %s, C2PA %s", out, count, seconds, bundle.sha256[:12],
             "signed" if signed else "off")  # fmt: skip
    return Result(out, count, seconds, bundle.sha256, signed, timings)


def _sign(unsigned: Path, out: Path, cfg: GenerateConfig, bundle_sha256: str, key_password: str | None) -> bool:
    """C2PA-sign `unsigned` into `out` (or move it there unsigned when signing is off). True if signed."""
    import tempfile

    from vasa.labelling import labels

    if cfg.c2pa.chain and cfg.c2pa.key:
        labels.sign_c2pa(
            unsigned,
            out,
            Path(cfg.c2pa.chain),
            Path(cfg.c2pa.key),
            bundle_sha256,
            package_version(),
            key_password=key_password,
        )
        return True
    if cfg.c2pa.dev_certificate:
        # A throwaway, untrusted certificate that lives only for this call: the manifest still says
        # "AI-generated" and detects tampering; only a C2PA-trusted CA makes it trusted.
        with tempfile.TemporaryDirectory(prefix="vasa-dev-cert-") as folder:
            chain, key = labels.make_dev_certificate(Path(folder))
            labels.sign_c2pa(unsigned, out, chain, key, bundle_sha256, package_version())
        return True
    log.warning("generate.c2pa: no certificate and dev_certificate off: %s has no C2PA manifest", out)
    unsigned.replace(out)
    return False
