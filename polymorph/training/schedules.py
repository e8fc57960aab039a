"""Learning-rate schedules of the transformer run, as multipliers of the peak learning rate.

Each factory takes the optimiser and returns a ``torch.optim.lr_scheduler.LRScheduler`` stepped
once per optimiser step; the config gives it as a ``_partial_`` node
(``training.module.scheduler``), so another schedule is an override.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``final_fraction`` at
    ``total_steps`` (and ``final_fraction`` after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           final_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The published schedule: :func:`warmup_cosine` as a LambdaLR."""
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0, total_steps={total_steps} "
                         f">= 1 and final_fraction={final_fraction} in [0, 1]")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, final_fraction))
