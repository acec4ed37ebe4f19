"""The per-clip score table that stage `score` writes (data/scores/scores.parquet) and how training reads it.

One row per shard sample (every split), sorted by key:

    key, clip_id, speaker_id, split, shard, frames
    sync_confidence   S_C of the sync expert (median minus minimum distance over the offset search), NaN if unscored
    sync_distance     S_D (the distance at the best offset)
    sync_offset       the best offset in frames (> 0: the audio at t + offset matches frame t, the audio lags)
    blur, frozen      the image-quality measures in [0, 1] (vasa/evaluation/image_quality.py)
    iq_score          100 x (1 - max(blur, frozen)), for reports (the filters apply to blur and frozen)
    status            OK | CORRECTED (kept, audio shifted by audio_shift) | REJECTED
    reason            the first failed filter (REASONS), null when kept
    detail            every failed filter with its value and threshold; for CORRECTED, the shift
    audio_shift       frames the audio is moved against the video before training (= sync_offset when CORRECTED)

Training reads it through `Scores`: rejected clips of the train split are never trained on (stage 1's pairs,
stage 2's motion shards); corrected clips are re-aligned by `align_audio` wherever extract_motion writes
them. Val/test clips keep their place in the evaluation sets whatever their score, so held-out figures stay
comparable across filter settings. Reading needs pyarrow only (the audit imports this, not torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import schema
from vasa.core.digests import sha256_file
from vasa.core.errors import InputError

SCORES_FILE = "scores.parquet"
OK, CORRECTED, REJECTED = "ok", "corrected", "rejected"
STATUSES = (OK, CORRECTED, REJECTED)
# Reasons. A row's `reason` is the first that fails: image quality first (a blurred or blocky mouth also lowers
# the sync expert's confidence, and the picture is the cause; of blur and compression the measure furthest past
# its threshold), then sync.
IMAGE_BLUR = "image_blur"  # blur index above score.quality.max_blur
IMAGE_COMPRESSION = "image_compression"  # frozen-block fraction above score.quality.max_frozen (very low bitrate)
SYNC_CONFIDENCE = "sync_confidence"  # S_C below score.sync.min_confidence: not this face's speech, or far off
SYNC_OFFSET = "sync_offset"  # a confident offset beyond score.sync.max_offset: too far to correct
UNSCORABLE = "unscorable"  # a sample the judges cannot read (no lips, no frames): the loaders skip it too
REASONS = (IMAGE_BLUR, IMAGE_COMPRESSION, SYNC_CONFIDENCE, SYNC_OFFSET, UNSCORABLE)

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("clip_id", pa.string()),
        ("speaker_id", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("frames", pa.int32()),
        ("sync_confidence", pa.float64()),
        ("sync_distance", pa.float64()),
        ("sync_offset", pa.int32()),
        ("blur", pa.float64()),
        ("frozen", pa.float64()),
        ("iq_score", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("audio_shift", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Scores:
    """What training needs of a score table: which train clips to skip, which clips to re-align."""

    rows: dict[str, dict]  # key -> row
    sha256: str | None  # of the parquet file (None: an empty table made in code)

    @cached_property
    def rejected_train(self) -> frozenset[str]:
        """Keys of the train split's rejected clips: no training stage reads them."""
        return frozenset(k for k, r in self.rows.items() if r["status"] == REJECTED and r["split"] == schema.TRAIN)

    def audio_shift(self, key: str) -> int:
        row = self.rows.get(key)
        return int(row["audio_shift"] or 0) if row else 0

    def shard_rows(self, shard: str) -> list[dict]:
        """The rows of one shard, by key: what decides that shard's filtered output."""
        return self._by_shard.get(shard, [])

    @cached_property
    def _by_shard(self) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for _, row in sorted(self.rows.items()):
            found.setdefault(row["shard"], []).append(row)
        return found


NO_SCORES = Scores({}, None)


def read_scores(path: Path | None) -> Scores:
    """The table at `path` (None: no filtering, NO_SCORES). InputError when it is missing or not a score table."""
    if path is None:
        return NO_SCORES
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise InputError(f"{path}: score table not found (run the score stage first)") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: unreadable score table: {err}") from None
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise InputError(f"{path}: not a score table (missing columns {sorted(missing)})")
    rows = {row["key"]: row for row in table.select(SCHEMA.names).to_pylist()}
    unknown = {r["status"] for r in rows.values()} - set(STATUSES)
    if unknown:
        raise InputError(f"{path}: unknown status {sorted(unknown)}")
    return Scores(rows, sha256_file(path))


def write_scores(rows: list[dict], path: Path) -> None:
    """The table, rows sorted by key, no time stamps: the same scores give the same bytes."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=SCHEMA)
    pq.write_table(table, path, compression="zstd")


def align_audio(video: list[np.ndarray], audio: np.ndarray, shift: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Re-align per-frame arrays by `shift` frames (a table's audio_shift = the offset SyncNet's search found):
    shift > 0 (the audio lags: audio[t + shift] belongs to frame t) keeps video frames 0..T-shift-1 with audio
    frames shift..T-1; shift < 0 the other way round; the unmatched ends are dropped. video: arrays of T rows
    (motion, gaze, ...); audio: (T, ...) per-frame audio features. Inputs are not modified."""
    n = min([len(audio), *(len(v) for v in video)])
    if shift == 0:
        return [v[:n] for v in video], audio[:n]
    if abs(shift) >= n:
        raise ValueError(f"audio shift {shift} leaves no frame of a {n}-frame clip")
    if shift > 0:
        return [v[: n - shift] for v in video], audio[shift:n]
    return [v[-shift:n] for v in video], audio[: n + shift]
