"""Checks a whole sweep before Hydra launches any of its jobs (a Hydra callback).

Every job checks its own config before it trains or loads anything (the family's
``validate``), but under a launcher each job is a new process: the side-by-side launcher
starts its workers, submitit its jobs, and each pays the stack's import (seconds) before it can
refuse. What the sweep's overrides alone show is refused here, once, in the sweep's own
process: today, a seed sweep over a family whose seeds would all be one model (a pretrained
``family.model_id`` without ``{seed}``).

Registered in ``conf/hydra/default.yaml`` (``hydra.callbacks.preflight``).
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def swept_values(task_overrides: list[str], key: str) -> list[str] | None:
    """The values a sweep's overrides give ``key`` (None: not swept, or not as a list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    for override in OverridesParser.create().parse_overrides(task_overrides):
        if override.key_or_group == key and override.is_sweep_override():
            # an interval is a sweeper's to sample, a glob matches config-group options: neither
            # is a list of seeds
            if not override.is_discrete_sweep() or override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                return None
            return list(override.sweep_string_iterator())
    return None


class SweepPreflight(Callback):
    """Refuses a sweep whose jobs would all fail the same config check, before any starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from polymorph.errors import PolymorphError
        from polymorph.families import build_family

        values = swept_values(list(config.hydra.overrides.task), "seed")
        if not values or "family" not in config:
            return
        try:
            seeds = [int(v) for v in values]
        except ValueError:
            return  # not integers: each job's own check names the bad value
        try:
            build_family(config).validate_seeds(seeds)
        except PolymorphError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
