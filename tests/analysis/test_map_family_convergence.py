"""map_family and convergence callbacks on the smoke runs (issue: is it really a rotation?)."""

from __future__ import annotations

import pytest

from polymorph.align.maps import MAP_FAMILIES
from polymorph.analysis.convergence import Convergence, spaced
from polymorph.analysis.map_family import MapFamily
from polymorph.errors import PolymorphError


def test_map_family_reports_every_family_share_and_cka(smoke_context, tmp_path):
    cb = MapFamily()
    result = cb.run(smoke_context)
    assert len(result["rows"]) == len(smoke_context.pairs) * len(smoke_context.sites)
    for row in result["rows"]:
        for family in MAP_FAMILIES:
            assert f"{family}_ev_standard" in row and f"{family}_ev_published" in row
        # held out, a richer family never loses much to a poorer one
        assert row["affine_ev_standard"] >= row["orthogonal_ev_standard"] - 0.05
        assert row["orthogonal_share"] == pytest.approx(
            row["orthogonal_ev_standard"] / row["affine_ev_standard"]
        )
        assert 0.0 <= row["cka"] <= 1.0 + 1e-9
    figures = cb.figures(smoke_context, result, tmp_path)
    assert figures and figures[0].stat().st_size > 1000
    assert "orthogonal share" in cb.report(smoke_context, result, figures)


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
            assert "orthogonal_ev_standard" in r and "affine_ev_standard" in r
    assert cb.figures(smoke_context, result, tmp_path)


def test_convergence_without_common_steps_names_what_each_seed_saved(smoke_context, monkeypatch):
    layout = smoke_context.runs[1]
    monkeypatch.setattr(type(layout), "step_checkpoints", lambda self: {} if self == layout else {10: None})
    with pytest.raises(PolymorphError, match=r"no pair of seeds.*seed 1: none"):
        Convergence().run(smoke_context)


def test_spaced_keeps_first_and_last():
    assert spaced([1, 2, 3, 4, 5, 6, 7], 3) == [1, 4, 7]
    assert spaced([1, 2], 5) == [1, 2]
