"""Near-fixed subspace under fit noise: a planted block is found where the noiseless tau misses it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from polymorph.align.fixed import (
    bootstrap_rotations,
    cross_moments,
    near_fixed_subspace,
)
from polymorph.align.haar import (
    _angles_and_vectors,
    haar_null,
    haar_orthogonal,
    haar_with_fixed_block,
)
from polymorph.align.procrustes import fit_rotation, procrustes_matrix, score_alignment
from polymorph.align.statistics import resample_counts

D, N = 64, 8000
NOISE = 0.1  # held-out rotated EV about 0.956 with this spectrum


def _planted(seed: int, k: int, noise: float = NOISE, n: int = N):
    """Activations with eigenvalues decaying geometrically from 1 to 0.01 in a random basis;
    target = source @ R_true + Gaussian noise, R_true fixing a random k-dim subspace. Returns fit
    rows, held-out rows and R_true."""
    g = torch.Generator().manual_seed(seed)
    basis = haar_orthogonal(D, "O", g)
    scales = torch.logspace(0, -2, D, dtype=torch.float64).sqrt()
    x = (torch.randn(2 * n, D, generator=g, dtype=torch.float64) * scales) @ basis.T + 0.5
    r_true = haar_with_fixed_block(D, k, "O", g)
    y = x @ r_true - 1.0 + noise * torch.randn(2 * n, D, generator=g, dtype=torch.float64)
    return x[:n], y[:n], x[n:], y[n:], r_true


@pytest.fixture(scope="module")
def null():
    return haar_null(D, "O", 256, seed=0)


def test_weighted_sufficient_statistics_equal_a_refit_on_the_resample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = x @ haar_orthogonal(5, seed=1) + 0.3 * torch.randn(300, 5, generator=g, dtype=torch.float64)
    groups = torch.arange(300) // 7 * 3 + 11  # arbitrary ids, uneven last group
    w = resample_counts(int(groups.unique().numel()), 3, seed=2)
    assert torch.equal(w.sum(1), torch.full((3,), float(groups.unique().numel()),
                                            dtype=torch.float64))
    for moments, unit_of_row in ((cross_moments(x, y, groups), torch.unique(groups,
                                                                            return_inverse=True)[1]),
                                 (cross_moments(x, y), torch.arange(300))):
        wr = resample_counts(moments.n_units, 3, seed=2)
        m = moments.centred_cross_covariance(wr)
        for b in range(3):
            rows = torch.repeat_interleave(torch.arange(300), wr[b][unit_of_row].long())
            direct = fit_rotation(x[rows], y[rows])
            torch.testing.assert_close(procrustes_matrix(m[b])[0], direct.matrix)


def test_planted_fixed_block_is_found_under_fit_noise_and_missed_by_the_noiseless_tau(null):
    """The acceptance test: k = 6 under realistic fit noise, two seeds."""
    for seed in (0, 1):
        x, y, x_new, y_new, r_true = _planted(seed, 6)
        rot = fit_rotation(x, y)
        ev = score_alignment(rot, x_new, y_new)["rotated_ev_standard"]
        assert 0.9 < ev < 0.97  # a realistic fit, not a noiseless one
        nf = near_fixed_subspace(x, y, rot, null, n_boot=24, seed=seed)
        assert nf.dim_estimate in (5, 6, 7), nf.to_dict()
        assert nf.noiseless_estimate <= 4  # the noiseless tau (0.0027 rad) misses the block
        assert nf.threshold > 3 * nf.noiseless_threshold
        assert nf.count == sum(a <= nf.threshold for a in nf.eigen_angles)
        assert nf.expected_free == pytest.approx(null.expected_free_below(nf.threshold))
        # the reported subspace is the planted one, up to the fit noise
        true_angles, true_vecs = _angles_and_vectors(r_true)
        fixed = true_vecs[:, true_angles < 1e-6]
        overlap = float(torch.linalg.matrix_norm(nf.basis.T @ fixed) ** 2)
        assert overlap > fixed.shape[1] - 0.5
        json.dumps(nf.to_dict(include_angles=True))


def test_pure_haar_map_reports_no_fixed_subspace(null):
    for seed in (2, 3):
        x, y, *_ = _planted(seed, 0)
        nf = near_fixed_subspace(x, y, fit_rotation(x, y), null, n_boot=24, seed=seed)
        assert nf.dim_estimate in (0, 1), nf.to_dict()


def test_sequence_bootstrap_and_noiseless_fit(null):
    x, y, *_ = _planted(4, 6, n=4000)
    groups = torch.arange(4000) // 25  # 160 sequences of 25 rows
    rot = fit_rotation(x, y)
    nf = near_fixed_subspace(x, y, rot, null, n_boot=24, seed=4, groups=groups)
    assert nf.bootstrap.unit == "sequence" and nf.bootstrap.n_units == 160
    assert nf.dim_estimate in (5, 6, 7)
    # no noise: every resample refits R exactly, tau collapses to the exactness floor
    x, _, _, _, r_true = _planted(5, 6, noise=0.0, n=1000)
    exact = fit_rotation(x, x @ r_true)
    nf = near_fixed_subspace(x, x @ r_true, exact, null, n_boot=4, seed=0)
    assert nf.threshold == pytest.approx(1e-6) and nf.dim_estimate == 6


def test_noise_angles_of_the_bootstrap_scale_with_the_noise():
    medians = []
    for noise in (0.05, 0.2):
        x, y, *_ = _planted(6, 0, noise=noise, n=2000)
        rot = fit_rotation(x, y)
        boot = bootstrap_rotations(x, y, rot, n_boot=8, seed=0)
        assert boot.rotations.shape == (8, D, D) and boot.noise_angles.shape == (8, D)
        medians.append(float(boot.noise_angles.median()))
    assert medians[1] / medians[0] == pytest.approx(4.0, rel=0.25)  # angles ~ noise / sqrt(n)


def test_bad_arguments_are_rejected(null):
    x, y, *_ = _planted(7, 0, n=200)
    rot = fit_rotation(x, y)
    with pytest.raises(ValueError, match="quantile"):
        near_fixed_subspace(x, y, rot, null, quantile=1.0)
    with pytest.raises(ValueError, match="factor"):
        near_fixed_subspace(x, y, rot, null, factor=0.0)
    with pytest.raises(ValueError, match="groups"):
        near_fixed_subspace(x, y, rot, null, groups=torch.zeros(3))
    with pytest.raises(ValueError, match="haar_null"):
        near_fixed_subspace(x, y, rot, haar_null(D, "SO", 20))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_rotations(x, y, rot, n_boot=1)
    assert math.isfinite(near_fixed_subspace(x, y, rot, null, n_boot=4).threshold)
