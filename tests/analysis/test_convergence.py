"""convergence on the smoke runs: the map at every checkpoint step both seeds kept."""

from __future__ import annotations

import pytest

from polymorph.analysis.convergence import Convergence, spaced
from polymorph.errors import PolymorphError


def test_convergence_has_one_point_per_shared_checkpoint_step(smoke_context, tmp_path):
    cb = Convergence(max_steps=None)
    result = cb.run(smoke_context)
    assert result["common_steps"] == [10, 20] and result["steps"] == [10, 20]
    n = len(smoke_context.pairs) * len(smoke_context.sites)
    for step in (10, 20):
        rows = [r for r in result["rows"] if r["step"] == step]
        assert len(rows) == n
        for r in rows:
            assert r["min_acc_a"] is not None and r["min_acc_b"] is not None
            assert r["lr_a"] > 0 and r["lr_b"] > 0
            assert "orthogonal_ev_standard" in r and "affine_ev_standard" in r
    assert cb.figures(smoke_context, result, tmp_path)


def test_convergence_without_common_steps_names_what_each_seed_saved(smoke_context, monkeypatch):
    layout = smoke_context.runs[1]
    original = type(layout).step_checkpoints
    monkeypatch.setattr(type(layout), "step_checkpoints",
                        lambda self: {} if self == layout else original(self))
    with pytest.raises(PolymorphError, match=r"no pair of seeds.*seed 1: none"):
        Convergence().run(smoke_context)


def test_spaced_keeps_first_and_last():
    assert spaced([1, 2, 3, 4, 5, 6, 7], 3) == [1, 4, 7]
    assert spaced([1, 2], 5) == [1, 2]
