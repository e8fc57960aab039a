"""The per-seed job as a whole: stages, and what the config alone shows is refused up front."""

from __future__ import annotations

import pytest

from polymorph.errors import PolymorphError
from polymorph.pipeline import train
from tests.helpers.config import compose, smoke_overrides


def test_sae_stage_without_a_finished_run_names_the_fix(tmp_path):
    with pytest.raises(PolymorphError, match=r"seed=3.*stage=transformer"):
        train(compose(smoke_overrides(tmp_path, "stage=sae", "seed=3")))


def test_bad_stage_and_seed_are_refused(tmp_path):
    with pytest.raises(PolymorphError, match="stage=train is unknown"):
        train(compose(smoke_overrides(tmp_path, "stage=train")))
    with pytest.raises(PolymorphError, match="non-negative integer"):
        train(compose(smoke_overrides(tmp_path, "seed=-1")))


@pytest.mark.parametrize("extra, message", [
    ("sites=[blocks.0.hook_resid_pre,blocks.9.hook_resid_post]", r"unknown site.*blocks\.9"),
    ("sae.l1_coefficient=-1", "l1_coefficient"),
    ("sae.architecture=nope", "architecture"),
])
def test_config_mistakes_fail_before_any_training(tmp_path, extra, message):
    with pytest.raises(PolymorphError, match=message):
        train(compose(smoke_overrides(tmp_path, extra)))
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing was trained or written
