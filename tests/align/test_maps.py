import pytest
import torch

from polymorph.align.haar import haar_orthogonal
from polymorph.align.maps import (
    MAP_FAMILIES,
    fit_map,
    fit_rank_corrected,
    fit_rank_corrected_maps,
    linear_cka,
    score_map,
)


def _data(n=4000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d) + 3.0
    return x, g


def test_non_orthogonal_planted_map_needs_the_linear_family():
    x, _ = _data()
    u, v = haar_orthogonal(16, "O", seed=1).double(), haar_orthogonal(16, "O", seed=2).double()
    a = u @ torch.diag(torch.linspace(0.5, 2.0, 16, dtype=torch.float64)) @ v.T
    assert torch.linalg.cond(a) == pytest.approx(4.0)  # well conditioned, far from orthogonal
    y = x @ a
    fit_x, fit_y, ev_x, ev_y = x[:2000], y[:2000], x[2000:], y[2000:]
    ev = {f: score_map(fit_map(fit_x, fit_y, f), ev_x, ev_y)["ev_standard"] for f in MAP_FAMILIES}
    assert ev["linear"] == pytest.approx(1.0, abs=1e-9)
    assert ev["affine"] == pytest.approx(1.0, abs=1e-9)
    assert ev["orthogonal"] < 0.95


def test_rotation_is_reached_by_every_family_but_identity():
    x, _ = _data()
    q = haar_orthogonal(16, "SO", seed=3).double()
    y = x @ q
    fit_x, fit_y, ev_x, ev_y = x[:2000], y[:2000], x[2000:], y[2000:]
    for family in MAP_FAMILIES:
        ev = score_map(fit_map(fit_x, fit_y, family), ev_x, ev_y)["ev_standard"]
        if family == "identity":
            assert ev < 0.9
        else:
            assert ev == pytest.approx(1.0, abs=1e-9), family


def test_scaled_orthogonal_recovers_a_global_scale():
    x, _ = _data()
    q = haar_orthogonal(16, "O", seed=4).double()
    y = 2.5 * x @ q
    fitted = fit_map(x, y, "scaled_orthogonal")
    assert torch.linalg.norm(fitted.matrix - 2.5 * q) < 1e-8
    assert score_map(fit_map(x, y, "orthogonal"), x, y)["ev_standard"] < 0.9


def test_rank_corrected_map_finds_a_planted_low_rank_part():
    # target = a scaled rotation of the source plus a rank-2 linear part: the scaled rotation
    # alone misses it, a rank-1 correction part of it, rank 2 all of it (held out)
    x, g = _data()
    q = haar_orthogonal(16, "O", seed=6).double()
    u = torch.randn(16, 2, generator=g, dtype=torch.float64)
    v = torch.randn(16, 2, generator=g, dtype=torch.float64)
    y = x @ (1.7 * q + 0.3 * u @ v.T) - 4.0
    fit_x, fit_y, ev_x, ev_y = x[:2000], y[:2000], x[2000:], y[2000:]
    ev = {k: score_map(fit_rank_corrected(fit_x, fit_y, k), ev_x, ev_y)["ev_standard"]
          for k in (0, 1, 2, 16)}
    scaled = score_map(fit_map(fit_x, fit_y, "scaled_orthogonal"), ev_x, ev_y)["ev_standard"]
    assert ev[0] == pytest.approx(scaled, abs=1e-12) and ev[0] < 0.9
    assert ev[0] < ev[1] < 1.0 - 1e-3
    # the joint fit alternates to a tolerance of 1e-8 of the variance: 1 up to about that
    assert ev[2] == pytest.approx(1.0, abs=1e-6) and ev[16] == pytest.approx(1.0, abs=1e-9)


def test_several_ranks_at_once_match_each_rank_alone():
    # the callback fits its ranks together, each warm-started from the rank below: the same
    # maps as fitting every rank from scratch (to the alternation's stopping tolerance, set
    # tight here: at the default 1e-8 of the variance the two stop ~1e-5 EV apart)
    x, g = _data()
    y = torch.tanh(x @ torch.randn(16, 16, generator=g, dtype=torch.float64) / 8)
    fit_x, fit_y, ev_x, ev_y = x[:2000], y[:2000], x[2000:], y[2000:]
    together = fit_rank_corrected_maps(fit_x, fit_y, [4, 1, 2], max_iter=5000, tol=1e-12)
    assert sorted(together) == [1, 2, 4]
    for k, fitted in together.items():
        alone = fit_rank_corrected(fit_x, fit_y, k, max_iter=5000, tol=1e-12)
        assert score_map(fitted, ev_x, ev_y)["ev_standard"] == pytest.approx(
            score_map(alone, ev_x, ev_y)["ev_standard"], abs=1e-6), k
    with pytest.raises(ValueError, match="max_iter"):
        fit_rank_corrected_maps(fit_x, fit_y, [1], max_iter=0)


def test_full_rank_correction_is_the_affine_map():
    x, g = _data()
    y = torch.tanh(x @ torch.randn(16, 16, generator=g, dtype=torch.float64) / 8)  # not linear
    full = fit_rank_corrected(x, y, 16)
    assert fit_rank_corrected(x, y, 15).matrix.shape == (16, 16)
    affine = fit_map(x, y, "affine")
    assert torch.allclose(full.matrix, affine.matrix, atol=1e-9)
    assert torch.allclose(full.apply(x), affine.apply(x), atol=1e-9)
    for bad in (-1, 17, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            fit_rank_corrected(x, y, bad)


def test_cka_invariances():
    x, g = _data(n=1000)
    q = haar_orthogonal(16, "O", seed=5).double()
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)
    other = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    assert linear_cka(x, other) < 0.2


def test_bad_input_is_refused():
    x, _ = _data(n=10)
    with pytest.raises(ValueError, match="under-determined"):
        fit_map(x, x, "linear")
    big, _ = _data(n=100)
    with pytest.raises(ValueError, match="unknown map family"):
        fit_map(big, big, "quadratic")
    with pytest.raises(ValueError, match="matching"):
        fit_map(big, big[:50], "affine")


def test_rank_deficient_activations_still_fit():
    x, _ = _data(n=500)
    x[:, 8:] = 0.0  # activations living in a subspace, like the embedding site
    fitted = fit_map(x, x, "affine")
    assert score_map(fitted, x, x)["ev_standard"] == pytest.approx(1.0, abs=1e-9)
    assert score_map(fit_map(x, x, "linear"), x, x)["ev_standard"] == pytest.approx(1.0, abs=1e-9)
