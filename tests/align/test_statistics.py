"""Sequence bootstrap: exact sums, nominal coverage on a known truth, pairs widen the interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from polymorph.align.metrics import explained_variance
from polymorph.align.statistics import (
    EVSums,
    bootstrap_ci,
    bootstrap_weights,
    ev_ci,
    ev_from_sums,
    hierarchical_ci,
    hierarchical_ev_ci,
    hierarchical_ratio_ci,
    ratio_ci,
)


def _sequences(n_seq: int, seed: int, d: int = 6):
    """Rows grouped in sequences of random length, with a per-sequence offset (correlated rows),
    a large common mean, and a noisy reconstruction."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (n_seq,), generator=g)
    groups = torch.repeat_interleave(torch.arange(n_seq) * 7 + 3, lengths)  # arbitrary ids
    offsets = torch.randn(n_seq, d, generator=g, dtype=torch.float64)
    x = offsets.repeat_interleave(lengths, 0) + torch.randn(int(lengths.sum()), d, generator=g,
                                                            dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + 30.0
    x_hat = x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x_hat, x, groups


def test_ev_from_sums_with_unit_weights_is_explained_variance_exactly():
    x_hat, x, groups = _sequences(50, seed=0)
    direct = explained_variance(x_hat, x)
    for g in (groups, None):
        from_sums = ev_from_sums(EVSums.from_rows(x_hat, x, g))
        for name in ("ev_published", "ev_standard"):
            assert float(from_sums[name]) == pytest.approx(direct[name], abs=1e-12)


def test_weighted_sums_equal_the_metric_on_the_resampled_rows():
    x_hat, x, groups = _sequences(20, seed=1)
    sums = EVSums.from_rows(x_hat, x, groups)
    w = bootstrap_weights(sums.n_sequences, 100, seed=2)[:3]
    reps = ev_from_sums(sums, w)
    seq_of_row = torch.unique(groups, return_inverse=True)[1]
    for b in range(3):
        rows = torch.repeat_interleave(torch.arange(x.shape[0]), w[b][seq_of_row].long())
        direct = explained_variance(x_hat[rows], x[rows])
        for name in direct:
            assert float(reps[name][b]) == pytest.approx(direct[name], abs=1e-12)


def test_ratio_interval_covers_the_truth_at_its_nominal_rate():
    """200 data sets of 100 sequences with random lengths and a length-dependent rate."""
    lengths = np.arange(1, 31)
    rate = 0.2 + 0.5 * lengths / 30  # E[correct | L] = L * rate(L)
    truth = float((lengths * rate).sum() / lengths.sum())  # E[L rate(L)] / E[L], L uniform
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for rep in range(200):
        ell = rng.integers(1, 31, size=100)
        p = rng.beta(4 * (0.2 + 0.5 * ell / 30), 4 * (0.8 - 0.5 * ell / 30))  # mean rate(L)
        correct = rng.binomial(ell, p)
        ci = ratio_ci(torch.tensor(correct), torch.tensor(ell), n_boot=400, seed=rep)
        covered += ci.contains(truth)
        widths.append(ci.width)
    assert 0.90 <= covered / 200 <= 0.99, covered  # measured: 0.96
    assert 0.05 < np.mean(widths) < 0.2


def test_sequence_bootstrap_is_wider_than_a_row_bootstrap_for_correlated_rows():
    x_hat, x, groups = _sequences(60, seed=3)
    x_hat = x_hat + 0.3 * (x - x.mean(0)) * (groups % 2 == 0).double()[:, None]  # uneven quality
    by_seq = ev_ci(EVSums.from_rows(x_hat, x, groups), n_boot=300, seed=0)
    by_row = ev_ci(EVSums.from_rows(x_hat, x), n_boot=300, seed=0)
    for name in by_seq:
        assert by_seq[name].contains(by_seq[name].point)
        assert by_seq[name].point == pytest.approx(by_row[name].point)
        assert by_seq[name].width > 1.5 * by_row[name].width
    json.dumps({k: v.to_dict() for k, v in by_seq.items()})


def test_hierarchical_interval_widens_when_pairs_differ():
    rng = np.random.default_rng(4)
    n_pairs, n_seq = 6, 80
    den = rng.integers(5, 30, size=n_seq).astype(float)
    base = rng.binomial(den.astype(int), 0.6).astype(float)
    same = hierarchical_ratio_ci(np.tile(base, (n_pairs, 1)), np.tile(den, (n_pairs, 1)),
                                 n_boot=400, seed=0)
    # pairs of different quality on the same sequences
    rates = np.linspace(0.4, 0.8, n_pairs)
    differ_num = np.stack([rng.binomial(den.astype(int), r) for r in rates]).astype(float)
    differ = hierarchical_ratio_ci(differ_num, np.tile(den, (n_pairs, 1)), n_boot=400, seed=0)
    assert same.resampled == differ.resampled == "pairs+sequences"
    single = ratio_ci(base, den, n_boot=400, seed=0)
    assert same.width == pytest.approx(single.width, rel=0.25)  # identical pairs: sequences only
    assert differ.width > 2 * same.width
    assert differ.point == pytest.approx(float((differ_num.sum(1) / den.sum()).mean()))
    # the same through per-pair EV sums
    x_hat, x, groups = _sequences(40, seed=5)
    pairs = [EVSums.from_rows(x_hat + s * (x_hat - x), x, groups) for s in (0.0, 1.0, 2.0)]
    ev = hierarchical_ev_ci(pairs, n_boot=200, seed=1)
    ev_same = hierarchical_ev_ci(pairs[:1] * 3, n_boot=200, seed=1)
    assert ev["ev_standard"].width > 2 * ev_same["ev_standard"].width


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="n_boot must be >= 100"):
        bootstrap_weights(10, 50)
    with pytest.raises(ValueError, match="n_boot must be >= 100"):
        ratio_ci(torch.ones(5), torch.ones(5), n_boot=99)
    with pytest.raises(ValueError, match="level"):
        ratio_ci(torch.ones(5), torch.ones(5), level=1.0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.zeros(200), 0.0, level=0.0)
    with pytest.raises(ValueError, match="not finite"):
        bootstrap_ci(np.r_[np.zeros(150), np.nan], 0.0)
    with pytest.raises(ValueError, match="\\[P, B\\]"):
        hierarchical_ci(torch.zeros(200), torch.zeros(1))
    with pytest.raises(ValueError, match="same sequences"):
        hierarchical_ev_ci([EVSums.from_rows(*_sequences(5, 0)[:2]),
                            EVSums.from_rows(*_sequences(6, 0)[:2])], n_boot=100)
    w = bootstrap_weights(7, 100, seed=0)
    assert w.shape == (100, 7) and torch.equal(w.sum(1), torch.full((100,), 7.0,
                                                                    dtype=torch.float64))
