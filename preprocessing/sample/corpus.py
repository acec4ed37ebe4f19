"""The embedded sample corpus: synthetic talking clips that need no download.

For each configured identity: a public-domain portrait bundled in an installed package, speech
from espeak-ng reading IEEE Harvard sentences, the face animated by `animate` (jaw follows the
speech loudness, blinks, 3D head motion), written as H.264 + AAC mp4 with a provenance record.

Layout of the output folder:
    <clip_id>.mp4         25 fps video, 16 kHz mono AAC
    <clip_id>.json        provenance: portrait asset, speech engine and text, generator params, sha256
    <clip_id>.truth.json  the per-frame motion that drove the animation (ground truth for tests)
    index.json            the corpus: generator params and one entry per clip, sorted by clip id
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import soxr

from preprocessing.media import AAC_FRAME, write_mp4
from preprocessing.pose import matrix_to_euler
from preprocessing.sample import tts
from preprocessing.sample.animate import FaceRig, MotionTrack, motion_track, speech_envelope
from preprocessing.sample.portraits import prepare_portrait
from preprocessing.schema import SCHEMA_VERSION
from vasa.core import digests
from vasa.core.config import IdentityConfig, SampleConfig
from vasa.core.files import write_json

log = logging.getLogger(__name__)

# IEEE Recommended Practice for Speech Quality Measurements (1969), Harvard lists 1-2: public domain.
HARVARD_SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
)
SILENCE_AROUND_SPEECH_S = 0.25
FADE_S = 0.03
MAX_SENTENCES = 3
INDEX_NAME = "index.json"
# Packages whose version changes a clip's bytes; part of `plan_key`.
VERSIONED_PACKAGES = ("av", "espeakng-loader", "numpy", "opencv-contrib-python", "soxr", "vasa-pipeline")
# The code that shapes a clip's bytes is the import closure of this module (the truth's rest pose comes
# from preprocessing.pose) plus the face template; part of `plan_key`, so a re-run never keeps clips
# made by other code.
CODE_MODULES = ("preprocessing.sample.corpus",)
# Params that say how many clips there are or where they are made, not how one clip looks.
NOT_IN_CLIP_KEY = {"identities", "workers", "clips_per_identity", "heldout_clips_per_identity"}
CODE_ASSETS = ("preprocessing/assets/face_template.npz",)


@dataclass(frozen=True)
class ClipPlan:
    clip_id: str
    identity: IdentityConfig
    seed: tuple[int, ...]  # SeedSequence entropy: (config seed, crc32(identity name), clip number)
    sentences: tuple[str, ...]  # spoken in this order, as many as fit the target length
    target_seconds: float
    heldout: bool = False  # held-out speech: sentences no training clip of this identity has; split `test`


def plan_corpus(cfg: SampleConfig) -> list[ClipPlan]:
    """Which clips to make: ids, seeds, sentences and target lengths, all derived from cfg. Per identity,
    `clips_per_identity` training clips, then `heldout_clips_per_identity` held-out clips whose sentences
    none of that identity's training clips plans (unseen speech of a known face: the evaluation clips)."""
    plans = []
    for identity in cfg.identities:
        used: set[int] = set()
        for number in range(cfg.clips_per_identity + cfg.heldout_clips_per_identity):
            heldout = number >= cfg.clips_per_identity
            seed = (cfg.seed, zlib.crc32(identity.name.encode()), number)
            rng = np.random.default_rng(seed)
            target = float(rng.uniform(cfg.min_seconds, cfg.max_seconds))
            order = [int(i) for i in rng.permutation(len(HARVARD_SENTENCES)) if not (heldout and int(i) in used)]
            if len(order) < MAX_SENTENCES:
                raise ValueError(f"sample: too few sentences left for a held-out clip of {identity.name}")
            used.update(order[:MAX_SENTENCES] if not heldout else ())
            sentences = tuple(HARVARD_SENTENCES[i] for i in order[:MAX_SENTENCES])
            plans.append(ClipPlan(f"{identity.name}_{number:03d}", identity, seed, sentences, target, heldout))
    return plans


