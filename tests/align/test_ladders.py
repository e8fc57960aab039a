"""Matched-L0 interpolation, decoder-norm evenness and the streaming firing correlation, each on
a planted ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polymorph.align.ladders import (
    FiringMoments,
    decoder_evenness,
    interpolate_at_l0,
    largest_share,
)


def test_a_curve_linear_in_log_l0_is_recovered_exactly_between_rungs():
    l0 = torch.tensor([4.0, 16.0, 64.0])
    ev = 0.5 + 0.1 * torch.log2(l0)  # planted: EV linear in log L0
    targets = torch.tensor([4.0, 8.0, 23.0, 64.0])
    out = interpolate_at_l0(l0, ev, targets)
    torch.testing.assert_close(out, (0.5 + 0.1 * torch.log2(targets)).double())


def test_rungs_in_any_order_and_equal_l0s_averaged():
    out = interpolate_at_l0(torch.tensor([16.0, 4.0, 16.0]), torch.tensor([0.8, 0.2, 0.6]),
                            torch.tensor([4.0, 16.0, 8.0]))
    torch.testing.assert_close(out, torch.tensor([0.2, 0.7, 0.45], dtype=torch.float64))


def test_never_extrapolated_beyond_the_tolerance():
    l0, ev = torch.tensor([8.0, 32.0]), torch.tensor([0.5, 0.9])
    out = interpolate_at_l0(l0, ev, torch.tensor([7.9, 33.0, 7.0, 40.0]), tolerance=0.05)
    assert out[:2].tolist() == pytest.approx([0.5, 0.9])  # within 5%: the end rung
    assert math.isnan(out[2]) and math.isnan(out[3])  # further out: absent
    strict = interpolate_at_l0(l0, ev, torch.tensor([7.9]), tolerance=0.0)
    assert math.isnan(strict[0])


def test_leading_dimensions_are_interpolated_alike_and_nan_propagates():
    l0 = torch.tensor([2.0, 8.0])
    reps = torch.tensor([[0.0, 1.0], [1.0, 3.0], [float("nan"), 1.0]])  # e.g. replicates
    out = interpolate_at_l0(l0, reps, torch.tensor([4.0]))
    assert out.shape == (3, 1)
    torch.testing.assert_close(out[:2, 0], torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert math.isnan(out[2, 0])


def test_a_single_rung_is_read_only_at_its_own_l0():
    out = interpolate_at_l0(torch.tensor([10.0]), torch.tensor([0.3]), torch.tensor([10.2, 20.0]))
    assert out[0] == pytest.approx(0.3) and math.isnan(out[1])


@pytest.mark.parametrize("l0, values, targets, match", [
    ([0.0, 4.0], [0.1, 0.2], [2.0], "L0 must be finite and > 0"),
    ([4.0, 8.0], [0.1], [5.0], "R = 2"),
    ([4.0, 8.0], [0.1, 0.2], [-1.0], "target L0s"),
])
def test_bad_ladders_are_refused(l0, values, targets, match):
    with pytest.raises(ValueError, match=match):
        interpolate_at_l0(torch.tensor(l0), torch.tensor(values), torch.tensor(targets))


def test_decoder_evenness_is_one_when_even_zero_when_a_seed_lacks_the_latent():
    norms = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0],
                          [0.4, 0.3, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0]])
    even = decoder_evenness(norms)
    assert even[0] == pytest.approx(1.0) and even[1] == pytest.approx(0.0)
    assert even[2] == pytest.approx(0.5)  # the weakest seed writes it at half the strongest
    assert math.isnan(even[3])
    share = largest_share(norms)
    assert share[:3].tolist() == pytest.approx([0.25, 1.0, 0.4 / 1.2]) and math.isnan(share[3])
    # scale-free: a latent's norms times any factor give the same evenness
    torch.testing.assert_close(decoder_evenness(7.0 * norms[:3]), even[:3])
    with pytest.raises(ValueError, match="n_seeds >= 2"):
        decoder_evenness(torch.ones(5, 1))


def test_firing_correlation_chunked_equals_the_whole_matrix_pearson():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(3000, 20, generator=g))
    b = torch.relu(a + 0.7 * torch.randn(3000, 20, generator=g))
    a[:, 3] = 0.0  # a dead feature: left out
    b[:, 5] = 2.0  # constant on one side: left out
    moments = FiringMoments.zeros(20)
    for start in range(0, 3000, 701):  # uneven chunks
        moments.update(a[start:start + 701], b[start:start + 701])
    corr = moments.correlation()
    ok = [j for j in range(20) if j not in (3, 5)]
    want = np.array([np.corrcoef(a[:, j].numpy(), b[:, j].numpy())[0, 1] for j in ok])
    np.testing.assert_allclose(corr[ok].numpy(), want, atol=1e-10)
    assert math.isnan(corr[3]) and math.isnan(corr[5])
    mean, n = moments.mean_correlation()
    assert n == 18 and mean == pytest.approx(float(np.mean(want)), abs=1e-10)


def test_the_same_codes_correlate_perfectly_and_independent_ones_do_not():
    g = torch.Generator().manual_seed(1)
    a = torch.relu(torch.randn(5000, 8, generator=g))
    same = FiringMoments.zeros(8)
    same.update(a, a)
    assert same.mean_correlation()[0] == pytest.approx(1.0)
    other = FiringMoments.zeros(8)
    other.update(a, torch.relu(torch.randn(5000, 8, generator=g)))
    assert abs(other.mean_correlation()[0]) < 0.05
    empty = FiringMoments.zeros(8)
    empty.update(torch.zeros(10, 8), torch.zeros(10, 8))
    mean, n = empty.mean_correlation()
    assert math.isnan(mean) and n == 0
