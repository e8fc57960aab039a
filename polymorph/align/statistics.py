"""Percentile-bootstrap intervals over sequences (and seed pairs), from per-sequence sums.

Every metric polymorph reports is a smooth function of per-sequence sums: accuracy is
``sum correct / sum n``, a mean KL is ``sum KL / sum n``, and both explained variances are
functions of ``n``, ``sum x``, ``sum x^2`` and the residual sum of squares per sequence
(:class:`EVSums`). A bootstrap resample of S sequences is a vector of multinomial counts
``w`` [S] (:func:`bootstrap_weights`); the metric on the resample is the same function of the
``w``-weighted sums, so B resamples cost one [B, S] x [S, ...] product instead of B passes over
the rows. Sequences, not positions, are resampled: positions within a sequence are correlated,
and a row bootstrap would understate the spread (docs/method.md, "Calibration").

Intervals are percentile intervals: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
(linear interpolation) of the B replicates, with B >= 100 (:data:`MIN_N_BOOT`).

Several seed pairs scored on the same sequences (:func:`hierarchical_ci`): each bootstrap draw
resamples the pairs with replacement *and* draws one sequence resample shared by all pairs (the
pairs saw the same inputs, so their sequence noise is shared); the replicate is the mean over the
resampled pairs. The interval is for the mean over pairs and includes both sources of spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95
MIN_N_BOOT = 100


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _check(n_boot: int, level: float) -> None:
    if int(n_boot) < MIN_N_BOOT:
        raise ValueError(f"n_boot must be >= {MIN_N_BOOT} for a percentile interval (its tails "
                         f"are a few replicates each below that), got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")


def resample_counts(n_units: int, n_boot: int, seed: int | torch.Generator = 0) -> torch.Tensor:
    """[n_boot, n_units] float64 multinomial counts: each row is n_units draws with replacement
    (no minimum n_boot; :func:`bootstrap_weights` is the checked entry point for intervals)."""
    if n_units < 1 or n_boot < 1:
        raise ValueError(f"n_units and n_boot must be >= 1, got {n_units}, {n_boot}")
    g = _generator(seed)
    idx = torch.randint(0, n_units, (n_boot, n_units), generator=g)
    counts = torch.zeros(n_boot, n_units, dtype=torch.float64)
    return counts.scatter_add_(1, idx, torch.ones(n_boot, n_units, dtype=torch.float64))


def bootstrap_weights(n_sequences: int, n_boot: int = DEFAULT_N_BOOT,
                      seed: int | torch.Generator = 0) -> torch.Tensor:
    """[n_boot, n_sequences] multinomial resample counts (each row sums to n_sequences)."""
    _check(n_boot, DEFAULT_LEVEL)
    return resample_counts(n_sequences, n_boot, seed)


@dataclass(frozen=True)
class Interval:
    """A percentile-bootstrap interval.

    Attributes:
        point: the statistic on the original sample (unit weights; for a hierarchical interval
            the mean over pairs of each pair's point value).
        ci_low, ci_high: the ``(1 -+ level) / 2`` quantiles of the replicates.
        level: nominal coverage. n_boot: number of replicates.
        boot_mean, boot_std: mean and standard deviation (ddof=1) of the replicates (the latter
            is the bootstrap standard error).
        resampled: what was resampled: "sequences" or "pairs+sequences".
    """

    point: float
    ci_low: float
    ci_high: float
    level: float
    n_boot: int
    boot_mean: float
    boot_std: float
    resampled: str = "sequences"

    @property
    def width(self) -> float:
        return self.ci_high - self.ci_low

    def contains(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def bootstrap_ci(values_per_boot: torch.Tensor | np.ndarray, point: float,
                 level: float = DEFAULT_LEVEL, resampled: str = "sequences") -> Interval:
    """Percentile interval from the replicates ``values_per_boot`` [n_boot] of a statistic whose
    value on the original sample is ``point``. Non-finite replicates are an error (e.g. a
    ratio whose resampled denominator is 0): they would bias the quantiles silently."""
    v = np.asarray(values_per_boot.detach().cpu() if isinstance(values_per_boot, torch.Tensor)
                   else values_per_boot, dtype=np.float64).ravel()
    _check(v.size, level)
    bad = int((~np.isfinite(v)).sum())
    if bad:
        raise ValueError(f"{bad} of {v.size} bootstrap replicates are not finite (e.g. a "
                         "resample with a zero denominator); drop sequences with no data first")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return Interval(point=float(point), ci_low=float(lo), ci_high=float(hi), level=float(level),
                    n_boot=int(v.size), boot_mean=float(v.mean()), boot_std=float(v.std(ddof=1)),
                    resampled=resampled)


def _as_per_sequence(x, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor of per-sequence sums, got shape "
                         f"{tuple(t.shape)}")
    return t


def ratio_ci(numerators: torch.Tensor, denominators: torch.Tensor, n_boot: int = DEFAULT_N_BOOT,
             seed: int | torch.Generator = 0, level: float = DEFAULT_LEVEL) -> Interval:
    """Interval for ``sum(num) / sum(den)`` from per-sequence numerators and denominators [S]
    (accuracy: correct and position counts; mean KL: KL sums and counts)."""
    num = _as_per_sequence(numerators, "numerators", 1)
    den = _as_per_sequence(denominators, "denominators", 1)
    if num.shape != den.shape:
        raise ValueError(f"numerators {tuple(num.shape)} and denominators {tuple(den.shape)} "
                         "must both be [S]")
    _check(n_boot, level)
    w = resample_counts(num.shape[0], n_boot, seed)
    return bootstrap_ci((w @ num) / (w @ den), float(num.sum() / den.sum()), level)


def _sequence_index(groups: torch.Tensor | None, n: int) -> tuple[torch.Tensor, int]:
    if groups is None:
        return torch.arange(n), n
    g = torch.as_tensor(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be a 1-D tensor of {n} sequence ids (one per row), got "
                         f"shape {tuple(g.shape)}")
    _, inverse = torch.unique(g, return_inverse=True)
    return inverse, int(inverse.max()) + 1


@dataclass(frozen=True)
class EVSums:
    """Per-sequence sufficient statistics of both explained variances of ``x_hat`` against x.

    Attributes (S sequences, ordered by sorted sequence id; x shifted by one scalar, its grand
    mean, which neither definition sees and which keeps the sums well conditioned):
        n: [S] rows. sum_x: [S, d] sum of x. sum_sq: [S, d] sum of x^2 per dimension.
        sse: [S] sum over rows and dimensions of ``(x_hat - x)^2``.
    """

    n: torch.Tensor
    sum_x: torch.Tensor
    sum_sq: torch.Tensor
    sse: torch.Tensor

    @property
    def n_sequences(self) -> int:
        return self.n.shape[0]

    @classmethod
    def from_rows(cls, x_hat: torch.Tensor, x: torch.Tensor,
                  groups: torch.Tensor | None = None) -> EVSums:
        """Sums of [n, d] prediction and data per sequence (``groups``: [n] sequence ids, any
        integers; None: every row is its own unit)."""
        if x_hat.shape != x.shape or x.ndim != 2:
            raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must be matching "
                             "[n, d] matrices")
        x64, r64 = x.detach().double().cpu(), x_hat.detach().double().cpu()
        idx, s = _sequence_index(groups, x64.shape[0])
        xs = x64 - x64.mean()
        d = x64.shape[1]
        zeros = torch.zeros(s, d, dtype=torch.float64)
        return cls(
            n=torch.zeros(s, dtype=torch.float64).index_add_(
                0, idx, torch.ones(x64.shape[0], dtype=torch.float64)),
            sum_x=zeros.clone().index_add_(0, idx, xs),
            sum_sq=zeros.clone().index_add_(0, idx, xs * xs),
            sse=torch.zeros(s, dtype=torch.float64).index_add_(0, idx, (r64 - x64).pow(2).sum(1)))


def ev_from_sums(sums: EVSums, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Both explained variances from per-sequence sums under sequence weights [B, S] (or [S]).

    With ``N = sum w n``, ``S_j = sum w sum_x[:, j]``, ``Q_j = sum w sum_sq[:, j]``,
    ``E = sum w sse``:

    * ``ev_standard = 1 - E / sum_j (Q_j - S_j^2 / N)`` (per-dimension-centred total SS);
    * ``ev_published = 1 - (E / (N d)) / (sum_j Q_j / (N d) - (sum_j S_j / (N d))^2)`` (MSE over
      the variance of all entries around one grand mean).

    ``weights=None`` is unit weights and reproduces :func:`~polymorph.align.metrics.
    explained_variance` on the rows. Returns [B] tensors (0-d without a batch dimension).
    """
    w = torch.ones(sums.n_sequences, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64)
    if w.shape[-1] != sums.n_sequences:
        raise ValueError(f"weights have {w.shape[-1]} columns for {sums.n_sequences} sequences")
    n = w @ sums.n
    s = w @ sums.sum_x
    q = w @ sums.sum_sq
    e = w @ sums.sse
    d = sums.sum_x.shape[1]
    tss = (q - s * s / n.unsqueeze(-1)).sum(-1)
    entries = n * d
    var_all = q.sum(-1) / entries - (s.sum(-1) / entries) ** 2
    return {"ev_published": 1 - (e / entries) / var_all, "ev_standard": 1 - e / tss}


def ev_ci(sums: EVSums, n_boot: int = DEFAULT_N_BOOT, seed: int | torch.Generator = 0,
          level: float = DEFAULT_LEVEL) -> dict[str, Interval]:
    """Sequence-bootstrap intervals for both EV definitions (one shared set of resamples)."""
    _check(n_boot, level)
    w = resample_counts(sums.n_sequences, n_boot, seed)
    reps, points = ev_from_sums(sums, w), ev_from_sums(sums)
    return {k: bootstrap_ci(reps[k], float(points[k]), level) for k in reps}


def hierarchical_ci(values: torch.Tensor, points: torch.Tensor,
                    seed: int | torch.Generator = 0, level: float = DEFAULT_LEVEL) -> Interval:
    """Interval for the mean over P seed pairs.

    ``values`` [P, B]: each pair's metric under B sequence resamples, the *same* resample b for
    every pair (compute them from one :func:`bootstrap_weights` matrix); ``points`` [P]: each
    pair's value on the original sequences. Replicate b is ``sum_p u_bp values[p, b] / P`` with
    u_b multinomial counts over the pairs, drawn here from ``seed``.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    p = torch.as_tensor(points, dtype=torch.float64)
    if v.ndim != 2 or p.shape != (v.shape[0],):
        raise ValueError(f"values must be [P, B] and points [P], got {tuple(v.shape)} and "
                         f"{tuple(p.shape)}")
    _check(v.shape[1], level)
    u = resample_counts(v.shape[0], v.shape[1], seed)  # [B, P]
    reps = (u * v.T).sum(1) / v.shape[0]
    return bootstrap_ci(reps, float(p.mean()), level, resampled="pairs+sequences")


def hierarchical_ratio_ci(numerators: torch.Tensor, denominators: torch.Tensor,
                          n_boot: int = DEFAULT_N_BOOT, seed: int | torch.Generator = 0,
                          level: float = DEFAULT_LEVEL) -> Interval:
    """:func:`hierarchical_ci` of the ratio metric ``sum num / sum den`` per pair, from per-pair,
    per-sequence sums [P, S] (the same S sequences, in the same order, for every pair)."""
    num = _as_per_sequence(numerators, "numerators", 2)
    den = _as_per_sequence(denominators, "denominators", 2)
    if num.shape != den.shape:
        raise ValueError(f"numerators {tuple(num.shape)} and denominators {tuple(den.shape)} "
                         "must both be [P, S]")
    _check(n_boot, level)
    g = _generator(seed)
    w = resample_counts(num.shape[1], n_boot, g)  # one sequence resample shared by all pairs
    values = (num @ w.T) / (den @ w.T)  # [P, B]
    return hierarchical_ci(values, num.sum(1) / den.sum(1), g, level)


def hierarchical_ev_ci(sums: list[EVSums], n_boot: int = DEFAULT_N_BOOT,
                       seed: int | torch.Generator = 0,
                       level: float = DEFAULT_LEVEL) -> dict[str, Interval]:
    """:func:`hierarchical_ci` of both EV definitions over pairs, one :class:`EVSums` per pair
    built on the same sequences (same ``groups``)."""
    if not sums:
        raise ValueError("hierarchical_ev_ci needs at least one pair")
    if len({s.n_sequences for s in sums}) != 1:
        raise ValueError("every pair must be scored on the same sequences (same S)")
    _check(n_boot, level)
    g = _generator(seed)
    w = resample_counts(sums[0].n_sequences, n_boot, g)
    per_pair = [ev_from_sums(s, w) for s in sums]
    points = [ev_from_sums(s) for s in sums]
    u_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return {k: hierarchical_ci(torch.stack([pp[k] for pp in per_pair]),
                               torch.stack([pt[k] for pt in points]), u_seed, level)
            for k in per_pair[0]}
