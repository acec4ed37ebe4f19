"""The `evaluate` stage (`vasa evaluate`): VASA-1's figures (§4.1) on real, generated and audio-shifted video.

For every evaluation clip (vasa/loaders/judge_clips.py: test split, else val, else the last clip of each
speaker), from the shards:

    first crop frame + the clip's speech --bundle, vasa.inference.generate's stream (crop only)--> generated crops
    real crops, generated crops --FaceMesh + preprocessing.pose (one estimator for both)--> landmarks, pose
    landmarks --> mouth crops --sync expert--> S_C, S_D (SyncNet's offset search, ±evaluate.sync_offsets)
    pose + log-mel --CAPP--> cosine similarity per 3 s window;  pose --> ΔP (degrees per frame)

each with the true audio and with the audio rotated by `evaluate.shift_frames` (beyond the offset search:
the control must score worse). Identity similarity and FVD need feature networks given by local path
(`evaluate.identity_weights`, `evaluate.fvd_weights`, TorchScript); without them they are recorded as
"skipped: no weights", never estimated. SyncNet's own LSE-C/LSE-D are likewise skipped (no weights).
Beside them, judge-free figures of what a viewer sees (vasa.evaluation.independent: FaceMesh mouth opening
against the loudness, face sharpness against the portrait, yaw jitter), per video and in `independent`.

Writes OUT/metrics.json (DVC metrics; which clip set was used is part of it), OUT/plots/<figure>.csv (per
clip and condition, DVC plots), OUT/side_by_side.mp4 and OUT/side_by_side.png (real | generated, first clip).
The side-by-side video holds generated frames, so it is labelled as `vasa generate`'s videos are (container
tags, watermark, C2PA manifest: vasa.inference.generate.write_labelled).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile
import torch
from PIL import Image

from preprocessing import face as face_mod
from preprocessing.pose import head_pose
from vasa.core.config import EvaluateConfig, FaceConfig, GenerateConfig, Params
from vasa.core.errors import InputError
from vasa.core.weights import load_weights
from vasa.evaluation.capp import Capp, capp_scores, load_capp
from vasa.evaluation.metrics import delta_pose, offset_distances, shift_audio, sync_score
from vasa.evaluation.sync import SyncExpert, embed_clip, load_sync_expert
from vasa.loaders.judge_clips import JudgeClip, evaluation_set, load_clips, mouth_crops, normalise_mel
from vasa.loaders.shards import open_shards

log = logging.getLogger(__name__)

SKIPPED = "skipped: no weights"
CONDITIONS = ("real", "generated", "real_shifted", "generated_shifted")
STRIP_FRAMES = 8  # frames in the PNG strip
# Judge-free figures per video (vasa.evaluation.independent.measure_video): mouth opening vs loudness r,
# its std, face-region sharpness / the portrait's, lag-1 autocorrelation of the yaw change.
INDEPENDENT = ("mouth_r", "mouth_std", "sharpness_ratio", "yaw_lag1_autocorr")


@dataclass
class Judges:
    sync: SyncExpert
    capp: Capp
    stats: dict  # log-mel normalisation of the judges' training data
    digests: dict[str, str]  # weights sha256 per judge


def load_judges(folder: Path) -> Judges:
    """The two judges of a train-judges output folder (`sync/model`, `capp/model`; sha256-checked, no pickle)."""
    try:
        sync_weights, sync_meta = load_weights(folder / "sync" / "model")
        capp_weights, capp_meta = load_weights(folder / "capp" / "model")
    except (FileNotFoundError, OSError, KeyError, ValueError) as err:
        raise InputError(f"{folder}: no trained judges ({err}); run train-judges first") from None
    return Judges(
        sync=load_sync_expert(sync_weights, sync_meta["task"]),
        capp=load_capp(capp_weights, capp_meta["task"]),
        stats=sync_meta["normalisation"]["audio"],
        digests={"sync": sync_meta["weights"]["sync"]["sha256"], "capp": capp_meta["weights"]["capp"]["sha256"]},
    )


@dataclass
class Measured:
    """What the estimator finds in a video: mouth crops, head pose and the share of frames with one face."""

    mouths: np.ndarray  # (T, MOUTH_H, MOUTH_W) uint8
    angles: np.ndarray  # (T, 3) yaw, pitch, roll degrees (NaN where no single face)
    face_frames: float


def measure(frames: np.ndarray, face_cfg: FaceConfig) -> Measured:
    """FaceMesh + preprocessing.pose on (T, S, S, 3) uint8 crops, as preprocess measures the shards."""
    track = face_mod.get_tracker(face_cfg).track(frames)
    pose = head_pose(track.landmarks)
    return Measured(
        mouths=mouth_crops(frames, track.landmarks),
        angles=np.stack([pose.yaw, pose.pitch, pose.roll], axis=1),
        face_frames=float((track.faces == 1).mean()),
    )


def score(judges: Judges, seen: Measured, mel: np.ndarray, offsets: int, capp_stride: int) -> dict[str, float]:
    """S_C, S_D, the AV offset and mean CAPP of a measured video with (normalised) audio features."""
    n = min(len(seen.mouths), len(mel))
    v, a = embed_clip(judges.sync, seen.mouths[:n], mel[:n])
    sync = sync_score(offset_distances(v, a, offsets))
    capp = capp_scores(judges.capp, seen.angles[:n], mel[:n], capp_stride)
    return {
        "S_C": sync.confidence,
        "S_D": sync.distance,
        "av_offset": float(sync.offset),
        "CAPP": float(capp.mean()) if len(capp) else float("nan"),
    }


def generate_clip(bundle, clip: JudgeClip, params: Params, inputs: Path) -> np.ndarray:
    """The clip re-made by the bundle from its first frame and its speech: (T, S, S, 3) uint8 crops at the
    shards' crop size (rendered at the bundle's resolution, resized up), through vasa.inference.generate's stream."""
    from vasa.inference.generate import chunks, conditions_for, open_session, stream
    from vasa.inference.portrait import prepare_portrait

    meta = bundle.meta
    rate, crop_size = meta["audio"]["sample_rate"], meta["crop"]["crop_size"]
    portrait_path = inputs / f"{clip.key}.png"
    Image.fromarray(clip.frames[0]).save(portrait_path)
    speech, sr = soundfile.read(io.BytesIO(clip.wav), dtype="float32")
    if sr != rate:
        raise InputError(f"{clip.key}: wav at {sr} Hz, the bundle expects {rate} Hz")
    portrait = prepare_portrait(
        portrait_path, bundle.resolution, crop_size, params.preprocess.face, params.generate.max_side
    )
    session = open_session(bundle, portrait)
    conditions = conditions_for(portrait, bundle, params.generate, steps=params.evaluate.steps)
    crops = np.concatenate(
        list(
            stream(session, chunks(speech, rate), conditions, crop_only=True, render_batch=params.generate.render_batch)
        )
    )
    side = clip.frames.shape[1]
    return np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_CUBIC) for c in crops])


