"""The learning-rate schedule pretraining and finetuning share (GaLore / WeLore): linear warmup, then
cosine decay to `min_ratio` × the peak, as a `torch.optim.lr_scheduler.LambdaLR` factor."""

from __future__ import annotations

import math


def warmup_cosine(warmup: int, steps: int, min_ratio: float):
    """factor(step), step = updates done so far: (step+1)/warmup while warming up, then cosine."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f
