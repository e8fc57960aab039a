"""haar: exact-moment z on the span, and without the directions shared by construction.

Planted twins of the anchor (its activations times a known Q, rotations fitted on them):

* Q Haar: every statistic reads "consistent with a Haar draw";
* Q fixing the positional code's 6 directions and Haar on the rest: the trace on the span
  departs from Haar, the trace without the shared directions does not, and the reading says
  the departure comes from the shared directions alone;
* at the rank-deficient embedding site the full-matrix tests are withheld.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from polymorph.align.haar import haar_null, haar_orthogonal
from polymorph.align.procrustes import fit_rotation
from polymorph.align.span import complement_diagnostics
from polymorph.analysis.haar import FULL_KEYS, HaarDiagnosticsCallback, off_shared_diagnostics

D, K = 64, 6  # d_model, the fixed positional code's dimensions


def twins(ctx, qs: list[torch.Tensor]):
    """``ctx`` with only pairs (anchor, twin_i), twin_i = the anchor's activations @ qs[i]."""
    a = ctx.anchor
    acts = {b: dict(per) for b, per in ctx.acts.items()}
    rotations, pairs = dict(ctx.rotations), []
    for i, q in enumerate(qs):
        seed = 90 + i
        for b, per_seed in acts.items():
            per_seed[seed] = {s: (ctx.acts[b][a][s].double() @ q).float() for s in ctx.sites}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for s in ctx.sites:
                rotations[(a, seed, s)] = fit_rotation(acts["fit"][seed][s], acts["fit"][a][s])
        pairs.append((a, seed))
    return dataclasses.replace(ctx, acts=acts, rotations=rotations, pairs=pairs)


def fixing_positional_code(seed: int) -> torch.Tensor:
    q = torch.eye(D, dtype=torch.float64)
    q[K:, K:] = haar_orthogonal(D - K, "O", seed=seed)
    return q


def run(ctx):
    return HaarDiagnosticsCallback(null_samples=200, n_boot=200).run(ctx)


def test_haar_twins_read_as_haar_draws(smoke_context):
    result = run(twins(smoke_context, [haar_orthogonal(D, "O", seed=20 + i) for i in range(3)]))
    cb = HaarDiagnosticsCallback()
    for site, s in result["per_site"].items():
        assert not s["departs_from_haar_on_span"] and not s["departs_from_haar_off_shared"], site
        assert s["trace_z_on_span_ci"]["resampled"] == "pairs"
        assert "consistent with a Haar draw" in cb.reading(site, s)


def test_a_preserved_positional_code_is_found_and_explained(smoke_context):
    result = run(twins(smoke_context, [fixing_positional_code(10 + i) for i in range(3)]))
    cb = HaarDiagnosticsCallback()
    for site, s in result["per_site"].items():
        assert s["departs_from_haar_on_span"] and s["pooled_trace_z_on_span"] > 3, site
        assert not s["departs_from_haar_off_shared"], site
        assert "comes from the shared directions alone" in cb.reading(site, s)
    for row in result["rows"]:
        assert row["off_shared"]["excluded"] == K


def test_the_rank_deficient_site_is_diagnosed_on_its_span_only(smoke_context):
    result = run(twins(smoke_context, [haar_orthogonal(D, "O", seed=30)]))
    pre = [r for r in result["rows"] if r["site"] == "blocks.0.hook_resid_pre"]
    for row in pre:
        assert row["span_rank"] < D and row["determined"] is False
        assert all(row[k] is None for k in FULL_KEYS)  # never the arbitrary completion
        assert row["on_span"]["rank"] == row["span_rank"]
        assert row["off_shared"]["rank"] == row["span_rank"] - K
    s = result["per_site"]["blocks.0.hook_resid_pre"]
    assert "pooled_ks_p" not in s and s["trace_z_on_span_ci"] is None  # one pair
    report = HaarDiagnosticsCallback().report(smoke_context, result, [])
    assert "undetermined" in report and "not reported here" in report
    full = [r for r in result["rows"] if r["determined"]]
    assert full and all(r["on_span"]["trace_z"] == pytest.approx(r["trace_z"]) for r in full)


def test_off_shared_at_full_rank_is_the_complement_test():
    r = haar_orthogonal(D, "O", seed=3)
    shared = torch.eye(D, dtype=torch.float64)[:, :K]
    mine = off_shared_diagnostics(r, torch.eye(D, dtype=torch.float64), shared, "O", 200)
    theirs = complement_diagnostics(r, shared, haar_null(D - K, "O", 200))
    assert mine["rank"] == D - K and mine["trace"] == pytest.approx(theirs.trace)
    assert mine["trace_z"] == pytest.approx(theirs.trace_z)
    assert mine["trace_p"] == pytest.approx(theirs.trace_p)


def test_a_family_without_shared_directions_has_no_off_shared_statistic(lm_analysis):
    results, _ = lm_analysis
    assert all(r["off_shared"] is None for r in results["haar"]["rows"])
    assert results["haar"]["shared_directions"] is None
    report = (lm_analysis[1] / "report.md").read_text()
    assert "shares no residual directions by construction" in report


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_boot"):
        HaarDiagnosticsCallback(n_boot=5)
