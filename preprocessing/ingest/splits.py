"""Which split a clip belongs to: whole speakers, never one speaker in two splits.

`test`: speakers a source marks as test (VoxCeleb2's test identities, a local source configured as
test) and params `ingest.holdout_speakers`; they are never trained on. `val`: a deterministic
fraction of the remaining speakers, chosen by a hash of the speaker id, so the choice depends on
nothing but the id and the fraction (not on the order, the run, or which other speakers exist) and
a speaker keeps its split when the corpus grows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from preprocessing.schema import TEST, TRAIN, VAL


def speaker_unit(speaker_id: str) -> float:
    """A number in [0, 1) fixed by the speaker id: the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(speaker_id.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64


def split_for(speaker_id: str, source_split: str, holdout: frozenset[str], val_fraction: float) -> str:
    """The split of a clip whose source says `source_split` (train | test)."""
    if source_split == TEST or speaker_id in holdout:
        return TEST
    return VAL if speaker_id and speaker_unit(speaker_id) < val_fraction else TRAIN


def assign_splits(rows: Iterable[dict], holdout: Iterable[str], val_fraction: float) -> list[dict]:
    """Rows with `split` set by `split_for`, on every row of the manifest (fresh or kept).

    A `val` already recorded counts as `train` here, so changing `val_fraction` moves speakers
    between train and val both ways; a recorded `test` stays test (never back into training).
    """
    held = frozenset(holdout)
    out = []
    for row in rows:
        source_split = TEST if row["split"] == TEST else TRAIN
        out.append(row | {"split": split_for(row["speaker_id"] or "", source_split, held, val_fraction)})
    return out
