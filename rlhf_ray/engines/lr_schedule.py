"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to a floor."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the base LR after ``step`` optimizer steps (step 0 = the first update).

    warmup:  m = (step + 1) / warmup_steps                      for step < warmup_steps
    decay:   p = (step - warmup) / max(1, total - warmup), clipped to [0, 1]
             constant: m = 1
             linear:   m = min_ratio + (1 - min_ratio) * (1 - p)
             cosine:   m = min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * p))
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule: unknown schedule '{schedule}' (constant, linear, cosine)")
