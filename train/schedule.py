"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to ``min_lr_ratio``.

    scheduler = make_scheduler(optimizer, total_steps, config.optim)   # LambdaLR over lr_at
    ...
    optimizer.step(); scheduler.step()                                 # once per optimizer step

``lr_at(step, ...)`` is the multiplier of ``optim.lr`` used by 0-based optimizer step ``step``
(``LambdaLR`` applies ``lr_at(0)`` at construction and ``lr_at(s)`` after ``s`` scheduler steps):

- warmup, ``step < W``: ``(step + 1) / (W + 1)`` (nanoGPT's ramp: the first step is not wasted at
  lr 0, and the peak is reached at step W); W = ``warmup_steps``, or ``ceil(warmup_ratio * total)``;
- then with ``progress = (step - W) / (total_steps - W)`` clipped to [0, 1]:
  cosine ``m + (1 - m) * (1 + cos(pi * progress)) / 2``, linear ``1 - (1 - m) * progress``, constant
  ``1`` (m = ``min_lr_ratio``). The decay reaches m at ``step == total_steps``, one past the last
  update (the last update uses a small positive lr even with m = 0), and stays there beyond.

SFT-GO's lambda decay is not here: ``train.losses.SftGoLoss.lambda_at(progress)`` owns it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from schemas.shard import ceil_count

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from train.config import OptimConfig

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(total_steps: int, optim: "OptimConfig") -> int:
    """Warmup length in optimizer steps: ``warmup_steps``, else ``ceil(warmup_ratio * total_steps)``."""
    if optim.warmup_steps > 0:
        return int(optim.warmup_steps)
    return ceil_count(optim.warmup_ratio, total_steps) if optim.warmup_ratio > 0 else 0


def lr_at(step: int, total_steps: int, optim: "OptimConfig") -> float:
    """Multiplier of ``optim.lr`` for 0-based optimizer step ``step`` of ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: {optim.schedule!r} is not one of {list(SCHEDULES)}")
    warmup = warmup_steps(total_steps, optim)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if optim.schedule == "constant":
        return 1.0
    floor = optim.min_lr_ratio
    progress = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
    if optim.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: "torch.optim.Optimizer", total_steps: int, optim: "OptimConfig") -> "torch.optim.lr_scheduler.LambdaLR":
    """A ``LambdaLR`` over :func:`lr_at`; step it once per optimizer step. Its state_dict resumes it."""
    import torch

    lr_at(0, total_steps, optim)  # fail here, not at the first step, on a bad schedule or total
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total_steps, optim))
