"""Span- and complement-restricted trace tests: calibrated on Haar, blind to the arbitrary part."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from polymorph.align.haar import diagnose, haar_null, haar_orthogonal
from polymorph.align.procrustes import fit_rotation
from polymorph.align.span import (
    activation_span,
    complement_basis,
    complement_diagnostics,
    span_diagnostics,
)

D = 64


def _confined(n: int, basis: torch.Tensor, seed: int) -> torch.Tensor:
    """Anisotropic rows living in span(basis), plus an offset (which centring removes)."""
    g = torch.Generator().manual_seed(seed)
    r = basis.shape[1]
    z = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.logspace(0, -1, r,
                                                                             dtype=torch.float64)
    return z @ basis.T + torch.linspace(-1, 1, basis.shape[0], dtype=torch.float64)


def test_activation_span_finds_the_planted_subspace_and_matches_effective_rank():
    basis = haar_orthogonal(D, "O", seed=1)[:, :12]
    x = _confined(2000, basis, seed=2)
    span = activation_span(x)
    assert span.shape == (D, 12)
    torch.testing.assert_close(span @ span.T, basis @ basis.T, atol=1e-10, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rot = fit_rotation(x, x @ haar_orthogonal(D, "O", seed=3))
    assert rot.effective_rank() == span.shape[1]
    full = torch.randn(500, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert activation_span(full).shape == (D, D)


def test_span_z_is_standard_normal_for_haar_rotations():
    """Fixed 12-d span, 2,000 Haar draws: tr(B^T R B) has mean 0 and variance 12/64 exactly."""
    n, r = 2000, 12
    b = haar_orthogonal(D, "O", seed=5)[:, :r]
    qs = haar_orthogonal(D, "O", seed=6, batch=n)
    t = torch.einsum("ia,nij,ja->n", b, qs, b)
    z = t / math.sqrt(r / D)
    assert abs(float(z.mean())) < 3 / math.sqrt(n)
    assert float(z.std()) == pytest.approx(1.0, rel=0.05)
    null = haar_null(D, "O", 400, seed=0)
    diags = [span_diagnostics(q, b, null) for q in qs[:40]]
    np.testing.assert_allclose([x.trace_z for x in diags], z[:40].numpy(), atol=1e-10)
    assert abs(np.mean([x.trace_p for x in diags]) - 0.5) < 0.15  # uniform p-values
    assert abs(np.mean([x.retained for x in diags]) - r / D) < 0.05
    assert all(abs(x.frob_ratio_on_span - 1) < 0.3 for x in diags)


def test_full_span_reduces_to_the_full_trace_test():
    null = haar_null(D, "O", 400, seed=0)
    x = torch.randn(800, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    q = haar_orthogonal(D, "O", seed=8)
    rot = fit_rotation(x, x @ q)
    on_span = span_diagnostics(rot.matrix, activation_span(x), null)
    full = diagnose(rot.matrix, null)
    assert on_span.rank == D and on_span.retained == pytest.approx(1.0)
    assert on_span.trace_z == pytest.approx(full.trace_z)
    assert on_span.trace_p == pytest.approx(full.trace_p)
    assert on_span.frob_dist_on_span == pytest.approx(full.frob_dist, rel=1e-9)


def test_identity_on_the_span_is_flagged_whatever_the_completion():
    """Data in a 12-d span S, R = I on S and a trace -12 rotation elsewhere: the full matrix
    looks Haar (trace 0, ||R - I|| = sqrt(2d)), the span diagnostics see R = I on all data."""
    r_span = 12
    p = haar_orthogonal(D, "O", seed=9)
    s_basis, c_basis = p[:, :r_span], p[:, r_span:]
    theta = math.acos(-r_span / (D - r_span))  # 26 planes of angle theta: trace -12
    block = torch.zeros(D - r_span, D - r_span, dtype=torch.float64)
    for i in range(0, D - r_span, 2):
        block[i:i + 2, i:i + 2] = torch.tensor([[math.cos(theta), -math.sin(theta)],
                                                [math.sin(theta), math.cos(theta)]],
                                               dtype=torch.float64)
    r = s_basis @ s_basis.T + c_basis @ block @ c_basis.T
    null = haar_null(D, "O", 400, seed=0)
    full = diagnose(r, null)
    assert abs(full.trace_z) < 1e-9 and full.frob_ratio == pytest.approx(1.0)
    assert full.trace_p > 0.5

    x = _confined(3000, s_basis, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fitted = fit_rotation(x, x @ r)  # = I on S, whatever the SVD puts elsewhere
    for matrix in (r, fitted.matrix):
        on_span = span_diagnostics(matrix, activation_span(x), null)
        assert on_span.rank == r_span and on_span.trace == pytest.approx(r_span)
        assert on_span.trace_z == pytest.approx(math.sqrt(r_span * D))  # 27.7
        assert on_span.trace_p == pytest.approx(1 / 401)
        assert on_span.frob_dist_on_span < 1e-6 and on_span.retained == pytest.approx(1.0)
    json.dumps(on_span.to_dict())


def test_complement_of_a_fixed_block_is_haar():
    """R = I on a planted 6-d block E, Haar on its complement: full z ~ 6, complement z ~ N(0,1)."""
    k, n = 6, 120
    null_c = haar_null(D - k, "O", 200, seed=0)
    full_null = haar_null(D, "O", 400, seed=0)
    g = torch.Generator().manual_seed(11)
    hs = haar_orthogonal(D - k, "O", g, batch=n)
    full_z, comp_z, comp_p = [], [], []
    for h in hs:
        p = haar_orthogonal(D, "O", g)
        e, c = p[:, :k], p[:, k:]
        r = e @ e.T + c @ h @ c.T
        full_z.append(diagnose(r, full_null).trace_z)
        # exclude given as non-orthonormal vectors spanning E (like positional code rows)
        vectors = e @ torch.randn(k, 40, generator=g, dtype=torch.float64)
        comp = complement_diagnostics(r, vectors, null_c)
        assert comp.rank == D - k and comp.null == "haar_on_complement"
        comp_z.append(comp.trace_z)
        comp_p.append(comp.trace_p)
    assert np.mean(full_z) == pytest.approx(k, abs=3 / math.sqrt(n))
    assert abs(np.mean(comp_z)) < 3 / math.sqrt(n)
    assert np.std(comp_z) == pytest.approx(1.0, rel=0.15)
    assert np.mean(np.asarray(comp_p) < 0.05) < 0.1
    np.testing.assert_allclose(comp_z, hs.diagonal(dim1=-2, dim2=-1).sum(-1).numpy(), atol=1e-9)


def test_complement_sees_an_excess_outside_the_excluded_block():
    k, extra = 6, 4
    p = haar_orthogonal(D, "O", seed=12)
    block = torch.eye(D, dtype=torch.float64)
    block[k + extra:, k + extra:] = haar_orthogonal(D - k - extra, "O", seed=13)
    r = p @ block @ p.T  # fixes E (first 6 columns of p) and 4 more directions
    comp = complement_diagnostics(r, p[:, :k], haar_null(D - k, "O", 200, seed=0))
    assert comp.trace_z > extra - 3
    assert comp.trace_z == pytest.approx(float(torch.trace(block[k:, k:])))


def test_positional_code_complement_and_bad_input():
    code = torch.zeros(D, 64, dtype=torch.float64)  # dims 0..5 only, like the toy's code
    code[:6] = torch.randn(6, 64, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    c = complement_basis(code)
    assert c.shape == (D, D - 6)
    assert c[:6].abs().max() < 1e-12
    null = haar_null(D, "O", 50, seed=0)
    with pytest.raises(ValueError, match="haar_null\\(58"):
        complement_diagnostics(torch.eye(D), code, null)
    with pytest.raises(ValueError, match="orthonormal"):
        span_diagnostics(torch.eye(D), torch.ones(D, 2), null)
    with pytest.raises(ValueError, match="basis must be"):
        span_diagnostics(torch.eye(D), torch.ones(D - 1, 2), null)
    with pytest.raises(ValueError, match="not orthogonal"):
        span_diagnostics(torch.ones(D, D), c, null)