def make_speech(plan: ClipPlan, cfg: SampleConfig) -> tuple[np.ndarray, str]:
    """Speech for one clip: ((N,) float32 at cfg.sample_rate, the text spoken).

    Speaks the first 1, 2, ... of the planned sentences until the speech plus its surrounding
    silence reaches the target length; N is a whole number of video frames and of AAC frames
    within [min_seconds, max_seconds] (padded with silence, or trimmed with a short fade).
    """
    voice = tts.Voice(plan.identity.voice, plan.identity.rate_wpm, plan.identity.pitch, pitch_range=60)
    silence = np.zeros(int(SILENCE_AROUND_SPEECH_S * cfg.sample_rate), np.float32)
    for count in range(1, len(plan.sentences) + 1):
        text = " ".join(plan.sentences[:count])
        raw, raw_rate = tts.synthesize(text, voice)
        speech = soxr.resample(raw, raw_rate, cfg.sample_rate).astype(np.float32)
        audio = np.concatenate([silence, speech, silence])
        if len(audio) >= plan.target_seconds * cfg.sample_rate:
            break
    hop = cfg.sample_rate // cfg.fps
    # Whole AAC frames as well as whole video frames: decoders pad the last AAC frame with
    # silence, which would otherwise make the audio up to 64 ms longer than the video.
    step = math.lcm(hop, AAC_FRAME) // hop  # video frames per unit (8 at 25 fps / 16 kHz)
    low, high = math.ceil(cfg.min_seconds * cfg.fps / step), math.floor(cfg.max_seconds * cfg.fps / step)
    if low > high:
        raise ValueError(f"no length in [{cfg.min_seconds}, {cfg.max_seconds}] s is a multiple of {step} frames")
    n_frames = step * int(np.clip(round(len(audio) / hop / step), low, high))
    audio = np.pad(audio, (0, max(0, n_frames * hop - len(audio))))[: n_frames * hop]
    fade = int(FADE_S * cfg.sample_rate)
    audio[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return audio, text


def plan_key(plan: ClipPlan, cfg: SampleConfig) -> str:
    """Digest of everything that determines a clip's bytes: its plan, the generator params, the
    versions of the packages and the content of the code files that shape them."""
    payload = {
        "plan": {
            "clip_id": plan.clip_id,
            "identity": plan.identity.model_dump(),
            "seed": list(plan.seed),
            "sentences": plan.sentences,
            "heldout": plan.heldout,
            "target_seconds": plan.target_seconds,
        },
        "params": cfg.model_dump(
            mode="json", exclude={"identities", "workers", "clips_per_identity", "heldout_clips_per_identity"}
        ),
        "versions": {name: metadata.version(name) for name in VERSIONED_PACKAGES},
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def code_digest() -> str:
    """sha256 over the code that shapes a clip (CODE_MODULES' import closure, CODE_ASSETS)."""
    return digests.code_digest(CODE_MODULES, CODE_ASSETS)


def make_clip(plan: ClipPlan, cfg: SampleConfig, out_dir: Path) -> dict:
    """Synthesise, animate and write one clip; returns its provenance record."""
    audio, text = make_speech(plan, cfg)
    envelope = speech_envelope(audio, cfg.sample_rate, cfg.fps)
    rng = np.random.default_rng(plan.seed)
    track = motion_track(envelope, cfg.fps, cfg.motion, cfg.blinks_per_minute, rng)
    portrait = prepare_portrait(plan.identity.portrait, cfg.size)
    rig = FaceRig(portrait, cfg.mouth_max_open)
    frames = np.stack([rig.render(track, i) for i in range(len(envelope))])
    video_path = out_dir / f"{plan.clip_id}.mp4"
    write_mp4(video_path, frames, cfg.fps, audio, cfg.sample_rate, cfg.crf)
    data = video_path.read_bytes()
    record = {
        "clip_id": plan.clip_id,
        "file": video_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "speaker_id": plan.identity.name,
        "split": "test" if plan.heldout else "train",  # held-out speech is never trained on
        "licence": "public-domain",
        "licence_notes": "public-domain portrait; synthetic speech of public-domain text",
        "n_frames": len(frames),
        "fps": cfg.fps,
        "duration_s": len(frames) / cfg.fps,
        "width": cfg.size,
        "height": cfg.size,
        "sample_rate": cfg.sample_rate,
        "portrait": portrait.provenance,
        "speech": {
            "engine": "espeak-ng",
            "package": "espeakng-loader",
            "package_version": tts.engine_version(),
            "voice": plan.identity.voice,
            "rate_wpm": plan.identity.rate_wpm,
            "pitch": plan.identity.pitch,
            "text": text,
            "text_source": "IEEE Harvard sentences (1969), public domain",
        },
        "generator": {
            "package": "vasa-pipeline",
            "package_version": _own_version(),
            "seed": list(plan.seed),
            "plan_key": plan_key(plan, cfg),
            "target_seconds": round(plan.target_seconds, 4),
            "params": cfg.model_dump(
                mode="json", exclude={"identities", "workers", "clips_per_identity", "heldout_clips_per_identity"}
            ),
        },
    }
    write_json(out_dir / f"{plan.clip_id}.truth.json", truth_record(plan.clip_id, cfg.fps, track, rig))
    write_json(out_dir / f"{plan.clip_id}.json", record)
    return record


def truth_record(clip_id: str, fps: int, track: MotionTrack, rig: FaceRig) -> dict:
    """The motion that drove one clip, per frame, with its convention and units spelled out.

    `yaw`, `pitch`, `roll` are the rendered head's pose: the driving rotation composed with the
    portrait's own pose (`rest_pose`, measured once by preprocessing.pose on the portrait's stored
    FaceMesh), so they are what the project's estimator should report up to its constant per-face
    offset. `drive_*` are the driving rotation alone (about the camera axes, relative to the portrait).
    """
    yaw, pitch, roll = rig.head_pose(track)
    rest = matrix_to_euler(rig.rest_rotation)
    motion = track.as_dict()
    return {
        "clip_id": clip_id,
        "fps": fps,
        "convention": {
            "angles": "degrees; R = Rz(roll) @ Rx(pitch) @ Ry(yaw) about the camera axes (x right, y down, z away)",
            "yaw": "> 0: the subject turns to their right (nose toward image left)",
            "pitch": "> 0: the subject looks down",
            "roll": "> 0: the head tilts clockwise in the image",
            "schema": f"preprocessing/schema.py v{SCHEMA_VERSION}",
            "shift": "fraction of the frame side, x right, y down (camera pan)",
            "scale": "relative frame zoom about the head centre, 1 = portrait size",
            "mouth": "jaw opening in [0, 1]",
            "blink": "eyelid closure in [0, 1]",
        },
        "rest_pose": {name: round(float(value), 4) for name, value in zip(("yaw", "pitch", "roll"), rest, strict=True)},
        "yaw": np.round(yaw, 4).tolist(),
        "pitch": np.round(pitch, 4).tolist(),
        "roll": np.round(roll, 4).tolist(),
        "drive_yaw": motion["yaw"],
        "drive_pitch": motion["pitch"],
        "drive_roll": motion["roll"],
    } | {name: motion[name] for name in ("shift_x", "shift_y", "scale", "mouth", "blink")}


def write_corpus(cfg: SampleConfig, out_dir: str | Path) -> list[dict]:
    """Make every planned clip under `out_dir` and write index.json; returns the clip records.

    Clips whose record and mp4 are already there (sha256 matching) are kept, so a killed run
    resumes. Clips are made in `cfg.workers` spawned processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_corpus(cfg)
    records = {plan.clip_id: _existing_record(out_dir, plan, cfg) for plan in plans}
    todo = [plan for plan in plans if records[plan.clip_id] is None]
    log.info("sample corpus: %d clips planned, %d to make", len(plans), len(todo))
    if todo:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(cfg.workers, mp_context=context) as pool:
            futures = {plan.clip_id: pool.submit(make_clip, plan, cfg, out_dir) for plan in todo}
            for clip_id, future in futures.items():
                records[clip_id] = future.result()
                log.info("wrote %s (%.2f s)", clip_id, records[clip_id]["duration_s"])
    clips = [records[plan.clip_id] for plan in sorted(plans, key=lambda p: p.clip_id)]
    index = {
        "corpus": "vasa-pipeline embedded sample",
        "generator_version": _own_version(),
        "params": cfg.model_dump(mode="json"),
        "clips": [{k: clip[k] for k in ("clip_id", "file", "sha256", "speaker_id", "duration_s")} for clip in clips],
    }
    write_json(out_dir / INDEX_NAME, index)
    return clips


def _existing_record(out_dir: Path, plan: ClipPlan, cfg: SampleConfig) -> dict | None:
    try:
        record = json.loads((out_dir / f"{plan.clip_id}.json").read_text())
        data = (out_dir / record["file"]).read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return None
    return record if record["generator"].get("plan_key") == plan_key(plan, cfg) else None


def _own_version() -> str:
    return metadata.version("vasa-pipeline")
