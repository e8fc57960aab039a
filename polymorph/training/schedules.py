"""Learning-rate schedules of the transformer run, as multipliers of the peak learning rate.

``cosine``: linear warm-up to the peak, then a cosine to ``final_fraction`` of it at
``total_steps`` (the published shape; held at ``final_fraction`` afterwards).

``wsd`` (warmup-stable-decay): linear warm-up, then the peak held until the decay begins, then
a decay over ``decay_steps`` to ``final_fraction`` (held afterwards). The decay begins at
``decay_start`` if it is set, else when ``start_decay(step)`` is called: a callback calls it
when ``val/min_acc`` first reaches a trigger threshold, so the run spends its high-LR phase
learning and its annealed phase polishing, and stops annealed (see ``StopAfterConvergence``).

A schedule is a callable object (not a lambda) on purpose: ``LambdaLR`` saves the ``__dict__``
of callable objects in its state, so a triggered ``decay_start`` survives a resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("cosine", "linear")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``final_fraction`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _decay(progress: float, final_fraction: float, shape: str) -> float:
    progress = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - (1.0 - final_fraction) * progress
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LRSchedule:
    """The learning-rate multiplier at each optimiser step (0-based: step k is the (k+1)-th)."""

    kind: str = "cosine"
    warmup_steps: int = 500
    total_steps: int = 60_000
    final_fraction: float = 0.02
    decay_steps: int = 0
    decay_start: int | None = None
    decay_shape: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"training.module.lr_schedule.kind={self.kind!r} is unknown; use one of {KINDS}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"training.module.lr_schedule.decay_shape={self.decay_shape!r} is unknown; use {DECAY_SHAPES}"
            )
        if self.warmup_steps < 0 or not 0.0 < self.final_fraction <= 1.0:
            raise ValueError("schedule: warmup_steps must be >= 0 and final_fraction in (0, 1]")
        if self.kind == "wsd" and self.decay_steps < 1:
            raise ValueError("training.module.lr_schedule.kind=wsd needs decay_steps >= 1")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            return warmup_cosine(step, self.warmup_steps, self.total_steps, self.final_fraction)
        if self.decay_start is None or step < self.decay_start:
            return 1.0
        return _decay((step - self.decay_start) / self.decay_steps, self.final_fraction,
                      self.decay_shape)

    def start_decay(self, step: int) -> bool:
        """Begin a triggered WSD decay at ``step`` (no-op if it has begun or is not WSD).

        Returns True if this call started it."""
        if self.kind != "wsd" or self.decay_start is not None:
            return False
        self.decay_start = max(int(step), self.warmup_steps)
        return True

    def annealed_step(self) -> int | None:
        """The first step at which the multiplier reaches ``final_fraction`` (None: not yet known)."""
        if self.kind == "cosine":
            return max(self.total_steps, self.warmup_steps)
        if self.kind == "wsd" and self.decay_start is not None:
            return self.decay_start + self.decay_steps
        return None

    def to_dict(self) -> dict:
        return asdict(self)
