"""Decoder universality: a rotated copy scores 1 after rotation and chance raw."""

from __future__ import annotations

import json
import math

import pytest
import torch

from polymorph.align.haar import haar_orthogonal
from polymorph.align.procrustes import fit_rotation
from polymorph.align.universality import (
    chance_level,
    cosine_matrix,
    decoder_universality,
    matched_chance,
)

D, N = 64, 512  # the toy model's d_model and an x8 dictionary


@pytest.fixture(scope="module")
def dictionaries():
    g = torch.Generator().manual_seed(0)
    dec_a = torch.randn(N, D, generator=g)
    dec_a = dec_a / dec_a.norm(dim=1, keepdim=True)
    q = haar_orthogonal(D, "O", seed=1)  # maps B's frame into A's frame: x_B @ q = x_A
    perm = torch.randperm(N, generator=g)
    dec_b = (dec_a.double() @ q.T)[perm].float()  # the same features, B's frame, shuffled
    chance = chance_level(D, N, N, seed=5, n_trials=3)
    return dec_a, dec_b, q, perm, chance


def test_rotated_copy_scores_one_after_rotation(dictionaries):
    dec_a, dec_b, q, perm, _ = dictionaries
    u = decoder_universality(dec_a, dec_b, rotation=q)
    assert u.rotated
    assert u.mean_max_cos == pytest.approx(1.0, abs=1e-6)
    assert u.frac_above_0_5 == 1.0
    assert u.hungarian_mean_cos == pytest.approx(1.0, abs=1e-6)
    inverse = torch.argsort(perm)
    assert all(j == int(inverse[i]) for i, j in u.hungarian_pairs)  # recovers the shuffle


def test_rotated_copy_is_near_chance_raw(dictionaries):
    dec_a, dec_b, _, _, chance = dictionaries
    raw = decoder_universality(dec_a, dec_b)
    assert not raw.rotated
    assert raw.mean_max_cos == pytest.approx(chance.mean_max_cos, abs=0.03)
    assert raw.mean_max_cos < 0.6


def test_independent_dictionary_scores_at_chance(dictionaries):
    dec_a, _, q, _, chance = dictionaries
    other = torch.randn(N, D, generator=torch.Generator().manual_seed(77))
    for rotation in (None, q):  # rotating a random dictionary leaves it random
        u = decoder_universality(dec_a, other, rotation=rotation)
        assert u.mean_max_cos == pytest.approx(chance.mean_max_cos, abs=0.03)
        assert u.hungarian_mean_cos == pytest.approx(chance.hungarian_mean_cos, abs=0.03)
        assert u.hungarian_mean_cos < u.mean_max_cos


def test_chance_level_scales_like_extreme_value_theory(dictionaries):
    *_, chance = dictionaries
    approx = math.sqrt(2 * math.log(N) / D)  # max of N near-Gaussian cosines of variance 1/D
    assert 0.7 * approx < chance.mean_max_cos < 1.1 * approx
    assert chance.mean_max_cos_std < 0.01
    bigger = chance_level(4 * D, N, N, seed=5, n_trials=1, hungarian=False)
    assert bigger.mean_max_cos < chance.mean_max_cos
    json.dumps(chance.to_dict())


def test_rotation_object_from_a_fit_is_accepted(dictionaries):
    dec_a, dec_b, q, _, _ = dictionaries
    g = torch.Generator().manual_seed(3)
    acts_a = torch.randn(400, D, generator=g, dtype=torch.float64)
    acts_b = acts_a @ q.T + 1.0  # B's frame
    rotation = fit_rotation(acts_b, acts_a)  # maps B into A
    u = decoder_universality(dec_a, dec_b, rotation=rotation, hungarian=False)
    assert u.mean_max_cos == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(u.hungarian_mean_cos) and u.hungarian_pairs == []


def test_max_cosine_is_many_to_one_and_hungarian_is_one_to_one():
    b = torch.eye(4)
    a = torch.stack([b[0], b[0], b[0], b[1]])  # three A features claim B's feature 0
    u = decoder_universality(a, b)
    assert u.mean_max_cos == pytest.approx(1.0)
    assert u.hungarian_mean_cos == pytest.approx(0.5)  # only two can be matched perfectly
    assert len({j for _, j in u.hungarian_pairs}) == 4


