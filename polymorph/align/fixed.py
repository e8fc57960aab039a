"""A near-fixed subspace of a *fitted* rotation, with the threshold calibrated to the fit's noise.

The noiseless rule of :func:`~polymorph.align.haar.simulate_haar_null` counts eigen-angles below
a tau set from exact Haar draws (0.0027 rad at d = 64). A fitted R carries estimation noise: an
exactly fixed k-dimensional subspace F of the true map shows up as k small but non-zero angles,
typically 1e-3 to 1e-2 rad for realistic activations, and is missed.

Noise model. Write the fit as ``R = R_true (I + A)`` with A small and skew. To first order the
eigen-angles of R near F are the moduli of the eigenvalues of the compression ``F^T A F``
(a k x k skew matrix). A row bootstrap of the fit (:func:`bootstrap_rotations`) gives noise
rotations ``N_b = R^T R_b`` whose skew parts ``K_b = (N_b - N_b^T) / 2`` have, approximately, the
law of A. So "the m smallest angles of R are an exactly fixed m-dimensional subspace plus fit
noise" predicts that the m-th angle is no larger than the largest singular value of
``V_m^T K_b V_m`` (V_m: R's first m eigen-directions, ascending angle), up to bootstrap
fluctuation. The compression matters: the largest angles of the full noise rotation come from
the low-variance directions of the activations and are several times the noise any particular
subspace sees (measured in ``tests/align/test_fixed.py``).

Rule (:func:`near_fixed_subspace`), a fixed point. For a candidate count m let
``tau(m) = factor * quantile_q over b of asin(min(1, s_max(V_m^T K_b V_m)))`` (``tau(0) = 0``)
and ``f(m) = #{angles of R <= max(tau(m), 1e-6)}`` (angles below 1e-6 are exact zeros, e.g. the
one forced by det and parity). The compressions are nested, so their largest singular values
interlace: tau, hence f, is non-decreasing in m. Starting from m = d (the whole noise rotation,
an upper bound) and iterating ``m <- f(m)`` decreases to the largest m with ``f(m) = m``: the
largest set of R's smallest angles that is consistent with an exactly fixed subspace *of that
size* plus the noise that subspace sees. Its tau is *the* threshold, and exactly ``count = m``
angles lie below it. (Walking up from m = 0 instead fails: the smallest angles of a fixed
k-block are compared with the noise of a 1- or 2-dimensional compression, which is smaller.)
The estimate is then, as in the noiseless rule, ``max(0, round(count - forced - E_Haar[#free
angles < tau]))``, the expectation read off the Haar null's pooled free angles at this tau
(:meth:`~polymorph.align.haar.HaarNull.expected_free_below`).

Defaults (``quantile=0.5, factor=2``), chosen by experiment (d = 64, n = 8,000 rows, activation
covariance eigenvalues decaying geometrically over a factor 100 or 1,000, Gaussian target noise
giving held-out rotated EV 0.85 to 0.99, 20 seeds each, B = 32): the true error compressed to
the true fixed block is about 1.1x the bootstrap median (the bootstrap runs slightly low) and up
to 1.75x it; with median x 2 a planted 6-block is reported as 6 +- 1 in 78 of 80 fits (8 in the
other two: a free Haar plane below the noise) and a pure Haar map as 0 in 80 of 80. The q95 x 1
rule lost a pair (reported 4) in about 10% of fits, and the median is steadier than a high
quantile with B ~ 30.

A Haar draw has near-zero angles of its own (for O(2m) their density at 0 is about d / pi per
radian): a free plane whose true angle is below the noise is indistinguishable from a fixed one,
so at higher noise some Haar draws report 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymorph.align.haar import (
    HaarNull,
    _angles_and_vectors,
    _as_orthogonal,
    _round_half_up,
    forced_fixed,
)
from polymorph.align.procrustes import Rotation, procrustes_matrix, single_threaded
from polymorph.align.statistics import resample_counts

DEFAULT_N_BOOT = 32
DEFAULT_QUANTILE = 0.5
DEFAULT_FACTOR = 2.0
# Angles below this are exact zeros (forced +1 eigenvalues, exactly fixed directions).
_EXACT_ANGLE = 1e-6
# Rows per chunk when accumulating per-group cross moments.
_CHUNK_ROWS = 2048


def _group_ids(groups: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, int]:
    if groups is None:
        return None, n
    g = torch.as_tensor(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be a 1-D tensor of {n} sequence ids (one per row), got "
                         f"shape {tuple(g.shape)}")
    _, inverse = torch.unique(g, return_inverse=True)
    return inverse, int(inverse.max()) + 1


@dataclass(frozen=True)
class CrossMoments:
    """Per-unit sufficient statistics of a Procrustes fit (unit = row or sequence).

    Attributes:
        n: [U] rows per unit; sum_x, sum_y: [U, d]; sum_xy: [U, d, d] = sum over the unit's rows
            of ``x^T y`` (None for row units, where it would be n x d x d: the weighted products
            are formed from the rows instead).
        x, y: the rows themselves (row units only).
    """

    n: torch.Tensor
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    sum_xy: torch.Tensor | None
    x: torch.Tensor | None
    y: torch.Tensor | None

    @property
    def n_units(self) -> int:
        return self.n.shape[0]

    def centred_cross_covariance(self, weights: torch.Tensor) -> torch.Tensor:
        """``M_b = sum_i w_i (x_i - mx_b)^T (y_i - my_b)`` for weights [B, U]: [B, d, d].

        ``mx_b, my_b`` are the weighted means. Costs a [B, U] x [U, d*d] product for sequence
        units, B passes of [n, d] x [n, d] for row units.
        """
        w = weights.to(torch.float64)
        n_b = w @ self.n
        sx, sy = w @ self.sum_x, w @ self.sum_y
        if self.sum_xy is not None:
            d = self.sum_x.shape[1]
            sxy = (w @ self.sum_xy.reshape(self.n_units, d * d)).reshape(-1, d, d)
        else:
            sxy = torch.stack([(self.x * wb[:, None]).T @ self.y for wb in w])
        return sxy - sx[:, :, None] * sy[:, None, :] / n_b[:, None, None]


@single_threaded()
def cross_moments(source: torch.Tensor, target: torch.Tensor,
                  groups: torch.Tensor | None = None) -> CrossMoments:
    """:class:`CrossMoments` of row-aligned ``source``, ``target`` [n, d] (float64), per row or
    per group (``groups``: [n] sequence ids, any integers)."""
    if source.ndim != 2 or source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} must be "
                         "matching [n, d] matrices of the same inputs")
    x, y = source.detach().to("cpu", torch.float64), target.detach().to("cpu", torch.float64)
    n, d = x.shape
    ids, n_units = _group_ids(groups, n)
    if ids is None:
        return CrossMoments(n=torch.ones(n, dtype=torch.float64), sum_x=x, sum_y=y, sum_xy=None,
                            x=x, y=y)
    counts = torch.zeros(n_units, dtype=torch.float64).index_add_(0, ids, torch.ones(n,
                                                                  dtype=torch.float64))
    sx = torch.zeros(n_units, d, dtype=torch.float64).index_add_(0, ids, x)
    sy = torch.zeros(n_units, d, dtype=torch.float64).index_add_(0, ids, y)
    sxy = torch.zeros(n_units, d, d, dtype=torch.float64)
    for start in range(0, n, _CHUNK_ROWS):
        sl = slice(start, start + _CHUNK_ROWS)
        sxy.index_add_(0, ids[sl], x[sl, :, None] * y[sl, None, :])
    return CrossMoments(n=counts, sum_x=sx, sum_y=sy, sum_xy=sxy, x=None, y=None)


@dataclass(frozen=True)
class FitBootstrap:
    """Procrustes refits on bootstrap resamples of the fit's rows or sequences.

    Attributes:
        rotations: [B, d, d] the refitted R_b (same group as the fit).
        noise_angles: [B, d] eigen-angles of ``R^T R_b`` (ascending per resample).
        n_boot, seed: B and the resampling seed. unit: "row" or "sequence"; n_units: how many.
    """

    rotations: torch.Tensor
    noise_angles: torch.Tensor
    n_boot: int
    seed: int
    unit: str
    n_units: int

    def noise_skew(self, r: torch.Tensor) -> torch.Tensor:
        """[B, d, d] skew parts ``(N_b - N_b^T) / 2`` of the noise rotations ``N_b = R^T R_b``."""
        nb = r.T @ self.rotations
        return (nb - nb.transpose(-1, -2)) / 2


@single_threaded()
def bootstrap_rotations(source: torch.Tensor, target: torch.Tensor, rotation: Rotation,
                        n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                        groups: torch.Tensor | None = None) -> FitBootstrap:
    """Refit ``rotation`` (fitted as ``fit_rotation(source, target, group)``) on ``n_boot``
    resamples of whole sequences (``groups``: [n] sequence ids) or of rows (``groups=None``).

    Per-unit sufficient statistics are accumulated once (:func:`cross_moments`), so a sequence
    resample costs a weighted sum and a d x d SVD.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if source.shape[-1] != rotation.d:
        raise ValueError(f"activations are {source.shape[-1]}-d, the rotation is {rotation.d}-d")
    moments = cross_moments(source, target, groups)
    w = resample_counts(moments.n_units, n_boot, seed)
    m = moments.centred_cross_covariance(w)
    rots = torch.stack([procrustes_matrix(mb, rotation.group)[0] for mb in m])
    angles = _angles_and_vectors(rotation.matrix.T @ rots, vectors=False)[0]
    return FitBootstrap(rotations=rots, noise_angles=angles, n_boot=n_boot, seed=seed,
                        unit="row" if groups is None else "sequence", n_units=moments.n_units)


