"""Procrustes fitting on planted rotations: recovery, SO(d), scoring, bad input."""

from __future__ import annotations

import pytest
import torch

from polymorph.align.haar import haar_orthogonal
from polymorph.align.metrics import explained_variance
from polymorph.align.procrustes import (
    Rotation,
    fit_rotation,
    fit_rotation_shuffled,
    procrustes_matrix,
    score_alignment,
    shuffled_pairing,
)

D = 32


def _activations(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    """Anisotropic activations with a non-zero mean, like a residual stream."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    return x + torch.linspace(-2, 3, d, dtype=torch.float64)


def _planted(n: int, noise: float, seed: int = 0, q: torch.Tensor | None = None):
    x = _activations(n, seed=seed)
    q = haar_orthogonal(D, "O", seed=100 + seed) if q is None else q
    offset = torch.randn(D, generator=torch.Generator().manual_seed(999), dtype=torch.float64)
    g = torch.Generator().manual_seed(1000 + seed)
    y = x @ q + offset + noise * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, y, q


def test_recovers_planted_rotation_and_error_shrinks_with_noise():
    errors = []
    for noise in (0.0, 1e-3, 1e-2, 1e-1):
        x, y, q = _planted(4000, noise)
        rot = fit_rotation(x, y)
        errors.append(float(torch.linalg.norm(rot.matrix - q)))
        assert rot.n_fit_rows == 4000 and rot.group == "O"
    assert errors[0] < 1e-10
    assert errors == sorted(errors), f"error should grow with the noise: {errors}"
    assert errors[-1] < 0.5  # still the right rotation, only blurred


def test_means_and_apply_map_source_onto_target():
    x, y, _ = _planted(2000, 0.0)
    rot = fit_rotation(x, y)
    torch.testing.assert_close(rot.source_mean, x.mean(0))
    torch.testing.assert_close(rot.target_mean, y.mean(0))
    torch.testing.assert_close(rot.apply(x), y, atol=1e-10, rtol=0)
    torch.testing.assert_close(rot.inverse().apply(y), x, atol=1e-10, rtol=0)


def test_apply_keeps_dtype_and_leading_dims():
    x, y, _ = _planted(2000, 0.0)
    rot = fit_rotation(x, y)
    x32 = x[:60].float().reshape(3, 20, D)
    out = rot.apply(x32)
    assert out.dtype == torch.float32 and out.shape == (3, 20, D)
    torch.testing.assert_close(out.reshape(60, D).double(), y[:60], atol=1e-4, rtol=1e-5)


def test_so_fit_has_det_plus_one_when_the_best_o_fit_has_det_minus_one():
    q = haar_orthogonal(D, "O", seed=7)
    if torch.linalg.det(q) > 0:
        q = q.clone()
        q[:, 0] = -q[:, 0]
    x, y, _ = _planted(3000, 1e-3, q=q)
    r_o = fit_rotation(x, y, group="O")
    r_so = fit_rotation(x, y, group="SO")
    assert r_o.det == pytest.approx(-1.0) and r_so.det == pytest.approx(1.0)
    assert torch.linalg.norm(r_o.matrix - q) < 0.05

    def loss(r: torch.Tensor) -> float:
        xc, yc = x - x.mean(0), y - y.mean(0)
        return float(((xc @ r - yc) ** 2).sum())

    # The SO fit is the best proper rotation: small proper perturbations only make it worse.
    g = torch.Generator().manual_seed(3)
    base = loss(r_so.matrix)
    for _ in range(5):
        a = torch.randn(D, D, generator=g, dtype=torch.float64) * 1e-3
        assert loss(torch.linalg.matrix_exp(a - a.T) @ r_so.matrix) > base
    assert loss(r_o.matrix) < base


def test_so_fit_equals_o_fit_for_a_proper_rotation():
    x, y, _ = _planted(2000, 1e-2, q=haar_orthogonal(D, "SO", seed=4))
    torch.testing.assert_close(fit_rotation(x, y, "SO").matrix, fit_rotation(x, y, "O").matrix)


def test_float32_precision_matches_float64():
    x, y, _ = _planted(5000, 1e-2)
    r64 = fit_rotation(x.float(), y.float(), precision="float64")
    r32 = fit_rotation(x.float(), y.float(), precision="float32")
    assert torch.linalg.norm(r64.matrix - r32.matrix) < 1e-4


def test_procrustes_matrix_maximises_trace_objective():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    r, s = procrustes_matrix(m)
    assert float(torch.trace(r.T @ m)) == pytest.approx(float(s.sum()))
    for _ in range(20):
        other = haar_orthogonal(6, "O", seed=g)
        assert float(torch.trace(other.T @ m)) <= float(s.sum()) + 1e-12


def test_score_alignment_on_held_out_batch():
    x_fit, y_fit, q = _planted(3000, 0.05, seed=0)
    x_new, y_new, _ = _planted(3000, 0.05, seed=1, q=q)
    scores = score_alignment(fit_rotation(x_fit, y_fit), x_new, y_new)
    assert set(scores) == {f"{k}_{e}" for k in ("raw", "rotated", "floor")
                           for e in ("ev_published", "ev_standard")}
    assert scores["rotated_ev_standard"] > 0.95
    assert scores["raw_ev_standard"] < 0  # worse than predicting the mean: polymorphism
    assert scores["floor_ev_standard"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= scores["floor_ev_published"] < 1.0
    direct = explained_variance(x_new, y_new)
    assert scores["raw_ev_published"] == pytest.approx(direct["ev_published"])


def test_rank_deficient_fit_warns():
    x = _activations(500)
    x[:, -3:] = 0.0  # activations confined to a subspace
    with pytest.warns(UserWarning, match="rank"):
        rot = fit_rotation(x, x @ haar_orthogonal(D, seed=1))
    assert rot.effective_rank() == D - 3


def test_rotation_round_trips_through_dict():
    x, y, _ = _planted(500, 0.1)
    rot = fit_rotation(x, y, "SO")
    back = Rotation.from_dict(rot.to_dict())
    torch.testing.assert_close(back.matrix, rot.matrix)
    assert back.group == "SO" and back.n_fit_rows == 500


@pytest.mark.parametrize(
    ("source", "target", "kwargs", "match"),
    [
        (torch.zeros(100, 4), torch.zeros(100, 5), {}, "same shape"),
        (torch.zeros(100, 4), torch.zeros(90, 4), {}, "same shape"),
        (torch.zeros(100), torch.zeros(100), {}, "2-D"),
        (torch.randn(4, 4), torch.randn(4, 4), {}, "under-determined.*at least 5 rows"),
        (torch.randn(100, 4), torch.randn(100, 4), {"group": "U"}, "group"),
        (torch.randn(100, 4), torch.randn(100, 4), {"precision": "float16"}, "precision"),
        (torch.ones(100, 4, dtype=torch.long), torch.ones(100, 4), {}, "floating"),
    ],
)
def test_bad_input_is_rejected(source, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_rotation(source, target, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(100, 4)
    y = torch.randn(100, 4)
    y[17, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_rotation(x, y)


def test_non_tensor_is_rejected():
    with pytest.raises(TypeError, match="torch.Tensor"):
        fit_rotation([[1.0]], torch.zeros(1, 1))


def test_rotation_validates_hand_built_matrix():
    z = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not orthogonal"):
        Rotation(matrix=torch.ones(3, 3), source_mean=z, target_mean=z)
    with pytest.raises(ValueError, match="shape"):
        Rotation(matrix=torch.eye(3), source_mean=torch.zeros(4), target_mean=z)
    reflect = torch.diag(torch.tensor([1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="det"):
        Rotation(matrix=reflect, source_mean=z, target_mean=z, group="SO")
    with pytest.raises(ValueError, match="last dimension"):
        Rotation(matrix=torch.eye(3), source_mean=z, target_mean=z).apply(torch.zeros(2, 4))


def test_shuffled_pairing_null_scores_near_the_floor():
    g = torch.Generator().manual_seed(30)
    q = haar_orthogonal(D, "O", seed=31)
    x_fit = torch.randn(4000, D, generator=g, dtype=torch.float64)
    x_new = torch.randn(4000, D, generator=g, dtype=torch.float64)
    true = score_alignment(fit_rotation(x_fit, x_fit @ q), x_new, x_new @ q)
    shuffled = fit_rotation_shuffled(x_fit, x_fit @ q, seed=0)
    null = score_alignment(shuffled, x_new, x_new @ q)
    assert true["rotated_ev_standard"] == pytest.approx(1.0)
    # isotropic data: the shuffled map is unrelated to q, EV = 1 - (2 - 2 tr(R^T q) / d) ~ -1
    assert null["rotated_ev_standard"] < 0.1
    assert null["rotated_ev_standard"] == pytest.approx(-1.0, abs=0.3)
    torch.testing.assert_close(shuffled.source_mean, x_fit.mean(0))


def test_shuffled_pairing_is_a_derangement_that_keeps_positions():
    perm = shuffled_pairing(50, seed=1)
    assert sorted(perm.tolist()) == list(range(50)) and (perm != torch.arange(50)).all()
    lengths = [5, 5, 5, 3, 3, 7, 5]  # the 7 is alone: its rows are deranged row by row
    groups = torch.cat([torch.full((n,), 100 + i) for i, n in enumerate(lengths)])
    position = torch.cat([torch.arange(n) for n in lengths])
    perm = shuffled_pairing(groups.numel(), seed=2, groups=groups)
    assert sorted(perm.tolist()) == list(range(groups.numel()))
    paired = groups[perm] != groups
    lone = groups == 105
    assert paired[~lone].all()  # every sequence gets another sequence's rows
    assert (position[perm][~lone] == position[~lone]).all()  # at the same positions
    assert (perm[lone] != torch.arange(groups.numel())[lone]).all()
    sizes = dict(zip(range(100, 107), lengths))
    assert all(sizes[int(a)] == sizes[int(b)] for a, b in zip(groups[~lone], groups[perm][~lone]))
    with pytest.raises(ValueError, match="groups"):
        shuffled_pairing(10, groups=torch.zeros(9))
