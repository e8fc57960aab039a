"""Learning-rate schedules: the published cosine unchanged, WSD with a fixed or triggered decay."""

from __future__ import annotations

import math

import pytest
import torch

from polymorph.training.schedules import LRSchedule, warmup_cosine


def test_cosine_is_the_published_warmup_cosine():
    s = LRSchedule("cosine", warmup_steps=500, total_steps=60_000, final_fraction=0.02)
    for step in (0, 1, 499, 500, 1000, 30_000, 59_999, 60_000, 70_000):
        assert s(step) == warmup_cosine(step, 500, 60_000, 0.02)
    assert s(60_000) == pytest.approx(0.02) and s.annealed_step() == 60_000


def test_the_config_builds_the_schedule_from_the_flat_training_keys():
    from hydra.utils import instantiate

    from tests.helpers.config import compose

    cfg = compose(["training.max_steps=3000", "training.warmup_steps=100"])
    s = instantiate(cfg.training.module.lr_schedule)
    assert (s.kind, s.warmup_steps, s.total_steps, s.final_fraction) == ("cosine", 100, 3000, 0.02)
    w = instantiate(compose(["training.module.lr_schedule.kind=wsd",
                             "training.module.lr_schedule.decay_steps=500"]
                            ).training.module.lr_schedule)
    assert w.kind == "wsd" and w.decay_steps == 500


def test_wsd_holds_the_peak_until_triggered_then_decays_to_the_floor():
    s = LRSchedule("wsd", warmup_steps=10, final_fraction=0.02, decay_steps=100)
    assert s(0) == pytest.approx(0.1) and s(10) == 1.0 and s(5000) == 1.0
    assert s.annealed_step() is None
    assert s.start_decay(1000) and not s.start_decay(2000)  # only the first trigger counts
    assert s(999) == 1.0 and s(1000) == 1.0
    assert s(1050) == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(1100) == pytest.approx(0.02) and s(9999) == pytest.approx(0.02)
    assert s.annealed_step() == 1100


def test_wsd_with_a_set_decay_start_and_linear_shape():
    s = LRSchedule("wsd", warmup_steps=0, final_fraction=0.1, decay_steps=100, decay_start=200,
                   decay_shape="linear")
    assert s(199) == 1.0 and s(250) == pytest.approx(0.55) and s(300) == pytest.approx(0.1)


def test_a_triggered_decay_survives_the_schedulers_state_dict():
    def scheduler(schedule):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    first = LRSchedule("wsd", warmup_steps=0, decay_steps=10)
    first.start_decay(5)
    state = scheduler(first).state_dict()
    second = LRSchedule("wsd", warmup_steps=0, decay_steps=10)
    scheduler(second).load_state_dict(state)
    assert second.decay_start == 5


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        LRSchedule("step")
    with pytest.raises(ValueError, match="decay_steps"):
        LRSchedule("wsd", decay_steps=0)
