"""Drift summaries: the span-restricted distance ignores directions the data never visits."""

from __future__ import annotations

import warnings

import pytest
import torch

from polymorph.align.drift import frob_dist_on_span, rotation_summary
from polymorph.align.haar import haar_orthogonal
from polymorph.align.procrustes import fit_rotation


def test_frob_on_span_ignores_unobserved_directions():
    g = torch.Generator().manual_seed(0)
    low = torch.zeros(400, 8, dtype=torch.float64)
    low[:, :3] = torch.randn(400, 3, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        same = fit_rotation(low, low)
    dist, rank = frob_dist_on_span(same, low)
    assert rank == 3 and dist < 1e-9

    full = torch.randn(400, 8, generator=g, dtype=torch.float64)
    q = haar_orthogonal(8, "O", seed=3)
    rot = fit_rotation(full, full @ q)
    dist, rank = frob_dist_on_span(rot, full)
    assert rank == 8
    assert dist == pytest.approx(float(torch.linalg.norm(q - torch.eye(8, dtype=q.dtype))),
                                 rel=1e-6)


def test_rotation_summary_of_a_planted_rotation_and_of_a_rank_deficient_identity():
    g = torch.Generator().manual_seed(1)
    d = 16
    x_fit = torch.randn(600, d, generator=g, dtype=torch.float64)
    x_score = torch.randn(600, d, generator=g, dtype=torch.float64)
    q = haar_orthogonal(d, "O", seed=2)
    summary, rot = rotation_summary(x_fit, x_fit @ q, x_score, x_score @ q, "O", n_null=100)
    torch.testing.assert_close(rot.matrix, q)
    assert summary["span_rank"] == d
    assert summary["rotated_ev_standard"] == pytest.approx(1.0)
    assert summary["frob_dist_on_span"] == pytest.approx(summary["frob_dist"], rel=1e-9)
    assert summary["trace_z_on_span"] == pytest.approx(summary["trace_z"])
    assert summary["trace_z"] == pytest.approx(float(torch.trace(q)))  # exact moments (0, 1)

    low_fit, low_score = x_fit.clone(), x_score.clone()
    low_fit[:, 5:] = 0.0
    low_score[:, 5:] = 0.0
    summary, _ = rotation_summary(low_fit, low_fit, low_score, low_score, "SO", n_null=100)
    assert summary["span_rank"] == 5
    assert summary["frob_dist_on_span"] < 1e-9 and summary["frob_ratio_on_span"] < 1e-9
    assert summary["trace_on_span"] == pytest.approx(5.0)
    assert summary["trace_z_on_span"] == pytest.approx((5 * d) ** 0.5)  # 5 / sqrt(5 / 16)
    assert summary["rotated_ev_standard"] == pytest.approx(1.0)
