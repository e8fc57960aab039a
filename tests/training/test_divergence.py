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
