"""Bad statistics settings are config errors: one line, naming the setting, before anything loads."""

from __future__ import annotations

import pytest

from polymorph.analysis import runner
from polymorph.analysis.runner import analyze
from polymorph.errors import PolymorphError
from tests.helpers.config import compose, smoke_overrides

CASES = [
    ("analysis.n_boot=50", "function_match", "n_boot=50 is too few"),
    ("analysis.callbacks.universality.n_boot=99", "universality", "n_boot=99 is too few"),
    ("analysis.callbacks.haar.n_boot=10", "haar", "n_boot=10 is too few"),
    ("analysis.callbacks.spliced_loss.n_boot=0", "spliced_loss", "n_boot=0 is too few"),
    ("analysis.callbacks.universality.margin=1.5", "universality", r"margin=1.5 must be in \[0, 1\]"),
    ("analysis.callbacks.sae_transfer.margin=-0.1", "sae_transfer", r"margin=-0.1 must be in \[0, 1\]"),
    ("analysis.callbacks.steering.margin=2", "steering", r"margin=2.* must be in \[0, 1\]"),
    ("analysis.callbacks.spliced_loss.margin=1.01", "spliced_loss", r"margin=1.01 must be in"),
    ("analysis.callbacks.sae_transfer.null_shuffles=-1", "sae_transfer", "null_shuffles"),
]


@pytest.mark.parametrize(("override", "where", "match"), CASES)
def test_bad_statistics_settings_fail_before_anything_loads(override, where, match, tmp_path,
                                                            monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("the analysis context was built before the config error")

    monkeypatch.setattr(runner, "build_context", too_late)
    cfg = compose(smoke_overrides(tmp_path, override), config_name="analyze")
    with pytest.raises(PolymorphError, match=match) as err:
        analyze(cfg, show_progress=False)
    message = str(err.value)
    assert message.startswith(f"analysis.callbacks.{where}") and "\n" not in message
