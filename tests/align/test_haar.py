"""Haar diagnostics: calibrated on Haar draws, with power against a planted fixed subspace."""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest
import torch

from polymorph.align.haar import (
    _draw,
    compressed_trace_moments,
    diagnose,
    diagnose_many,
    eigen_angles,
    exact_trace_moments,
    forced_fixed,
    haar_null,
    haar_orthogonal,
    haar_with_fixed_block,
    pooled_trace_z,
    simulate_haar_null,
    trace_zscore,
)

ALPHA = 0.05
N_DRAWS = 40
# Null sizes for tests: enough for p-values at alpha 0.05 (resolution 1/(n+1)), cheap at d=512.
NULL_SAMPLES = {64: 400, 512: 64}


def _binomial_upper(n: int, p: float, tail: float = 0.005) -> int:
    """Smallest k with P(Bin(n, p) > k) < tail."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += comb(n, k) * p**k * (1 - p) ** (n - k)
        if 1 - cdf < tail:
            return k
    return n


@pytest.fixture(scope="module", params=[64, 512])
def calibration(request):
    """Diagnostics of N_DRAWS Haar draws independent of the null, and of a planted block of 8."""
    d = request.param
    null = haar_null(d, "O", NULL_SAMPLES[d], seed=0)
    g = torch.Generator().manual_seed(12345)
    draws = [diagnose(haar_orthogonal(d, "O", g), null) for _ in range(N_DRAWS)]
    planted = diagnose(haar_with_fixed_block(d, 8, "O", seed=99), null)
    return d, null, draws, planted


def test_haar_draws_are_orthogonal_and_cover_both_determinants():
    qs = haar_orthogonal(16, "O", seed=0, batch=40)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(qs.transpose(-1, -2) @ qs, eye.expand(40, 16, 16), atol=1e-12)
    dets = torch.linalg.det(qs)
    assert (dets > 0).any() and (dets < 0).any()
    so = haar_orthogonal(16, "SO", seed=0, batch=40)
    assert torch.allclose(torch.linalg.det(so), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(haar_orthogonal(5, seed=3), haar_orthogonal(5, seed=3))


def test_eigen_angles_match_a_general_eigensolver():
    for d, group, seed in ((9, "O", 0), (9, "O", 1), (10, "O", 2), (10, "O", 5), (10, "SO", 1)):
        r = haar_orthogonal(d, group, seed=seed)
        expected = np.sort(np.abs(np.angle(np.linalg.eigvals(r.numpy()))))
        np.testing.assert_allclose(eigen_angles(r).numpy(), expected, atol=1e-7)


def test_forced_fixed_rule_matches_the_spectrum():
    for d in (7, 8):
        for group in ("O", "SO"):
            for seed in range(6):
                r = haar_orthogonal(d, group, seed=seed)
                n_fixed = int((eigen_angles(r) < 1e-6).sum())
                assert n_fixed == forced_fixed(d, float(torch.linalg.det(r)))


def test_null_trace_has_haar_moments():
    null = simulate_haar_null(64, "O", 800, seed=1)
    assert abs(null.trace_mean) < 4 / np.sqrt(800)  # E tr = 0
    assert abs(null.trace_std - 1.0) < 0.1  # Var tr = 1
    assert null.pooled_angles.shape == (800 * 64,)
    assert null.angles.min() >= 0 and null.angles.max() <= np.pi
    assert abs(null.fixed_expected - 0.05) < 0.02
    # SO(d) of odd d always fixes a direction.
    so_odd = simulate_haar_null(9, "SO", 400, seed=1)
    assert np.all(so_odd.angles[:, 0] < 1e-6) and np.all(so_odd.dets == 1)


def test_determinants_without_lu_are_exact():
    for d in (1, 2, 7, 8, 33):
        q, det = _draw(d, "O", torch.Generator().manual_seed(d), batch=30)
        torch.testing.assert_close(det, torch.linalg.det(q))
        assert (det > 0).any() or d == 1


def test_null_is_cached_and_read_only():
    a = haar_null(32, "SO", 50, seed=4)
    assert haar_null(32, "SO", 50, seed=4) is a
    with pytest.raises(ValueError):
        a.traces[0] = 1.0


def test_trace_and_ks_false_positive_rate_on_haar_draws(calibration):
    d, _, draws, _ = calibration
    upper = _binomial_upper(N_DRAWS, ALPHA)  # 6 of 40
    trace_rejections = sum(x.trace_p < ALPHA for x in draws)
    ks_rejections = sum(x.ks_p < ALPHA for x in draws)
    assert trace_rejections <= upper, f"d={d}: trace test rejected {trace_rejections}/40"
    assert ks_rejections <= upper, f"d={d}: KS test rejected {ks_rejections}/40"
    # p-values of a calibrated test are uniform: mean 0.5 (std of a mean of 40 is 0.046).
    assert abs(np.mean([x.trace_p for x in draws]) - 0.5) < 0.15
    # Haar angles repel, so the KS test is conservative: p-values pile up near 1.
    assert np.median([x.ks_p for x in draws]) > 0.5
    assert all(abs(x.frob_ratio - 1) < 4 / d for x in draws)  # ||R-I|| ~ sqrt(2d)
    assert sum(x.fixed_dim_estimate > 0 for x in draws) <= upper


def test_planted_fixed_block_is_flagged_by_trace(calibration):
    _, null, _, planted = calibration
    assert planted.trace_p < ALPHA and planted.trace_z > 4
    # tr = 8 + tr(Haar part on d - 8 dims), the latter a typical null trace
    assert abs(planted.trace - 8 - null.trace_mean) < 4 * null.trace_std
    assert planted.fixed_dim_estimate in (7, 8, 9)  # +-1: the Haar part's parity-forced +1
    assert planted.frob_ratio < 1


def test_fixed_projector_spans_the_planted_subspace():
    d, k = 64, 5
    p = haar_orthogonal(d, "O", seed=21)
    block = torch.eye(d, dtype=torch.float64)
    block[k:, k:] = haar_orthogonal(d - k, "SO", seed=22)
    r = p @ block @ p.T
    null = haar_null(d, "SO", NULL_SAMPLES[d], seed=0)
    diag = diagnose(r, null)
    fixed = p[:, :k]  # the planted fixed directions
    assert diag.fixed_count >= k
    proj = diag.fixed_projector
    torch.testing.assert_close(proj @ fixed, fixed, atol=1e-8, rtol=0)
    torch.testing.assert_close(proj @ proj, proj, atol=1e-10, rtol=0)
    torch.testing.assert_close(fixed @ fixed.T @ r, fixed @ fixed.T, atol=1e-10, rtol=0)


def test_identity_is_maximally_non_haar():
    null = haar_null(64, "O", NULL_SAMPLES[64], seed=0)
    diag = diagnose(torch.eye(64), null)
    assert diag.frob_dist == 0 and diag.trace == 64
    assert diag.trace_p == pytest.approx(1 / (null.n_samples + 1))
    assert diag.fixed_dim_estimate == 64 and diag.ks_p < 1e-6


def test_diagnose_many_pools_and_serialises():
    null = haar_null(64, "O", NULL_SAMPLES[64], seed=0)
    rs = [haar_orthogonal(64, "O", seed=s) for s in range(200, 208)]
    many = diagnose_many(rs, null)
    assert len(many.per_matrix) == 8 and 0 <= many.pooled_ks_p <= 1
    # exact Haar moments (0, 1): the pooled z is the sum of traces over sqrt(k)
    expected_z = sum(m.trace for m in many.per_matrix) / 8**0.5
    assert many.pooled_trace_z == pytest.approx(expected_z)
    assert many.pooled_trace_z == pytest.approx(pooled_trace_z([m.trace for m in many.per_matrix],
                                                               64, "O"))
    planted = diagnose_many([haar_with_fixed_block(64, 3, seed=s) for s in range(8)], null)
    assert planted.pooled_trace_p < 1e-6  # 8 matrices x 3 fixed dims: the pooled trace sees it
    text = json.dumps(many.to_dict(include_angles=True))
    assert "pooled_ks_p" in text
    json.dumps(diagnose(rs[0], null).to_dict(include_basis=True))


def test_bad_matrices_are_rejected():
    null = haar_null(8, "SO", 50, seed=0)
    with pytest.raises(ValueError, match="not orthogonal"):
        diagnose(torch.ones(8, 8), null)
    with pytest.raises(ValueError, match="8-d"):
        diagnose(torch.eye(9), null)
    with pytest.raises(ValueError, match="square"):
        diagnose(torch.zeros(8, 4), null)
    reflect = torch.diag(torch.tensor([-1.0] + [1.0] * 7))
    with pytest.raises(ValueError, match="haar_null"):
        diagnose(reflect, null)
    with pytest.raises(ValueError, match="NaN"):
        diagnose(torch.full((8, 8), float("nan")), null)
    with pytest.raises(ValueError, match="at least one"):
        diagnose_many([], null)
    with pytest.raises(ValueError, match="group"):
        haar_orthogonal(4, "U")


@pytest.mark.parametrize(("d", "group"), [(1, "O"), (1, "SO"), (2, "O"), (2, "SO"), (3, "O"),
                                          (3, "SO"), (4, "SO"), (5, "O")])
def test_exact_trace_moments_match_simulation_at_small_d(d, group):
    n = 20_000
    q = haar_orthogonal(d, group, seed=10 * d + len(group), batch=n)
    tr = q.diagonal(dim1=-2, dim2=-1).sum(-1)
    mean, var = exact_trace_moments(d, group)
    expected = {(1, "O"): (0, 1), (1, "SO"): (1, 0), (2, "O"): (0, 1), (2, "SO"): (0, 2)}
    assert (mean, var) == expected.get((d, group), (0, 1))
    assert abs(float(tr.mean()) - mean) < 4 * max(var, 1e-12) ** 0.5 / n**0.5
    assert float(tr.var()) == pytest.approx(var, abs=0.05)


@pytest.mark.parametrize(("d", "r", "group"), [(8, 3, "O"), (5, 2, "O"), (3, 2, "SO"),
                                               (2, 1, "SO"), (2, 2, "SO"), (2, 1, "O")])
def test_compressed_trace_moments_match_simulation(d, r, group):
    """tr(B^T R B) for a fixed random basis B (not coordinate axes) has mean 0 and var r/d."""
    n = 20_000
    q = haar_orthogonal(d, group, seed=d + r, batch=n)
    b = haar_orthogonal(d, "O", seed=99)[:, :r]
    t = torch.einsum("ia,nij,ja->n", b, q, b)
    mean, var = compressed_trace_moments(d, r, group)
    assert var == (2.0 if (d, r, group) == (2, 2, "SO") else r / d)
    assert abs(float(t.mean()) - mean) < 4 * var**0.5 / n**0.5
    assert float(t.var()) == pytest.approx(var, rel=0.05)


@pytest.mark.parametrize(("d", "n"), [(8, 10_000), (64, 4_000)])
def test_exact_trace_z_is_standard_normal_on_haar_draws(d, n):
    q = haar_orthogonal(d, "O", seed=d, batch=n)
    z = trace_zscore(q.diagonal(dim1=-2, dim2=-1).sum(-1), d, "O")
    assert abs(float(z.mean())) < 3 / n**0.5
    assert float(z.std()) == pytest.approx(1.0, rel=0.03)


def test_diagnose_uses_exact_moments_and_keeps_the_simulated_ones():
    null = haar_null(64, "O", NULL_SAMPLES[64], seed=0)
    r = haar_with_fixed_block(64, 2, seed=5)
    diag = diagnose(r, null)
    assert diag.trace_z == pytest.approx(diag.trace)  # (tr - 0) / sqrt(1)
    assert (diag.trace_exact_mean, diag.trace_exact_var) == (0.0, 1.0)
    assert (diag.trace_mc_mean, diag.trace_mc_std) == (null.trace_mean, null.trace_std)
    assert null.exact_trace_var == 1.0 and abs(null.trace_std - 1) < 0.15
    so2 = diagnose(haar_orthogonal(2, "SO", seed=1), haar_null(2, "SO", 50))
    assert so2.trace_z == pytest.approx(so2.trace / 2**0.5)
    assert np.isnan(diagnose(torch.eye(1), haar_null(1, "SO", 10)).trace_z)
    assert json.loads(json.dumps(diag.to_dict()))["trace_exact_var"] == 1.0


def test_expected_free_below_any_threshold():
    null = haar_null(64, "O", NULL_SAMPLES[64], seed=0)
    assert null.expected_free_below(null.fixed_threshold) == pytest.approx(null.fixed_expected)
    assert null.expected_free_below(0.0) == 0.0
    assert null.expected_free_below(np.pi + 1) == pytest.approx(64 - (null.dets < 0).mean())
    # O(2m): half the draws are SO(2m), whose angle density at 0 is twice the bulk d / pi, so
    # the expected count grows like (d / pi) tau for small tau.
    tau = 0.02
    assert null.expected_free_below(tau) == pytest.approx(64 / np.pi * tau, rel=0.35)
    assert null.compressed_traces(64) == pytest.approx(null.traces)
    assert abs(null.compressed_traces(16).var() - 16 / 64) < 0.05
