"""Per-clip screening for training data: A/V sync from the project's own sync expert and no-reference image
quality, and the filter decision on them (stage `score`, vasa/stages/score.py, runs these over the shards).

Sync (SyncNet's data filter, as LatentSync applies it): the sync expert's distances between every mouth
window and the audio windows at offsets -V..V (V = params evaluate.sync_offsets), averaged over frames;
S_C = median minus minimum over offsets, the best offset = argmin (vasa/evaluation/metrics.py). A clip whose
S_C is low has speech that does not drive this face (dubbed, another clip's audio, an off-screen speaker, or
an offset beyond the search); a confident offset within params score.sync.max_offset is corrected by shifting
the audio, a larger one rejects the clip.

The judge must work on the corpus it screens: before any sync decision, the median of S_C(aligned) -
S_C(audio shifted by evaluate.shift_frames, beyond the search) must reach score.sync.min_judge_margin, over
the judge's own evaluation clips (never trained on) where the scored shards hold them, else over every
scored clip. A judge that cannot tell timing (the `tiny` expert on real speech after a few
CPU minutes, docs/BENCHMARKS.md) then rejects nothing on sync grounds, and the metrics say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vasa.core.config import ScoreConfig
from vasa.evaluation.image_quality import ImageQuality
from vasa.evaluation.metrics import SyncScore, offset_distances, shift_audio, sync_score
from vasa.evaluation.sync import FRAMES, SyncExpert, embed_clip
from vasa.loaders.scores import CORRECTED, IMAGE_BLUR, IMAGE_COMPRESSION, OK, REJECTED, SYNC_CONFIDENCE, SYNC_OFFSET


@dataclass(frozen=True)
class SyncFinding:
    """The sync expert on one clip: with its own audio, and with the audio shifted beyond the search (the
    judge check's control)."""

    score: SyncScore
    shifted_confidence: float


def clip_sync(model: SyncExpert, mouths: np.ndarray, mel: np.ndarray, offsets: int, control_shift: int) -> SyncFinding:
    """mouths (T, MOUTH_H, MOUTH_W) uint8, mel (T, k * n_mels) normalised with the judge's statistics. ValueError
    when the clip has fewer than FRAMES frames (no window)."""
    n = min(len(mouths), len(mel))
    if n < FRAMES:
        raise ValueError(f"{n} frames: fewer than the sync window's {FRAMES}")
    visual, audio = embed_clip(model, mouths[:n], mel[:n])
    _, shifted = embed_clip(model, mouths[:n], shift_audio(mel[:n], control_shift))
    control = sync_score(offset_distances(visual, shifted, offsets))
    return SyncFinding(sync_score(offset_distances(visual, audio, offsets)), control.confidence)


def judge_margin(findings: list[SyncFinding]) -> float:
    """Median over clips of S_C with their audio minus S_C with it shifted beyond the search (NaN: no clip)."""
    if not findings:
        return float("nan")
    return float(np.median([f.score.confidence - f.shifted_confidence for f in findings]))


def quality_problems(quality: ImageQuality, cfg: ScoreConfig) -> list[tuple[str, str]]:
    """The image-quality filters that fail, the measure furthest past its threshold first (as a fraction of the
    room above the threshold): a very low bitrate also blurs, and blurring also freezes blocks (it removes the
    camera noise), so the larger excess names the cause."""
    q = cfg.quality
    found = []
    if not quality.blur <= q.max_blur:  # NaN fails too
        excess = (quality.blur - q.max_blur) / max(1.0 - q.max_blur, 1e-6)
        found.append((excess, IMAGE_BLUR, f"blur index {quality.blur:.3f} > max_blur {q.max_blur}"))
    if not quality.frozen <= q.max_frozen:
        excess = (quality.frozen - q.max_frozen) / max(1.0 - q.max_frozen, 1e-6)
        found.append((excess, IMAGE_COMPRESSION, f"frozen blocks {quality.frozen:.3f} > max_frozen {q.max_frozen}"))
    found.sort(key=lambda p: -p[0] if p[0] == p[0] else -2.0)  # NaN (unmeasured) ranks first
    return [(reason, detail) for _, reason, detail in found]


@dataclass(frozen=True)
class Decision:
    status: str  # OK | CORRECTED | REJECTED
    reasons: tuple[str, ...]  # failed filters: image quality (the larger excess first), then sync
    detail: str  # the failed filters' values and thresholds, or the correction made
    audio_shift: int  # frames the audio is moved against the video (align_audio)


def decide(sync: SyncScore | None, quality: ImageQuality, cfg: ScoreConfig) -> Decision:
    """The filters on one clip's scores. `sync` None: the sync filter is off (the judge failed its check)."""
    problems: list[tuple[str, str]] = []
    # First: a blurred or blocky mouth also lowers the sync confidence, and the picture is the cause.
    problems += quality_problems(quality, cfg)
    if sync is not None:
        if not sync.confidence >= cfg.sync.min_confidence:  # NaN fails too
            problems.append((SYNC_CONFIDENCE, f"S_C {sync.confidence:.3f} < min_confidence {cfg.sync.min_confidence}"))
        elif abs(sync.offset) > cfg.sync.max_offset:
            limit = f"max_offset {cfg.sync.max_offset} frames"
            problems.append((SYNC_OFFSET, f"|offset| {abs(sync.offset)} > {limit} (S_C {sync.confidence:.3f})"))
    if problems:
        return Decision(REJECTED, tuple(r for r, _ in problems), "; ".join(d for _, d in problems), 0)
    if sync is not None and sync.offset != 0:
        detail = f"audio shifted by {sync.offset} frames (S_C {sync.confidence:.3f})"
        return Decision(CORRECTED, (), detail, sync.offset)
    return Decision(OK, (), "", 0)
