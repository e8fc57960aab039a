"""Generalised Procrustes on planted rotations: recovery, two seeds, scales, monotonicity, input."""

from __future__ import annotations

import itertools

import pytest
import torch

from polymorph.align.consensus import Consensus, ScaledRotation, fit_consensus
from polymorph.align.haar import haar_orthogonal
from polymorph.align.procrustes import Rotation, fit_rotation

D, N = 24, 3000


def _base(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    """Anisotropic activations with a non-zero mean, like a residual stream."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales + torch.linspace(-2, 3, d)


def _planted(n_seeds: int, noise: float, *, sizes=None, group: str = "O", seed: int = 0):
    """Seed i sees ``c_i * x Q_i + offset_i + noise``: Q_i Haar, one shared x."""
    x = _base(seed=seed)
    g = torch.Generator().manual_seed(500 + seed)
    qs, acts = [], []
    for i in range(n_seeds):
        q = haar_orthogonal(D, group, seed=100 * seed + i)
        c = 1.0 if sizes is None else sizes[i]
        offset = torch.randn(D, generator=g, dtype=torch.float64)
        acts.append(c * x @ q + offset + noise * torch.randn(N, D, generator=g,
                                                             dtype=torch.float64))
        qs.append(q)
    return acts, qs


def _pair_error(result: Consensus, qs, a: int, b: int) -> float:
    """Frobenius distance of the implied a -> b map from the planted Q_a^T Q_b."""
    return float(torch.linalg.norm(result.pairwise_map(a, b).matrix - qs[a].T @ qs[b]))


def test_recovers_planted_rotations_up_to_one_global_rotation():
    acts, qs = _planted(5, noise=0.0)
    exact = fit_consensus(acts)
    assert exact.converged and exact.n_iter <= 2
    assert max(_pair_error(exact, qs, a, b) for a, b in itertools.permutations(range(5), 2)) < 1e-9
    assert exact.residual_fraction < 1e-12

    acts, qs = _planted(5, noise=0.02)
    noisy = fit_consensus(acts)
    assert noisy.converged and noisy.n_seeds == 5 and not noisy.is_pairwise
    pairs = list(itertools.permutations(range(5), 2))
    errors = [_pair_error(noisy, qs, a, b) for a, b in pairs]
    assert max(errors) < 0.1
    # The consensus pools all five seeds, so its implied maps are at least as accurate as direct
    # pairwise fits on the same data; only slightly (measured mean error 0.0278 vs 0.0279),
    # since each map still carries its own seed's noise.
    direct = [float(torch.linalg.norm(fit_rotation(acts[a], acts[b]).matrix - qs[a].T @ qs[b]))
              for a, b in pairs]
    assert sum(errors) < sum(direct)
    # Each map sends its seed into the reference frame: the aligned seeds agree with seed 0.
    for i in range(5):
        assert isinstance(noisy.maps[i], Rotation)
        resid = noisy.maps[i].apply(acts[i]) - noisy.consensus
        assert float(resid.pow(2).mean()) < 4 * 0.02**2


def test_reference_gauge_and_consistency():
    acts, _ = _planted(4, noise=0.05)
    fits = {ref: fit_consensus(acts, reference=ref, tol=1e-13) for ref in (0, 2)}
    for ref, fit in fits.items():
        m = fit.maps[ref]
        torch.testing.assert_close(m.matrix, torch.eye(D, dtype=torch.float64), atol=1e-12,
                                   rtol=0)
        torch.testing.assert_close(m.apply(acts[ref]), acts[ref], atol=1e-10, rtol=0)
        assert all(torch.equal(mm.target_mean, acts[ref].mean(0)) for mm in fit.maps)
        # close to the reference seed's own activations (noise level), in its frame and mean
        assert float((fit.consensus - acts[ref]).pow(2).mean()) < 0.05**2
    # implied maps do not depend on the gauge (the two fits start from different seeds, so they
    # agree to the accuracy the stopping rule buys, not to rounding), and compose exactly
    for a, b in itertools.permutations(range(4), 2):
        torch.testing.assert_close(fits[0].pairwise_map(a, b).matrix,
                                   fits[2].pairwise_map(a, b).matrix, atol=1e-6, rtol=0)
    ab, bc, ac = (fits[0].pairwise_map(*p) for p in ((0, 1), (1, 3), (0, 3)))
    torch.testing.assert_close(bc.apply(ab.apply(acts[0])), ac.apply(acts[0]), atol=1e-10, rtol=0)
    # consensus in the frame of seed 2 = consensus of seed 0's gauge mapped into seed 2's frame
    moved = fits[0].pairwise_map(0, 2).apply(fits[0].consensus)
    torch.testing.assert_close(moved, fits[2].consensus, atol=1e-6, rtol=0)


@pytest.mark.parametrize("group", ["O", "SO"])
def test_two_seeds_is_pairwise_procrustes(group):
    acts, _ = _planted(2, noise=0.1, group="O", seed=3)
    result = fit_consensus(acts, group=group)
    assert result.is_pairwise and result.converged
    direct = fit_rotation(acts[1], acts[0], group=group)
    implied = result.pairwise_map(1, 0)
    torch.testing.assert_close(implied.matrix, direct.matrix, atol=1e-6, rtol=0)
    torch.testing.assert_close(implied.apply(acts[1]), direct.apply(acts[1]), atol=1e-6, rtol=0)
    if group == "SO":
        assert all(m.det == pytest.approx(1.0) for m in result.maps)
    # with scales too: the rotation is the pairwise one whatever the scales
    scaled = fit_consensus(acts, group=group, scale=True)
    torch.testing.assert_close(scaled.pairwise_map(1, 0).matrix, direct.matrix, atol=1e-6, rtol=0)


def test_one_seed_is_the_identity():
    acts, _ = _planted(1, noise=0.0)
    result = fit_consensus(acts)
    assert result.converged and result.n_iter == 0 and result.objective == ()
    torch.testing.assert_close(result.consensus, acts[0])
    assert result.maps[0].effective_rank() == D


def test_scale_recovers_planted_per_seed_scales():
    sizes = [1.0, 2.0, 0.5, 3.0]
    acts, qs = _planted(4, noise=0.01, sizes=sizes)
    result = fit_consensus(acts, scale=True)
    assert result.converged and result.scaled
    assert all(isinstance(m, ScaledRotation) for m in result.maps)
    # seed i is sizes[i] times bigger, so its map shrinks it by 1 / sizes[i] (reference: seed 0)
    torch.testing.assert_close(result.scales, 1.0 / torch.tensor(sizes, dtype=torch.float64),
                               atol=2e-3, rtol=0)
    assert result.maps[0].scale == pytest.approx(1.0)
    implied = result.pairwise_map(3, 1)
    assert implied.scale == pytest.approx(sizes[1] / sizes[3], rel=2e-3)
    assert float(torch.linalg.norm(implied.matrix - qs[3].T @ qs[1])) < 0.05
    torch.testing.assert_close(implied.inverse().apply(implied.apply(acts[3])), acts[3],
                               atol=1e-10, rtol=0)
    # without scales the same data fit worse
    assert fit_consensus(acts).residual_fraction > 10 * result.residual_fraction


@pytest.mark.parametrize("scale", [False, True])
def test_objective_is_non_increasing(scale):
    acts, _ = _planted(6, noise=0.8, sizes=[1.0, 1.3, 0.7, 1.0, 1.1, 0.9])
    result = fit_consensus(acts, scale=scale, tol=0.0, max_iter=25)
    obj = torch.tensor(result.objective)
    assert len(obj) >= 3 and result.n_iter == len(obj)
    assert bool((obj[1:] <= obj[:-1] * (1 + 1e-12)).all()), result.objective
    assert obj[-1] < obj[0]
    # the objective is what it claims: sum_i ||Z_i - Y||^2 in the Ten Berge normalisation
    total = sum(float((a - a.mean(0)).pow(2).sum()) for a in acts)
    assert result.residual_fraction == pytest.approx(float(obj[-1]) / total)


def test_float32_precision_agrees():
    acts, _ = _planted(3, noise=0.05)
    a = fit_consensus(acts)
    b = fit_consensus([x.float() for x in acts], precision="float32")
    assert b.consensus.dtype == torch.float32
    for i in range(3):
        torch.testing.assert_close(a.maps[i].matrix, b.maps[i].matrix, atol=1e-4, rtol=0)


def test_bad_input_is_named():
    x = _base()
    with pytest.raises(ValueError, match=r"acts\[2\] has shape \(2999, 24\).*\(3000, 24\)"):
        fit_consensus([x, x, x[:-1]])
    with pytest.raises(ValueError, match="under-determined"):
        fit_consensus([x[:24], x[:24]])
    with pytest.raises(ValueError, match="non-empty"):
        fit_consensus([])
    with pytest.raises(ValueError, match=r"acts\[1\] must be"):
        fit_consensus([x, x[0]])
    bad = x.clone()
    bad[5, 3] = float("nan")
    with pytest.raises(ValueError, match=r"acts\[1\].*NaN"):
        fit_consensus([x, bad])
    with pytest.raises(ValueError, match="reference"):
        fit_consensus([x, x], reference=2)
    with pytest.raises(ValueError, match="group"):
        fit_consensus([x, x], group="U")
    with pytest.raises(ValueError, match="precision"):
        fit_consensus([x, x], precision="half")
    with pytest.raises(ValueError, match="max_iter"):
        fit_consensus([x, x], max_iter=0)
    with pytest.raises(ValueError, match="scale"):
        ScaledRotation(matrix=torch.eye(2), scale=0.0, source_mean=torch.zeros(2),
                       target_mean=torch.zeros(2))


def test_rank_deficient_seed_warns():
    x = _base()
    flat = x.clone()
    flat[:, -3:] = 0.0  # confined to a subspace: the map is arbitrary on three directions
    with pytest.warns(UserWarning, match="rank 21"):
        fit_consensus([flat, flat @ haar_orthogonal(D, seed=1), flat @ haar_orthogonal(D, seed=2)])
