"""map_family on the smoke runs: is the seed-to-seed map a rotation, or more?"""

from __future__ import annotations

import pytest

from polymorph.align.maps import MAP_FAMILIES
from polymorph.analysis.map_family import MapFamily


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
        for family in MAP_FAMILIES:
            ci = row[f"{family}_ev_standard_ci"]
            assert ci["mean"] == pytest.approx(row[f"{family}_ev_standard"])
            assert ci["ci_low"] <= ci["ci_high"] and ci["resampled"] == "sequences"
        share = row["orthogonal_share_ci"]  # the ratio under the same resamples
        assert share["ci_low"] <= row["orthogonal_share"] <= share["ci_high"]
        # the scaled rotation plus a rank-k correction sits between the scaled rotation and the
        # affine map (held out, up to a little overfitting), for every k below d
        d = smoke_context.scoring_acts(row["pair"][0], row["site"]).shape[1]
        ranks = [k for k in (1, 2, 4, 8, 16) if k < d]
        assert list(row["rank_corrected_ev_standard"]) == [str(k) for k in ranks]
        for k in map(str, ranks):
            ev = row["rank_corrected_ev_standard"][k]
            assert row["scaled_orthogonal_ev_standard"] - 0.02 <= ev
            assert ev <= row["affine_ev_standard"] + 0.02
            ci = row["rank_corrected_ev_standard_ci"][k]
            assert ci["ci_low"] <= ev <= ci["ci_high"]
            closed = row["gap_closed"][k]
            assert closed is None or closed == pytest.approx(
                (ev - row["scaled_orthogonal_ev_standard"])
                / (row["affine_ev_standard"] - row["scaled_orthogonal_ev_standard"]))
    for site, s in result["per_site"].items():
        assert s["orthogonal_ev_standard_ci"]["resampled"] == "pairs+sequences", site
        assert set(s["rank_corrected_ev_standard"]) == set(s["gap_closed"]), site
    figures = cb.figures(smoke_context, result, tmp_path)
    assert figures and figures[0].stat().st_size > 1000
    assert figures[-1].name == "map_family_ranks.png" and figures[-1].stat().st_size > 1000
    report = cb.report(smoke_context, result, figures)
    assert "orthogonal share" in report and "+ rank 16" in report


def test_bad_ranks_are_refused():
    for bad in ([0], [1.5], ["2"]):
        with pytest.raises(ValueError, match="ranks="):
            MapFamily(ranks=bad)
    assert MapFamily(ranks=[]).ranks == [] and MapFamily(ranks=[4, 1, 4]).ranks == [1, 4]
