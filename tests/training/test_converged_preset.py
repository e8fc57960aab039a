"""experiment=converged: its stop rule replayed on synthetic accuracy curves (no training).

The preset's promise: the run stops only after val/min_acc has reached the threshold, has had
``converge_patience`` steps to hold it, and the learning rate has annealed; and the analysed
(best) checkpoint comes from the annealed phase.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from polymorph.training.callbacks import RunCheckpoints, StopAfterConvergence, is_annealed
from tests.helpers.config import compose


@pytest.fixture(scope="module")
def preset():
    return compose(["experiment=converged", "logger=none"])


def replay(cfg, curve):
    """Validate every ``eval_every`` steps as the callbacks do; returns (stop step, best step,
    best annealed?, lr fraction at the stop)."""
    t = cfg.training
    schedule = instantiate(t.module.lr_schedule)
    trigger = (t.callbacks.decay_at_threshold or {}).get("threshold")
    stop = StopAfterConvergence(t.converge_threshold, t.converge_patience,
                                require_annealed=bool(t.get("stop_annealed", False)))
    best = RunCheckpoints(Path("unused"), t.eval_every,
                          best_annealed_only=bool(t.get("stop_annealed", False)))
    for step in range(t.eval_every, t.max_steps + 1, t.eval_every):
        score = curve(step)
        if trigger is not None and score >= trigger:
            schedule.start_decay(step)
        fraction = schedule(step)  # the lr of the next step, as the callbacks read it
        annealed = is_annealed(fraction, schedule.final_fraction)
        if best.is_better(score, annealed):
            best.best_score, best.best_step, best.best_annealed = score, step, annealed
        if stop.should_stop(step, score, annealed):
            return step, best.best_step, best.best_annealed, fraction
    return None, best.best_step, best.best_annealed, schedule(t.max_steps)


def test_the_preset_is_the_published_task_with_full_evaluation_sets(preset):
    assert preset.name == "converged"
    assert preset.data.eval_size >= 4096
    assert (preset.data.min_len, preset.data.max_len, preset.data.p_valid) == (2, 62, 0.5)
    assert preset.training.converge_threshold == 0.9999
    assert preset.training.stop_annealed is True
    assert preset.trainer.precision == "auto"


def test_a_curve_that_crosses_early_still_stops_annealed(preset):
    t = preset.training
    step, best_step, best_annealed, fraction = replay(preset, lambda s: 0.99995)
    schedule_end = instantiate(t.module.lr_schedule).annealed_step()
    assert step is not None and fraction <= t.final_lr_fraction * (1 + 1e-6)
    assert step >= t.converge_patience
    if schedule_end is not None:
        assert step >= schedule_end
    assert best_annealed and best_step <= step


def test_a_curve_that_crosses_late_waits_for_the_patience(preset):
    t = preset.training
    cross = 8 * t.eval_every + t.schedule_steps
    step, best_step, best_annealed, _ = replay(preset, lambda s: 0.9999 if s >= cross else 0.999)
    assert step is not None
    first = next(s for s in range(t.eval_every, t.max_steps + 1, t.eval_every) if s >= cross)
    assert step == first + t.converge_patience or (step > first + t.converge_patience
                                                    and best_annealed)
    assert best_annealed and best_step >= first


def test_a_curve_that_never_crosses_runs_to_max_steps_with_an_annealed_best(preset):
    step, _best_step, best_annealed, fraction = replay(preset, lambda s: 0.999)
    assert step is None and best_annealed
    assert fraction <= preset.training.final_lr_fraction * (1 + 1e-6)


def test_a_high_lr_peak_never_becomes_the_analysed_checkpoint(preset):
    t = preset.training
    # The best score of the run sits at the first evaluation (high lr); later, annealed
    # evaluations score a little lower: the analysed checkpoint must still be an annealed one.
    step, best_step, best_annealed, _ = replay(
        preset, lambda s: 0.99999 if s == t.eval_every else 0.99991)
    assert step is not None and best_annealed and best_step > t.eval_every