def side_by_side(
    out: Path,
    real: np.ndarray,
    generated: np.ndarray,
    wav: bytes,
    fps: int,
    bundle_sha256: str,
    cfg: GenerateConfig,
    key_password: str | None = None,
) -> None:
    """OUT/side_by_side.mp4 (real | generated, with the clip's speech), labelled as AI-generated with the
    bundle's hash like every generated video (params generate: quality, C2PA), and a PNG strip of STRIP_FRAMES
    frames (top real, bottom generated)."""
    from vasa.inference.generate import write_labelled

    n = min(len(real), len(generated))
    pairs = np.concatenate([real[:n], generated[:n]], axis=2)
    speech, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    write_labelled(out / "side_by_side.mp4", [pairs], speech, rate, fps, cfg, bundle_sha256, key_password)
    pick = np.linspace(0, n - 1, STRIP_FRAMES).round().astype(int)
    strip = np.concatenate([np.concatenate(list(real[pick]), axis=1), np.concatenate(list(generated[pick]), axis=1)])
    Image.fromarray(strip).save(out / "side_by_side.png")


def clip_rows(
    judges: Judges, clip: JudgeClip, generated: np.ndarray, params: Params, fps: float
) -> dict[str, dict[str, float]]:
    """The figures of one clip for every condition: real and generated video, each with the true and the
    shifted audio (ΔP and the share of frames with a face for the videos themselves), and for the videos
    the judge-free measures of vasa.evaluation.independent (against the clip's first frame, the portrait)."""
    from vasa.evaluation.independent import measure_video

    cfg = params.evaluate
    mel = normalise_mel(clip.mel, judges.stats)
    speech, rate = soundfile.read(io.BytesIO(clip.wav), dtype="float32")
    rows = {}
    for video, frames in (("real", clip.frames), ("generated", generated)):
        found = measure(frames, params.preprocess.face)
        rows[video] = score(judges, found, mel, cfg.sync_offsets, cfg.capp_stride)
        rows[video] |= {"delta_pose_deg": delta_pose(found.angles), "face_frames": found.face_frames}
        seen = measure_video(frames, speech, fps, clip.frames[0], params.preprocess.face, sample_rate=rate)
        rows[video] |= {key: float(seen[key]) for key in INDEPENDENT}
        rows[f"{video}_shifted"] = score(judges, found, shift_audio(mel, cfg.shift_frames), cfg.sync_offsets,
                                         cfg.capp_stride)  # fmt: skip
    log.info("evaluate %s: %s", clip.clip_id, {c: {k: round(v, 3) for k, v in r.items()} for c, r in rows.items()})
    return rows


