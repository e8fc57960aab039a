"""A diverging recipe stops at the first non-finite loss with one clear line, keeps its last
good checkpoint, and starts over with retrain=true."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from polymorph.files import read_json
from polymorph.layout import RunLayout
from polymorph.pipeline import train
from polymorph.training.callbacks import TrainingDiverged
from tests.helpers.config import compose, smoke_overrides

ABSURD = ["name=pinned", "stage=transformer", "training.lr=1e8", "training.eval_every=2", "training.max_steps=40"]


def test_absurd_lr_stops_at_the_first_non_finite_loss_and_retrain_recovers(tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        train(compose(smoke_overrides(tmp_path, *ABSURD)))
    message = str(err.value)
    assert "\n" not in message
    assert "diverged at step" in message and "non-finite training loss" in message
    assert "training.lr=100000000.0" in message and "retrain=true" in message
    run = RunLayout.for_seed(tmp_path, "pinned", 0)
    assert not run.is_finished()
    steps = sorted(run.step_checkpoints())
    assert steps and max(steps) < int(message.split("diverged at step ")[1].split(":")[0])
    assert f"step {max(steps)}) is kept" in message
    for name, value in load_file(str(run.last)).items():
        assert torch.isfinite(value).all() or name.endswith("IGNORE"), name
    index = read_json(run.checkpoint_index)
    assert all("lr" in entry for entry in index.values())

    # The same config resumes from the kept state and diverges again; a changed recipe needs
    # retrain=true, and then trains from scratch to the end.
    with pytest.raises(TrainingDiverged):
        train(compose(smoke_overrides(tmp_path, *ABSURD)))
    fixed = ["name=pinned", "stage=transformer", "training.eval_every=2", "training.max_steps=40"]
    train(compose(smoke_overrides(tmp_path, *fixed, "retrain=true")))
    assert run.is_finished()
    assert read_json(run.final_metrics)["steps"] == 40


class _Trainer:
    sanity_checking = False

    def __init__(self):
        self.global_step = 0


class _Module:
    def __init__(self):
        self.last_val_metrics = {}


def _replay(callback, curve):
    """Feed ``curve`` (val/min_acc per validation, every 100 steps) to the callback; the step
    it stopped at (None: ran to the end)."""
    from polymorph.training.callbacks import StopOnDivergence  # noqa: F401 - the type under test

    trainer, module = _Trainer(), _Module()
    for i, score in enumerate(curve, start=1):
        trainer.global_step, module.last_val_metrics = 100 * i, {"val/min_acc": score}
        try:
            callback.on_validation_end(trainer, module)
        except TrainingDiverged as err:
            return trainer.global_step, str(err)
    return None, None


def test_a_one_validation_dip_is_not_a_collapse_but_a_lasting_one_is():
    from polymorph.training.callbacks import StopOnDivergence

    dip = [0.5, 0.92, 0.41, 0.95, 0.99]  # a healthy run at a high learning rate
    assert _replay(StopOnDivergence(recipe="r", collapse_drop=0.5, collapse_evals=3), dip) == (
        None, None)
    collapse = [0.5, 0.92, 0.41, 0.3, 0.2, 0.2]
    step, message = _replay(StopOnDivergence(recipe="r", collapse_drop=0.5, collapse_evals=3),
                            collapse)
    assert step == 500 and "collapsed to 0.2000 from 0.9200 for 3 validations" in message
    assert "step 200) is kept" in message and "(recipe: r)" in message
    assert _replay(StopOnDivergence(recipe="r", collapse_drop=0.5, collapse_evals=1), dip)[0] == 300
    with pytest.raises(ValueError, match="collapse_evals"):
        StopOnDivergence(collapse_evals=0)
