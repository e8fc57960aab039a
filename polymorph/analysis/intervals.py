"""Intervals for results.json: one sequence resample shared by every quantity of a callback.

Every headline number of an analysis is a smooth function of per-sequence sums (accuracies,
mean KLs and losses are ratios of sums; both explained variances are functions of
:class:`~polymorph.align.statistics.EVSums`). :class:`SequenceBootstrap` draws the multinomial
resample counts of the scored sequences once (:func:`~polymorph.align.statistics.
bootstrap_weights`) and evaluates every quantity of a callback under the *same* resamples, so
the interval of a difference or a ratio of two quantities (transferred EV minus its null, a
loss recovered, a transfer ratio) is the interval of that difference, not a combination of two
independent intervals. Means over seed pairs resample the pairs as well
(:func:`~polymorph.align.statistics.hierarchical_ci`).

Quantities with no sequences to resample (decoder universality, a rotation's trace z) get an
interval over seed pairs only (:func:`pair_interval`), and none where there is one pair.

In results.json an interval is ``{"mean": point, "ci_low", "ci_high", "n_boot", "level",
"resampled"}`` (:func:`interval_dict`); ``mean`` is the value on the original sample (for a
mean over pairs, the mean of the pairs' values), not the mean of the replicates.
"""

from __future__ import annotations

import math

import torch

from polymorph.align.statistics import (
    MIN_N_BOOT,
    EVSums,
    Interval,
    bootstrap_ci,
    bootstrap_weights,
    ev_from_sums,
    hierarchical_ci,
    resample_counts,
)

#: what an interval entry in results.json holds, for every callback's definitions
INTERVAL_DEFINITION = {
    "mean / ci_low / ci_high / n_boot": "a percentile-bootstrap interval: mean = the value on "
    "the original sample (for a mean over pairs: the mean of the pairs' values), ci_low and "
    "ci_high = the (1 - level) / 2 and (1 + level) / 2 quantiles of n_boot replicates",
    "resampled": "what each replicate resampled: sequences (whole sequences of the scored "
    "batch, never positions), pairs+sequences (the seed pairs and, shared by all pairs, the "
    "sequences), pairs (the seed pairs' values only)",
}


def check_n_boot(n_boot, where: str = "n_boot") -> int:
    """``n_boot`` as an int >= MIN_N_BOOT, or a ValueError saying what to write instead."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) and not (
            isinstance(n_boot, float) and n_boot.is_integer()):
        raise ValueError(f"{where}={n_boot!r} must be an integer number of bootstrap resamples "
                         f"(>= {MIN_N_BOOT}, e.g. 1000)")
    if int(n_boot) < MIN_N_BOOT:
        raise ValueError(f"{where}={n_boot} is too few for a 95% percentile interval (its tails "
                         f"would be a few replicates): use {where} >= {MIN_N_BOOT}, e.g. 1000")
    return int(n_boot)


def check_level(level, where: str = "level") -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"{where}={level} must be in (0, 1), e.g. 0.95")
    return float(level)


def check_margin(margin, where: str = "margin") -> float:
    """A practical-equivalence margin in the quantity's own units, in [0, 1]."""
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={margin!r} must be a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{where}={margin} must be in [0, 1] (in the units of the quantity it "
                         "is compared in), e.g. 0.01")
    return value


def interval_dict(iv: Interval | None) -> dict | None:
    """The results.json form of an interval (None stays None)."""
    if iv is None:
        return None
    return {"mean": iv.point, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "n_boot": iv.n_boot,
            "level": iv.level, "resampled": iv.resampled}


def _finite_ci(reps: torch.Tensor, point: float, level: float, resampled: str) -> dict | None:
    """An interval from replicates, or None when some replicate is undefined (e.g. a ratio whose
    resampled denominator is 0): dropping them would bias the quantiles."""
    reps = torch.as_tensor(reps, dtype=torch.float64)
    if not math.isfinite(point) or not bool(torch.isfinite(reps).all()):
        return None
    return interval_dict(bootstrap_ci(reps, point, level, resampled=resampled))


class SequenceBootstrap:
    """One set of ``n_boot`` resamples of ``n_sequences`` scored sequences, shared by every
    quantity computed with it (see the module docstring).

    Replicates are tensors [n_boot]; :meth:`ci` turns replicates and the point value into an
    interval dict, :meth:`over_pairs` a [P, n_boot] stack (the same resamples for every pair)
    into the interval of the mean over pairs.
    """

    def __init__(self, n_sequences: int, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> None:
        self.n_sequences = int(n_sequences)
        self.n_boot = check_n_boot(n_boot)
        self.level = check_level(level)
        self.seed = int(seed)
        self.weights = bootstrap_weights(self.n_sequences, self.n_boot, self.seed)  # [B, S]

    # -- replicates ----------------------------------------------------------------------

    def sums(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """[B] resampled sums of a per-sequence quantity [S]."""
        return self.weights @ torch.as_tensor(per_sequence, dtype=torch.float64)

    def ratio(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """[B] replicates of ``sum num / sum den``."""
        return self.sums(num) / self.sums(den)

    def ev(self, sums: EVSums) -> dict[str, torch.Tensor]:
        """[B] replicates of both explained variances (``ev_standard``, ``ev_published``)."""
        return ev_from_sums(sums, self.weights)

    # -- intervals -----------------------------------------------------------------------

    def ci(self, reps: torch.Tensor, point: float) -> dict | None:
        return _finite_ci(reps, point, self.level, "sequences")

    def ratio_ci(self, num: torch.Tensor, den: torch.Tensor) -> dict | None:
        d = float(torch.as_tensor(den).sum())
        point = float(torch.as_tensor(num).sum()) / d if d else float("nan")
        return self.ci(self.ratio(num, den), point)

    def ev_ci(self, sums: EVSums) -> dict[str, dict | None]:
        reps, points = self.ev(sums), ev_from_sums(sums)
        return {k: self.ci(reps[k], float(points[k])) for k in reps}

    def over_pairs(self, reps: list[torch.Tensor], points: list[float]) -> dict | None:
        """Interval of the mean over pairs, each pair's replicates [B] computed with these
        resamples: pairs and sequences resampled together (one pair: sequences only)."""
        if not reps:
            return None
        values = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in reps])
        pts = torch.tensor([float(p) for p in points], dtype=torch.float64)
        if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(pts).all())):
            return None
        iv = hierarchical_ci(values, pts, seed=self.seed + 1, level=self.level)
        return interval_dict(iv)


def pair_interval(values: list[float], n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict | None:
    """Interval of the mean of per-pair values, resampling the pairs only (for quantities with
    no sequences to resample); None with fewer than two pairs or a non-finite value."""
    vals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if vals.numel() < 2 or not bool(torch.isfinite(vals).all()):
        return None
    counts = resample_counts(vals.numel(), check_n_boot(n_boot), seed)  # [B, P]
    reps = counts @ vals / vals.numel()
    return interval_dict(bootstrap_ci(reps, float(vals.mean()), check_level(level),
                                      resampled="pairs"))


def mean(values) -> float | None:
    """Mean of the finite values, None if there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def error_bars(values: list, cis: list) -> list[list[float]]:
    """matplotlib ``yerr`` [[below], [above]] from values and interval dicts (0 where there is
    no interval; clipped at 0 where a point lies outside its percentile interval, as the floor's
    exact 0 can)."""
    lo = [max(0.0, v - c["ci_low"]) if c and v is not None else 0.0 for v, c in zip(values, cis)]
    hi = [max(0.0, c["ci_high"] - v) if c and v is not None else 0.0 for v, c in zip(values, cis)]
    return [lo, hi]
