"""A growing batch and a length curriculum are plain overrides of the composed config."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from tests.helpers.config import compose


def _datamodule(*overrides: str):
    cfg = compose(["experiment=smoke", *overrides])
    return instantiate(cfg.data, seed=0)


def test_batch_schedule_grows_the_batch_from_its_step():
    dm = _datamodule("data.batch_size=8", "data.batch_schedule=[[3,16],[5,32]]")
    sizes = [dm.training_batch(step).tokens.shape[0] for step in range(7)]
    assert sizes == [8, 8, 8, 16, 16, 32, 32]


def test_max_len_schedule_caps_the_content_length_until_its_step():
    dm = _datamodule(
        "data.batch_size=256", "data.max_len=62", "data.max_len_schedule=[[0,10],[4,62]]"
    )
    early = dm.training_batch(0).lengths.max().item()
    late = max(dm.training_batch(step).lengths.max().item() for step in (4, 5, 6))
    assert early <= 10 + 2  # content plus BOS and EOS
    assert late > 12


def test_schedules_do_not_change_the_evaluation_sets():
    plain = _datamodule().eval_sets()
    scheduled = _datamodule(
        "data.batch_schedule=[[0,4]]", "data.max_len_schedule=[[0,5]]"
    ).eval_sets()
    for split in plain:
        assert all((a.tokens == b.tokens).all() for a, b in zip(plain[split], scheduled[split]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_schedule=[[5,16],[3,32]]", "ascending steps"),
        ("data.max_len_schedule=[[0,100]]", "outside"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(override, message):
    # hydra wraps the constructor's ValueError; its message is kept
    with pytest.raises(Exception, match=message):
        _datamodule(override)