def test_rectangular_dictionaries_and_histogram():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    u = decoder_universality(a, b, bins=10)
    assert len(u.hungarian_pairs) == 10
    assert len({j for _, j in u.hungarian_pairs}) == 10
    assert sum(u.hist_counts) == 10 and len(u.hist_edges) == 11
    assert torch.allclose(u.max_cos, cosine_matrix(a, b).max(dim=1).values)
    json.dumps(u.to_dict(include_per_feature=True))


def test_zero_rows_have_zero_cosine_and_bad_input_is_rejected():
    a = torch.zeros(3, 4)
    a[0, 0] = 1.0
    u = decoder_universality(a, torch.eye(4))
    assert u.max_cos.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="different spaces"):
        decoder_universality(torch.eye(4), torch.eye(5))
    with pytest.raises(ValueError, match="2-D"):
        decoder_universality(torch.ones(4), torch.eye(4))
    with pytest.raises(ValueError, match="rotation must be"):
        decoder_universality(torch.eye(4), torch.eye(4), rotation=torch.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        decoder_universality(torch.full((2, 4), float("nan")), torch.eye(4))


@pytest.fixture(scope="module")
def span_dictionaries():
    """Two independent random dictionaries confined to one shared 32-d subspace of R^64."""
    g = torch.Generator().manual_seed(20)
    basis = haar_orthogonal(D, "O", seed=21)[:, :32]
    dec_a = torch.randn(N, 32, generator=g, dtype=torch.float64) @ basis.T
    dec_b = torch.randn(N, 32, generator=g, dtype=torch.float64) @ basis.T
    return dec_a, dec_b


def test_matched_chance_equals_the_universality_of_unrelated_dictionaries_in_a_span(
        span_dictionaries):
    dec_a, dec_b = span_dictionaries
    actual = decoder_universality(dec_a, dec_b)
    matched = matched_chance(dec_a, dec_b, n_trials=3, seed=0)
    isotropic = chance_level(D, N, N, seed=0, n_trials=3)
    assert matched.kind == "matched" and isotropic.kind == "isotropic"
    assert matched.effective_dim_a == pytest.approx(32, rel=0.1)
    assert actual.mean_max_cos == pytest.approx(0.51, abs=0.02)
    assert matched.mean_max_cos == pytest.approx(actual.mean_max_cos, abs=0.015)
    assert matched.hungarian_mean_cos == pytest.approx(actual.hungarian_mean_cos, abs=0.015)
    assert matched.frac_above_0_5 == pytest.approx(actual.frac_above_0_5, abs=0.06)
    assert isotropic.mean_max_cos == pytest.approx(0.37, abs=0.02)  # a lower bound, not chance
    assert matched.mean_max_cos_std < 0.01
    json.dumps(matched.to_dict())


def test_matched_chance_rotates_b_and_stays_far_below_a_rotated_copy(span_dictionaries):
    dec_a, _ = span_dictionaries
    q = haar_orthogonal(D, "O", seed=22)  # B's frame into A's frame
    dec_b = dec_a @ q.T  # the same features in B's frame: B's span is not A's
    matched_raw = matched_chance(dec_a, dec_b, n_trials=2, seed=1, hungarian=False)
    matched_rot = matched_chance(dec_a, dec_b, rotation=q, n_trials=2, seed=1)
    assert matched_rot.rotated and not matched_raw.rotated
    assert matched_rot.mean_max_cos == pytest.approx(0.51, abs=0.02)  # spans coincide again
    assert matched_raw.mean_max_cos < matched_rot.mean_max_cos - 0.05
    rotated = decoder_universality(dec_a, dec_b, rotation=q)
    assert rotated.mean_max_cos == pytest.approx(1.0, abs=1e-9)
    assert rotated.hungarian_mean_cos > matched_rot.hungarian_mean_cos + 0.4


def test_matched_chance_keeps_dead_rows_and_rejects_bad_input():
    g = torch.Generator().manual_seed(23)
    dec = torch.randn(40, 8, generator=g, dtype=torch.float64)
    dec[:10] = 0.0  # dead features
    u = decoder_universality(dec, dec)
    assert u.mean_max_cos == pytest.approx(0.75)  # dead rows score 0
    matched = matched_chance(dec, dec, n_trials=2, hungarian=False)
    assert matched.mean_max_cos <= 0.75 + 1e-9  # dead rows stay dead in the random copy
    with pytest.raises(ValueError, match="no non-zero row"):
        matched_chance(torch.zeros(3, 8), dec)
    with pytest.raises(ValueError, match="different spaces"):
        matched_chance(dec, torch.ones(3, 9))
    with pytest.raises(ValueError, match="n_trials"):
        matched_chance(dec, dec, n_trials=0)