@dataclass(frozen=True)
class NearFixedSubspace:
    """Near-fixed subspace of a fitted rotation, thresholded at the fit's own noise.

    Attributes:
        d, group: of the rotation.
        threshold: tau (module docstring); quantile, factor: the rule's settings.
        eigen_angles: R's angles, ascending.
        count: R's angles below tau (the accepted directions).
        forced: 0 or 1, the angle forced to 0 by det and the parity of d.
        expected_free: a Haar draw's mean number of free angles below tau.
        dim_estimate: ``max(0, round(count - forced - expected_free))``.
        basis: [d, count] orthonormal eigen-directions of the accepted angles;
            :attr:`projector` is basis @ basis^T.
        step_thresholds: [(m, tau(m)), ...] along the fixed-point iteration (first m = d).
        noiseless_threshold, noiseless_estimate: the noiseless rule's tau and estimate on the
            same R (:func:`~polymorph.align.haar.diagnose`), for comparison.
        bootstrap: the :class:`FitBootstrap` the thresholds came from.
    """

    d: int
    group: str
    threshold: float
    quantile: float
    factor: float
    eigen_angles: list[float]
    count: int
    forced: int
    expected_free: float
    dim_estimate: int
    basis: torch.Tensor
    step_thresholds: list[tuple[int, float]]
    noiseless_threshold: float
    noiseless_estimate: int
    bootstrap: FitBootstrap

    @property
    def projector(self) -> torch.Tensor:
        return self.basis @ self.basis.T

    def to_dict(self, include_angles: bool = False) -> dict:
        """JSON-serialisable summary (no basis, no bootstrap rotations)."""
        out = {k: getattr(self, k) for k in (
            "d", "group", "threshold", "quantile", "factor", "count", "forced", "expected_free",
            "dim_estimate", "noiseless_threshold", "noiseless_estimate")}
        out["step_thresholds"] = [list(s) for s in self.step_thresholds]
        out["n_boot"] = self.bootstrap.n_boot
        out["bootstrap_unit"] = self.bootstrap.unit
        if include_angles:
            out["eigen_angles"] = list(self.eigen_angles)
        return out


