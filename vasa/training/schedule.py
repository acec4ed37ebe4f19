"""Learning-rate schedule: linear warm-up, then cosine decay (MegaPortraits trains with cosine decay,
2e-4 -> 1e-6). A pure function of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimiser step `step` (0-based) of `total`.

    Linear from 1/warmup to 1 over the first `warmup` steps (never 0, so step 0 still learns), then
    cosine from 1 down to `min_ratio` at the last step. Range: [min_ratio, 1] after warm-up.
    """
    if total < 1 or not 0 <= min_ratio <= 1 or warmup < 0:
        raise ValueError(f"bad schedule: total={total}, warmup={warmup}, min_ratio={min_ratio}")
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