def _mean(rows: list[dict[str, float]], key: str) -> float:
    values = np.array([r[key] for r in rows], np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def write_plots(folder: Path, per_clip: dict[str, dict[str, dict[str, float]]]) -> None:
    """One CSV per figure, a row per clip and condition (`item` = clip/condition): DVC bar plots."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = ("S_C", "S_D", "CAPP", "delta_pose_deg", *INDEPENDENT)
    for figure in figures:
        lines = ["item,value"]
        for clip, conditions in sorted(per_clip.items()):
            for condition in CONDITIONS:
                value = conditions.get(condition, {}).get(figure)
                if value is not None:
                    lines.append(f"{clip}/{condition},{value:.6f}")
        (folder / f"{figure}.csv").write_text("\n".join(lines) + "\n")


def run_evaluation(
    params: Params, shards: Path, bundle_dir: Path, judges_dir: Path, out: Path, key_password: str | None = None
) -> dict:
    """Evaluate the bundle in `bundle_dir` with the judges in `judges_dir` on the shards' evaluation clips;
    writes OUT (see the module docstring) and returns the metrics. `key_password`: an encrypted C2PA key's
    passphrase (params generate.c2pa) for the side-by-side video's manifest."""
    from vasa.inference.bundle import load_bundle
    from vasa.inference.generate import resolve_device

    cfg = params.evaluate
    if params.judges.cpu_threads:
        torch.set_num_threads(params.judges.cpu_threads)
    judges = load_judges(judges_dir)
    group, why, eval_shards, keys = evaluation_set(open_shards(shards))
    clips = load_clips(eval_shards, keys, exclude=set(), keep_media=True)
    bundle = load_bundle(bundle_dir, resolve_device(params.generate.device))
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    per_clip: dict[str, dict[str, dict[str, float]]] = {}
    videos: list[tuple[JudgeClip, np.ndarray]] = []
    failed: dict[str, str] = {}
    for clip in clips:
        try:
            generated = generate_clip(bundle, clip, params, inputs)
            per_clip[clip.clip_id] = clip_rows(judges, clip, generated, params, bundle.meta["fps"])
        except (InputError, ValueError) as err:  # e.g. no face FaceMesh can find in the generated frames
            log.warning("evaluate %s: left out: %s", clip.clip_id, err)
            failed[clip.clip_id] = str(err)[:200]
            continue
        if not videos:
            side_by_side(out, clip.frames, generated, clip.wav, bundle.meta["fps"], bundle.sha256, params.generate,
                         key_password)  # fmt: skip
        videos.append((clip, generated))
    if not per_clip:
        raise InputError(f"no evaluation clip could be scored: {failed}")
    report = summarise(per_clip, group, why, bundle.sha256, judges.digests, params)
    report |= feature_figures(cfg, videos) | {"failed": failed}
    write_plots(out / "plots", per_clip)
    (out / "metrics.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def summarise(per_clip: dict, group: str, why: str, bundle_sha256: str, digests: dict, params: Params) -> dict:
    """metrics.json: means over clips per condition, the margins of the true audio over the shifted control,
    the clip set, the settings and what was skipped."""
    report: dict = {
        "eval_set": {"name": group, "why": why, "clips": sorted(per_clip)},
        "bundle_sha256": bundle_sha256,
        "judges_sha256": digests,
        "settings": params.evaluate.model_dump(mode="json"),
        "clips": sorted(per_clip),
    }
    for condition in CONDITIONS:
        rows = [conditions[condition] for conditions in per_clip.values()]
        report[condition] = {key: _mean(rows, key) for key in rows[0]}
    report["margin"] = {
        video: {
            "S_C": report[video]["S_C"] - report[f"{video}_shifted"]["S_C"],
            "S_D": report[f"{video}_shifted"]["S_D"] - report[video]["S_D"],
            "CAPP": report[video]["CAPP"] - report[f"{video}_shifted"]["CAPP"],
        }
        for video in ("real", "generated")
    }
    real, generated = report["real"], report["generated"]
    report["independent"] = {  # what a viewer sees, measured without the judges (VASA-1 has no such figure)
        "mouth_r_generated": generated["mouth_r"],
        "mouth_r_real": real["mouth_r"],
        "mouth_std_ratio": generated["mouth_std"] / real["mouth_std"] if real["mouth_std"] > 0 else float("nan"),
        "sharpness_ratio_generated": generated["sharpness_ratio"],
        "yaw_lag1_autocorr_generated": generated["yaw_lag1_autocorr"],
        "yaw_lag1_autocorr_real": real["yaw_lag1_autocorr"],
    }
    report["LSE_C_LSE_D"] = SKIPPED
    return report


def feature_figures(cfg: EvaluateConfig, videos: list[tuple[JudgeClip, np.ndarray]]) -> dict:
    """Identity similarity (generated frames vs the portrait) and FVD₂₅ (real vs generated), each only with
    its feature network's weights (TorchScript by local path); otherwise recorded as skipped."""
    from vasa.evaluation.features import fvd, identity_similarity, load_feature_net

    found: dict = {"identity_similarity": SKIPPED, "FVD25": SKIPPED}
    if cfg.identity_weights is not None:
        net = load_feature_net(cfg.identity_weights)
        found["identity_similarity"] = {
            "real": float(np.mean([identity_similarity(net, c.frames[0], c.frames) for c, _ in videos])),
            "generated": float(np.mean([identity_similarity(net, c.frames[0], g) for c, g in videos])),
        }
    if cfg.fvd_weights is not None:
        net = load_feature_net(cfg.fvd_weights)
        found["FVD25"] = fvd(net, [c.frames for c, _ in videos], [g for _, g in videos])
    return found