def _compressed_noise(skew: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B] angle ``asin(min(1, s_max(V^T K_b V)))`` of each noise skew part compressed to V."""
    s = torch.linalg.matrix_norm(v.T @ skew @ v, ord=2)
    return torch.asin(s.clamp(max=1.0))


@single_threaded()
def noise_threshold_steps(r: torch.Tensor, boot: FitBootstrap, quantile: float = DEFAULT_QUANTILE,
                          factor: float = DEFAULT_FACTOR
                          ) -> tuple[int, float, list[tuple[int, float]], torch.Tensor,
                                     torch.Tensor]:
    """The fixed-point rule of the module docstring on orthogonal ``r`` [d, d].

    Returns (count, tau, [(m, tau_m) per iteration], angles, eigenvectors).
    """
    angles, vecs = _angles_and_vectors(r)
    skew = boot.noise_skew(r)
    d = r.shape[0]
    m, steps = d, []
    while True:
        noise = _compressed_noise(skew, vecs[:, :m]) if m > 0 else torch.zeros(1)
        tau = max(factor * float(torch.quantile(noise, quantile)), _EXACT_ANGLE)
        steps.append((m, tau))
        nxt = int((angles <= tau).sum())
        if nxt >= m:  # f(m) <= m along the iteration; equality is the fixed point
            return m, tau, steps, angles, vecs
        m = nxt


def near_fixed_subspace(source: torch.Tensor, target: torch.Tensor, rotation: Rotation,
                        null: HaarNull, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                        groups: torch.Tensor | None = None, quantile: float = DEFAULT_QUANTILE,
                        factor: float = DEFAULT_FACTOR) -> NearFixedSubspace:
    """Near-fixed subspace of ``rotation`` (fitted on ``source`` -> ``target``), thresholded at
    the fit noise estimated by a bootstrap of its rows (or of whole sequences: ``groups``).

    ``null``: the Haar null of the fit's d and group, for the expected count of free angles
    below tau and for the noiseless comparison. See the module docstring for the rule.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    r = _as_orthogonal(rotation.matrix, null.d)
    if rotation.group != null.group:
        raise ValueError(f"the rotation was fitted in {rotation.group}(d) but the null is "
                         f"{null.group}(d); pass haar_null(d, {rotation.group!r})")
    boot = bootstrap_rotations(source, target, rotation, n_boot, seed, groups)
    count, tau, steps, angles, vecs = noise_threshold_steps(r, boot, quantile, factor)
    det = rotation.det
    forced = forced_fixed(null.d, det)
    expected = null.expected_free_below(tau)
    noiseless_count = int((angles < null.fixed_threshold).sum())
    return NearFixedSubspace(
        d=null.d, group=null.group, threshold=tau, quantile=quantile, factor=factor,
        eigen_angles=angles.tolist(), count=count, forced=forced, expected_free=expected,
        dim_estimate=max(0, _round_half_up(count - forced - expected)),
        basis=vecs[:, :count].contiguous(), step_thresholds=steps,
        noiseless_threshold=null.fixed_threshold,
        noiseless_estimate=max(0, _round_half_up(noiseless_count - forced - null.fixed_expected)),
        bootstrap=boot)

