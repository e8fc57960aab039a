"""training.callbacks.ema: an exponential moving average of the weights is what is validated,
kept and analysed, and an interrupted EMA run resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from polymorph.errors import PolymorphError
from polymorph.families import build_family
from polymorph.families.dyck import DyckFamily
from polymorph.files import read_json
from polymorph.pipeline import train
from polymorph.runs import run_layout
from polymorph.training.callbacks import WeightEMA
from polymorph.training.transformer_module import MIN_ACC, min_accuracy
from tests.helpers.config import compose, smoke_overrides
from tests.helpers.interrupt import train_interrupted_at

EMA = ["stage=transformer", "training.max_steps=30", "training.eval_every=10",
       "training.callbacks.ema={_target_:polymorph.training.callbacks.WeightEMA,"
       "decay:0.9,start_step:5}"]


def layout_of(cfg):
    return run_layout(cfg, build_family(cfg))


def min_acc(model, cfg) -> float:
    """val/min_acc of ``model`` on the run's evaluation sets, scored here."""
    data = instantiate(cfg.data, seed=int(cfg.seed))
    return min_accuracy(model, data.eval_sets(), int(cfg.training.length_buckets))


def test_the_average_is_validated_kept_and_differs_from_the_live_weights(tmp_path):
    cfg = compose(smoke_overrides(tmp_path, *EMA))
    train(cfg)
    run = layout_of(cfg)
    state = torch.load(run.resume_state, map_location="cpu", weights_only=False)
    kept = load_file(str(run.last))
    average = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    live = {k.removeprefix("model."): v for k, v in state["current_model_state"].items()}
    assert any(not torch.equal(average[k], live[k]) for k in kept)
    for name, value in kept.items():
        assert torch.equal(value, average[name]), name
    # the logged min_acc is the kept (averaged) model's, rescored from the file
    logged = read_json(run.checkpoint_index)["30"][MIN_ACC]
    assert min_acc(DyckFamily().load(run, "last"), cfg) == pytest.approx(logged, abs=1e-12)


def test_an_interrupted_ema_run_resumes_to_the_same_average(tmp_path, monkeypatch):
    reference = compose(smoke_overrides(tmp_path / "ref", *EMA))
    train(reference)
    train_interrupted_at(compose(smoke_overrides(tmp_path / "broken", *EMA)), 15, monkeypatch)
    broken = compose(smoke_overrides(tmp_path / "broken", *EMA))
    train(broken)
    assert read_json(layout_of(broken).run_info)["resumed_from_step"] == 10
    a = load_file(str(layout_of(reference).last))
    b = load_file(str(layout_of(broken).last))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_decay_outside_zero_one_is_one_clear_line():
    with pytest.raises(PolymorphError, match="decay=1.0.*between 0 and 1"):
        WeightEMA(decay=1.0)
