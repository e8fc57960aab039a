"""The interval and reading helpers every callback shares: planted numbers in, relations out."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from polymorph.align.statistics import EVSums
from polymorph.analysis.intervals import (
    SequenceBootstrap,
    check_margin,
    check_n_boot,
    error_bars,
    pair_interval,
)
from polymorph.analysis.readings import between, fmt_ci, relation, relation_to_band
from polymorph.analysis.sae_transfer import null_band
from polymorph.analysis.steering import fixed_overlap


def ci(lo, hi):
    return {"mean": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "n_boot": 1000}


def test_relations_read_the_whole_interval_against_the_margin():
    assert relation(0.53, ci(0.51, 0.55), 0.49, 0.01) == "above"
    assert relation(0.53, ci(0.495, 0.55), 0.49, 0.01) == "at"  # reaches within the margin
    assert relation(0.40, ci(0.39, 0.45), 0.49, 0.01) == "below"
    assert relation(0.50, None, 0.49, 0.01) == "at"  # no interval: the point
    assert relation(0.52, None, 0.49, 0.01) == "above"
    assert relation(0.5, None, None, 0.01) is None
    assert relation_to_band(0.6, ci(0.58, 0.62), (0.3, 0.5), 0.01) == "above"
    assert relation_to_band(0.45, ci(0.44, 0.46), (0.3, 0.5), 0.01) == "at"
    assert between(0.53, 0.49, 0.71) == pytest.approx(0.04 / 0.22)
    assert between(0.5, 0.5, 0.5) is None
    assert fmt_ci(0.5321, ci(0.5111, 0.5511)) == "0.532 [0.511, 0.551]"


def test_bad_counts_and_margins_say_what_to_write():
    with pytest.raises(ValueError, match="n_boot=50 is too few.*>= 100"):
        check_n_boot(50)
    with pytest.raises(ValueError, match="integer"):
        check_n_boot("many")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            check_margin(bad)
    assert check_n_boot(100) == 100 and check_margin(0) == 0.0


def test_one_pair_has_no_interval_over_pairs_and_several_do():
    assert pair_interval([0.5]) is None
    iv = pair_interval([0.4, 0.5, 0.6, 0.5], n_boot=500)
    assert iv["resampled"] == "pairs" and iv["mean"] == pytest.approx(0.5)
    assert 0.4 <= iv["ci_low"] < 0.5 < iv["ci_high"] <= 0.6


def test_shared_resamples_give_a_paired_interval_for_a_difference():
    """Two EVs of predictions with a shared error component: the interval of their difference
    under one set of resamples is far narrower than either interval (a paired comparison)."""
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(400).repeat_interleave(20)
    x = torch.randn(8000, 8, generator=g, dtype=torch.float64)
    seq_noise = torch.randn(400, 8, generator=g, dtype=torch.float64)[groups]
    pred_a = x + 0.5 * seq_noise
    pred_b = x + 0.5 * seq_noise + 0.05 * torch.randn(8000, 8, generator=g, dtype=torch.float64)
    boot = SequenceBootstrap(400, n_boot=300, seed=1)
    ra = boot.ev(EVSums.from_rows(pred_a, x, groups))["ev_standard"]
    rb = boot.ev(EVSums.from_rows(pred_b, x, groups))["ev_standard"]
    a, b = boot.ci(ra, float(ra.mean())), boot.ci(rb, float(rb.mean()))
    d = boot.ci(ra - rb, float((ra - rb).mean()))
    width = lambda c: c["ci_high"] - c["ci_low"]
    assert width(d) < 0.2 * min(width(a), width(b))
    assert d["ci_low"] > 0  # b adds independent noise: its EV is lower in every resample
    pooled = boot.over_pairs([ra, rb], [float(ra.mean()), float(rb.mean())])
    assert pooled["resampled"] == "pairs+sequences"


def test_an_undefined_replicate_gives_no_interval():
    boot = SequenceBootstrap(10, n_boot=100)
    num = torch.ones(10, dtype=torch.float64)
    den = torch.zeros(10, dtype=torch.float64)
    den[0] = 1.0  # most resamples miss the one sequence with a denominator
    assert boot.ratio_ci(num, den) is None


def test_null_band_covers_one_more_null_draw_at_about_its_level():
    """Planted: the 'true' fit is one more draw from the null's own distribution."""
    g = torch.Generator().manual_seed(2)
    hits, n = 0, 2000
    for _ in range(n):
        draws = torch.randn(4, 4, generator=g)  # 4 pairs, K = 3 shuffles + the true fit
        band = null_band([row[:3].tolist() for row in draws], 0.95)
        hits += band[0] <= float(draws[:, 3].mean()) <= band[1]
    assert abs(hits / n - 0.95) < 0.02
    assert null_band([[0.1], [0.2]], 0.95) is None  # one shuffle: no spread to read


def test_fixed_overlap_of_random_directions_matches_its_beta_law():
    d, k = 64, 6
    basis = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64))[0]
    g = torch.Generator().manual_seed(4)
    vals = [fixed_overlap(torch.randn(d, generator=g, dtype=torch.float64), basis, 0.95)
            for _ in range(3000)]
    overlaps = torch.tensor([v["fixed_overlap"] for v in vals])
    assert float(overlaps.mean()) == pytest.approx(k / d, rel=0.05)
    q = vals[0]["fixed_overlap_random_q"]
    assert q == pytest.approx(stats.beta.ppf(0.95, k / 2, (d - k) / 2))
    assert abs(float((overlaps > q).double().mean()) - 0.05) < 0.015
    inside = fixed_overlap(basis[:, 0] * 3.0, basis, 0.95)
    assert inside["fixed_overlap"] == pytest.approx(1.0) and inside["fixed_overlap"] > q
    assert math.isclose(fixed_overlap(torch.zeros(d), basis, 0.95)["fixed_overlap_random"],
                        k / d)


def test_error_bars_never_go_negative():
    assert error_bars([0.0, 0.5, None], [ci(-0.01, -0.001), ci(0.4, 0.6), None]) == [
        [0.01, pytest.approx(0.1), 0.0], [0.0, pytest.approx(0.1), 0.0]]
