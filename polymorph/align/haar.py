"""Is a fitted rotation a uniform (Haar) random draw? Diagnostics against exact and Monte-Carlo nulls.

For an orthogonal R, ``||R - I||_F^2 = 2d - 2 tr(R)``. Under the Haar measure, ``tr(R)`` has mean
0 and variance 1 exactly for O(d) (every d >= 1) and SO(d) (d >= 3) (Diaconis & Shahshahani; the
small-d values are in :func:`exact_trace_moments`), so ``||R - I||_F ~ sqrt(2d)``. The group still
matters for everything beyond the first two moments (an SO(d) draw of odd d always has an
eigenvalue +1, for instance), so every Monte-Carlo null is simulated for the same (d, group) as
the matrix it judges.

Eigen-angles: the eigenvalues of a real orthogonal R are ``exp(+-i theta)`` pairs and real +-1.
This module reports the multiset ``|arg(lambda)|`` in [0, pi], one angle per eigenvalue (so a
complex pair contributes its angle twice). It is computed from the symmetric matrix
``S = (R - I)^T (R - I) = 2I - R - R^T``: R is normal, so S has the eigenvalues
``|lambda - 1|^2 = 2 - 2 cos(theta)`` with the same multiplicities and eigenvectors spanning R's
real invariant planes. One symmetric eigendecomposition (``eigh``) therefore gives the angles
(``theta = 2 asin(sqrt(mu) / 2)``) and the invariant subspaces in the same order; it equals the
SVD of ``R - I`` (singular values ``2 sin(theta/2)``) and is 3x cheaper than it, and 10x cheaper
than a general eigensolver.

Tests (docs/method.md, "Haar diagnostics" and "Calibration"):
  * trace: ``z = (tr R - m) / sqrt(v)`` with the *exact* Haar moments ``(m, v)`` of
    :func:`exact_trace_moments` (no Monte-Carlo error in z), and a two-sided empirical p-value
    ``(1 + #{null : |t0 - m| >= |t - m|}) / (n_null + 1)`` from the simulated null (the
    simulation's own mean and std are kept for reference, not used).
  * KS: the published two-sample Kolmogorov-Smirnov test of R's eigen-angles against the pooled
    angles of the null draws (``scipy.stats.ks_2samp``). Haar angles repel each other, so the
    angles of one draw are far more regular than an i.i.d. sample: KS p-values of Haar draws sit
    near 1 and the test is conservative, with little power against a small fixed subspace.
  * near-fixed subspace, see :func:`simulate_haar_null` for the noiseless threshold rule and
    :mod:`polymorph.align.fixed` for the threshold calibrated to the fit's own noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import stats

from polymorph.align.procrustes import GROUPS, single_threaded

DEFAULT_NULL_SAMPLES = 256
# Near-fixed threshold: the null's expected number of free (not group-forced) angles below it,
# per matrix.
FIXED_EXCESS_RATE = 0.05
# Orthogonality tolerance for matrices handed to diagnose().
_ORTHO_TOL = 1e-5


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def compressed_trace_moments(d: int, r: int, group: str = "O") -> tuple[float, float]:
    """Exact mean and variance of ``tr(B^T R B)`` for R Haar on ``group`` in d dimensions and B
    any fixed orthonormal [d, r] basis (0 <= r <= d); ``r = d`` is the trace itself.

    Derivation: Haar is invariant under ``R -> Q^T R Q``, so ``tr(B^T R B)`` has the law of
    ``R_11 + ... + R_rr``. For O(d) (any d, as -R ~ R) and SO(d) with d >= 2, ``E R = 0``. For
    O(d) (any d) and SO(d) with d >= 3 the only invariant of two tensor factors is the identity,
    so ``E[R_ij R_kl] = delta_ik delta_jl / d``: ``Var R_aa = 1/d`` and ``Cov(R_aa, R_bb) = 0``
    for a != b, hence **mean 0, variance r/d**. The exceptions are the two abelian groups:
    SO(1) = {1} (mean r, variance 0) and SO(2), where ``R = [[c, -s], [s, c]]`` with
    ``c = cos(theta)``, theta uniform: ``R_11 = R_22 = c`` are perfectly correlated, so r = 1
    gives (0, 1/2) (= r/d) but r = 2 gives tr = 2c: (0, 2).
    """
    _check_group(group)
    if d < 1 or not 0 <= r <= d:
        raise ValueError(f"need d >= 1 and 0 <= r <= d, got d={d}, r={r}")
    if group == "SO" and d == 1:
        return float(r), 0.0
    if group == "SO" and d == 2 and r == 2:
        return 0.0, 2.0
    return 0.0, r / d


def exact_trace_moments(d: int, group: str = "O") -> tuple[float, float]:
    """Exact (mean, variance) of tr(R) for R Haar on O(d) or SO(d).

    (0, 1) for O(d), every d >= 1, and for SO(d), d >= 3 (Diaconis & Shahshahani 1994: the
    first d moments of tr R equal those of N(0, 1)). Small groups, by hand:
    O(1) = {+1, -1}: tr = +-1 equally, (0, 1); SO(1) = {1}: tr = 1, (1, 0);
    O(2): half the mass is rotations (tr = 2 cos(theta), theta uniform) and half reflections
    (tr = 0), so (0, (1/2) * 2 + (1/2) * 0) = (0, 1); SO(2): tr = 2 cos(theta), (0, 2).
    A special case (r = d) of :func:`compressed_trace_moments`.
    """
    return compressed_trace_moments(d, d, group)


def trace_zscore(trace: float | torch.Tensor | np.ndarray, d: int, group: str = "O",
                 r: int | None = None) -> float | torch.Tensor | np.ndarray:
    """``(t - m) / sqrt(v)`` with the exact Haar moments of :func:`compressed_trace_moments`
    (``r=None``: the full trace, r = d). Works elementwise on arrays; NaN where v = 0 (SO(1),
    whose only element is the identity, has no spread to measure against).
    """
    m, v = compressed_trace_moments(d, d if r is None else r, group)
    if v == 0:
        return trace * float("nan")
    return (trace - m) / math.sqrt(v)


def _draw(d: int, group: str, g: torch.Generator, batch: int | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Haar draws and their determinants (exact, without an LU factorisation).

    ``G = Q_raw R`` by Householder QR: ``Q_raw`` is a product of the reflectors with tau != 0
    (each has det -1), and the sign fix multiplies column j by sign(R_jj), so
    ``det(Q) = (-1)^#{tau != 0} * prod sign(R_jj)``.
    """
    shape = (d, d) if batch is None else (batch, d, d)
    with single_threaded():
        a, tau = torch.geqrf(torch.randn(shape, generator=g, dtype=torch.float64))
        signs = torch.sign(torch.diagonal(a, dim1=-2, dim2=-1))
        q = torch.linalg.householder_product(a, tau) * signs.unsqueeze(-2)
    det = (1.0 - 2.0 * ((tau != 0).sum(-1) % 2)).to(torch.float64) * signs.prod(-1)
    if group == "SO":
        neg = det < 0
        q[..., :, 0] = torch.where(neg.unsqueeze(-1), -q[..., :, 0], q[..., :, 0])
        det = det.abs()
    return q, det


def haar_orthogonal(d: int, group: str = "O", seed: int | torch.Generator | None = None,
                    batch: int | None = None) -> torch.Tensor:
    """Haar-random orthogonal matrices, float64 [d, d] (or [batch, d, d]).

    QR of a standard Gaussian matrix with the sign fix (Mezzadri 2007): multiplying Q's columns
    by the signs of R's diagonal makes the distribution exactly Haar on O(d). For SO(d), draws
    with det -1 get their first column negated, which maps Haar on O(d) onto Haar on SO(d).
    ``seed`` is an int or a torch.Generator (for a stream of independent draws).
    """
    _check_group(group)
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    return _draw(d, group, _generator(seed), batch)[0]


@single_threaded()
def haar_with_fixed_block(d: int, k: int, group: str = "O",
                          seed: int | torch.Generator | None = None) -> torch.Tensor:
    """A Haar draw that leaves a random k-dimensional subspace exactly fixed: float64 [d, d].

    ``P diag(I_k, H) P^T`` with P Haar on O(d) and H Haar on ``group`` in d - k dimensions: the
    planted ground truth for the power of the diagnostics.
    """
    if not 0 <= k <= d:
        raise ValueError(f"fixed block k must be in [0, d={d}], got {k}")
    g = _generator(seed)
    p = haar_orthogonal(d, "O", g)
    block = torch.eye(d, dtype=torch.float64)
    if k < d:
        block[k:, k:] = haar_orthogonal(d - k, group, g)
    return p @ block @ p.T


def _angles_and_vectors(r: torch.Tensor, vectors: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigen-angles in [0, pi], ascending, and (optionally) matching orthonormal eigenvectors."""
    d = r.shape[-1]
    s = 2.0 * torch.eye(d, dtype=torch.float64) - r - r.transpose(-1, -2)
    with single_threaded():
        if vectors:
            mu, vecs = torch.linalg.eigh(s)
        else:
            mu, vecs = torch.linalg.eigvalsh(s), None
    half_chord = (mu.clamp(min=0.0).sqrt() / 2).clamp(max=1.0)
    return 2.0 * torch.asin(half_chord), vecs


@single_threaded()
def eigen_angles(r: torch.Tensor) -> torch.Tensor:
    """``|arg(lambda)|`` of every eigenvalue of orthogonal ``r`` (float64 [d], ascending, in [0, pi])."""
    r = _as_orthogonal(r)
    return _angles_and_vectors(r, vectors=False)[0]


def forced_fixed(d: int, det: float) -> int:
    """Eigenvalues +1 that the group and parity force on any orthogonal matrix: 0 or 1.

    A real orthogonal matrix has its non-real eigenvalues in conjugate pairs, so the number of
    real eigenvalues has the parity of d and their product is det. Hence: odd d with det +1 has
    an eigenvalue +1 (odd d with det -1 has -1 instead); even d with det -1 has both +1 and -1.
    """
    return int((d % 2 == 1 and det > 0) or (d % 2 == 0 and det < 0))


@dataclass(frozen=True)
class HaarNull:
    """Monte-Carlo samples of the Haar measure on ``group`` in d dimensions.

    Arrays are read-only numpy (the object is shared through :func:`haar_null`'s cache).

    Attributes:
        traces: [n_samples], tr(R) of each draw.
        dets: [n_samples], det(R) of each draw (+1 or -1).
        angles: [n_samples, d], each draw's eigen-angles, ascending.
        pooled_angles: [n_samples * d], all angles, ascending (the KS reference sample).
        free_angles: the pooled angles without the zero that :func:`forced_fixed` forces on a
            draw (its first angle), ascending: the reference for :meth:`expected_free_below`.
        diagonals: [n_samples, d], each draw's diagonal; ``diagonals[:, :r].sum(1)`` is a sample
            of ``tr(B^T R B)`` for any fixed orthonormal [d, r] basis B (Haar invariance), the
            Monte-Carlo null of the span-restricted trace (:mod:`polymorph.align.span`).
        trace_mean, trace_std: the *simulated* moments of ``traces`` (std with ddof=1), kept to
            check the simulation against :attr:`exact_trace_mean` / :attr:`exact_trace_var`;
            z-scores use the exact ones.
        fixed_threshold: tau, the angle below which an eigen-direction counts as near-fixed
            (noiseless rule, see :func:`simulate_haar_null`).
        fixed_expected: the null's mean count per matrix of *free* angles below tau (angles
            forced to 0 by :func:`forced_fixed` excluded), about ``FIXED_EXCESS_RATE``.
    """

    d: int
    group: str
    n_samples: int
    seed: int
    traces: np.ndarray
    dets: np.ndarray
    angles: np.ndarray
    pooled_angles: np.ndarray
    trace_mean: float
    trace_std: float
    fixed_threshold: float
    fixed_expected: float
    free_angles: np.ndarray
    diagonals: np.ndarray

    @property
    def exact_trace_mean(self) -> float:
        """E tr(R) under Haar, exactly (:func:`exact_trace_moments`)."""
        return exact_trace_moments(self.d, self.group)[0]

    @property
    def exact_trace_var(self) -> float:
        """Var tr(R) under Haar, exactly (:func:`exact_trace_moments`)."""
        return exact_trace_moments(self.d, self.group)[1]

    def expected_free_below(self, tau: float) -> float:
        """Mean number per Haar draw of free (not group-forced) eigen-angles strictly below tau.

        Any tau, not only :attr:`fixed_threshold`: the count of :attr:`free_angles` below tau
        divided by ``n_samples``. Its Monte-Carlo resolution is ``1 / n_samples``; near 0 it
        grows linearly in tau for O(2m) and SO(2m) (whose angle density does not vanish at 0)
        and like tau^3 for the other cases.
        """
        return float(np.searchsorted(self.free_angles, tau, side="left") / self.n_samples)

    def compressed_traces(self, r: int) -> np.ndarray:
        """[n_samples] samples of ``tr(B^T R B)`` for a fixed orthonormal [d, r] basis B."""
        if not 0 <= r <= self.d:
            raise ValueError(f"r must be in [0, d={self.d}], got {r}")
        return self.diagonals[:, :r].sum(axis=1)


@single_threaded()
def simulate_haar_null(d: int, group: str = "O", n_samples: int = DEFAULT_NULL_SAMPLES,
                       seed: int = 0, chunk: int = 8) -> HaarNull:
    """Draw ``n_samples`` Haar matrices and summarise their traces, diagonals and eigen-angles.

    Near-fixed threshold rule (robust to the group and parity of d): from each draw drop the
    angle the group forces to 0 (:func:`forced_fixed`; e.g. half of all O(2m) draws have an exact
    eigenvalue +1); among the remaining *free* pooled angles, tau is the smallest angle with
    ``round(FIXED_EXCESS_RATE * n_samples)`` free angles below it, i.e. a Haar draw has on
    average 0.05 free angles below tau (one near-fixed plane in about 40 draws). A matrix's
    estimate is then ``max(0, round(count_below(tau) - forced - fixed_expected))``: its excess of
    near-fixed directions over what Haar gives. This tau ignores fit noise (0.0027 rad at d=64):
    for a fitted R use :func:`polymorph.align.fixed.near_fixed_subspace`.
    """
    _check_group(group)
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a null distribution, got {n_samples}")
    g = _generator(seed)
    diagonals, dets, angles = [], [], []
    done = 0
    while done < n_samples:
        b = min(chunk, n_samples - done)
        q, det = _draw(d, group, g, batch=b)
        diagonals.append(torch.diagonal(q, dim1=-2, dim2=-1))
        dets.append(det)
        angles.append(_angles_and_vectors(q, vectors=False)[0])
        done += b
    diag = torch.cat(diagonals).numpy()
    tr = diag.sum(axis=1)
    det = torch.cat(dets).numpy()
    ang = torch.cat(angles).numpy()
    forced = np.array([forced_fixed(d, x) for x in det], dtype=bool)
    # Angles are ascending per draw, so a forced zero is each forced draw's first angle.
    free = np.sort(np.concatenate([ang[~forced].ravel(), ang[forced, 1:].ravel()]))
    k = min(max(1, round(FIXED_EXCESS_RATE * n_samples)), free.size - 1)
    tau = float(free[k]) if free.size else 0.0  # SO(1) has no free angle
    expected = float(np.searchsorted(free, tau, side="left") / n_samples)
    pooled = np.sort(ang, axis=None)
    for arr in (tr, det, ang, pooled, free, diag):
        arr.setflags(write=False)
    return HaarNull(d=d, group=group, n_samples=n_samples, seed=seed, traces=tr, dets=det,
                    angles=ang, pooled_angles=pooled, trace_mean=float(tr.mean()),
                    trace_std=float(tr.std(ddof=1)), fixed_threshold=tau,
                    fixed_expected=expected, free_angles=free, diagonals=diag)


@lru_cache(maxsize=32)
def haar_null(d: int, group: str = "O", n_samples: int = DEFAULT_NULL_SAMPLES,
              seed: int = 0) -> HaarNull:
    """Cached :func:`simulate_haar_null`: every caller with the same arguments shares one null."""
    return simulate_haar_null(d, group, n_samples, seed)


def _as_orthogonal(r: torch.Tensor, d: int | None = None) -> torch.Tensor:
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor rotation matrix, got {type(r).__name__}")
    r = r.detach().to("cpu", torch.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"expected a square [d, d] matrix, got shape {tuple(r.shape)}")
    if d is not None and r.shape[0] != d:
        raise ValueError(f"matrix is {r.shape[0]}-d but the Haar null is {d}-d; build the null "
                         f"with haar_null({r.shape[0]}, group)")
    if not torch.isfinite(r).all():
        raise ValueError("rotation matrix contains NaN or infinite values")
    err = (r.T @ r - torch.eye(r.shape[0], dtype=torch.float64)).abs().max().item()
    if err > _ORTHO_TOL:
        raise ValueError(f"matrix is not orthogonal (max |R^T R - I| = {err:.3g} > {_ORTHO_TOL})")
    return r


@dataclass(frozen=True)
class HaarDiagnostics:
    """Diagnostics of one orthogonal matrix against a Haar null of the same d and group.

    Attributes:
        frob_dist: ||R - I||_F. frob_ratio: frob_dist / sqrt(2d) (about 1 for Haar, 0 for R = I).
        trace: tr(R). det: +1 or -1.
        trace_z: ``(trace - trace_exact_mean) / sqrt(trace_exact_var)``, the exact Haar moments
            of :func:`exact_trace_moments` ((0, 1) for d >= 3); NaN for SO(1).
        trace_p: two-sided Monte-Carlo p-value, ``(1 + #{null : |t0 - m| >= |t - m|}) /
            (n_null + 1)`` with m = trace_exact_mean.
        trace_exact_mean, trace_exact_var: the exact null moments used by trace_z.
        trace_mc_mean, trace_mc_std: the simulated null's moments (a check on the simulation,
            not used by trace_z).
        eigen_angles: ascending angles in [0, pi] (length d).
        ks_stat, ks_p: two-sample KS of eigen_angles against the null's pooled angles.
        fixed_threshold: tau (from the null, noiseless). fixed_count: number of angles below tau.
        fixed_forced: 0 or 1, the angle at 0 forced by det and the parity of d.
        fixed_expected: the null's mean count of free angles below tau.
        fixed_dim_estimate: ``max(0, round(fixed_count - fixed_forced - fixed_expected))``, the
            near-fixed dimensions in excess of a Haar draw.
        fixed_basis: [d, fixed_count] float64 orthonormal columns spanning the eigen-directions
            with angle below tau (an exactly fixed subspace is spanned by them; a forced +1
            direction is included); :attr:`fixed_projector` is basis @ basis^T.
    """

    d: int
    group: str
    frob_dist: float
    frob_ratio: float
    trace: float
    trace_z: float
    trace_p: float
    det: float
    eigen_angles: list[float]
    ks_stat: float
    ks_p: float
    fixed_threshold: float
    fixed_count: int
    fixed_forced: int
    fixed_expected: float
    fixed_dim_estimate: int
    fixed_basis: torch.Tensor
    trace_exact_mean: float = 0.0
    trace_exact_var: float = 1.0
    trace_mc_mean: float = float("nan")
    trace_mc_std: float = float("nan")

    @property
    def fixed_projector(self) -> torch.Tensor:
        """Orthogonal projector [d, d] onto the near-fixed subspace (rank ``fixed_count``)."""
        return self.fixed_basis @ self.fixed_basis.T

    def to_dict(self, include_angles: bool = True, include_basis: bool = False) -> dict:
        """JSON-serialisable primitives (floats, ints, str, lists)."""
        out = {k: getattr(self, k) for k in (
            "d", "group", "frob_dist", "frob_ratio", "trace", "trace_z", "trace_p", "det",
            "trace_exact_mean", "trace_exact_var", "trace_mc_mean", "trace_mc_std",
            "ks_stat", "ks_p", "fixed_threshold", "fixed_count", "fixed_forced", "fixed_expected",
            "fixed_dim_estimate")}
        if include_angles:
            out["eigen_angles"] = list(self.eigen_angles)
        if include_basis:
            out["fixed_basis"] = self.fixed_basis.tolist()
        return out


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def mc_two_sided_p(value: float, null_samples: np.ndarray, centre: float) -> float:
    """``(1 + #{s : |s - centre| >= |value - centre|}) / (n + 1)``: never 0, exact under the null.

    A tiny relative slack (1e-12) counts null samples equal to ``value`` up to rounding as
    extreme (e.g. SO(1), where every sample equals the statistic).
    """
    dev = abs(value - centre)
    n_extreme = int((np.abs(null_samples - centre) >= dev * (1 - 1e-12)).sum())
    return (1 + n_extreme) / (null_samples.size + 1)


@single_threaded()
def diagnose(r: torch.Tensor, null: HaarNull) -> HaarDiagnostics:
    """All Haar diagnostics of one orthogonal matrix ``r`` [d, d] against ``null``.

    Pass the null of the group the fit was restricted to (``haar_null(d, rotation.group)``); a
    det -1 matrix against an SO null is an error. Where the activations span fewer than d
    directions, R is arbitrary off their span: use :func:`polymorph.align.span.span_diagnostics`.
    """
    r = _as_orthogonal(r, null.d)
    d = null.d
    det = float(torch.sign(torch.linalg.det(r)))
    if null.group == "SO" and det < 0:
        raise ValueError("det(R) = -1 but the null is SO(d): use haar_null(d, 'O') for an O(d) fit")
    angles, _ = _angles_and_vectors(r, vectors=False)
    count = int((angles < null.fixed_threshold).sum())
    basis = torch.zeros(d, 0, dtype=torch.float64)
    if count > 0:  # eigenvectors cost twice the eigenvalues: only when a subspace is reported
        angles, vecs = _angles_and_vectors(r)
        basis = vecs[:, :count].contiguous()
    trace = float(torch.trace(r))
    frob = float(torch.linalg.norm(r - torch.eye(d, dtype=torch.float64)))
    mean, var = exact_trace_moments(d, null.group)
    ks = stats.ks_2samp(angles.numpy(), null.pooled_angles)
    forced = forced_fixed(d, det)
    estimate = max(0, _round_half_up(count - forced - null.fixed_expected))
    return HaarDiagnostics(
        d=d, group=null.group, frob_dist=frob, frob_ratio=frob / math.sqrt(2 * d), trace=trace,
        trace_z=float(trace_zscore(trace, d, null.group)),
        trace_p=mc_two_sided_p(trace, null.traces, mean), det=det,
        eigen_angles=angles.tolist(), ks_stat=float(ks.statistic), ks_p=float(ks.pvalue),
        fixed_threshold=null.fixed_threshold, fixed_count=count, fixed_forced=forced,
        fixed_expected=null.fixed_expected, fixed_dim_estimate=estimate,
        fixed_basis=basis, trace_exact_mean=mean, trace_exact_var=var,
        trace_mc_mean=null.trace_mean, trace_mc_std=null.trace_std)


@dataclass(frozen=True)
class HaarDiagnosticsSet:
    """Diagnostics of several matrices (e.g. every seed against the anchor at one site).

    Attributes:
        per_matrix: one :class:`HaarDiagnostics` per matrix, in input order.
        pooled_ks_stat, pooled_ks_p: KS of all matrices' angles pooled (the published test)
            against the null's pooled angles.
        pooled_trace_z, pooled_trace_p: ``sum_i (t_i - m) / sqrt(k v)`` over the k matrices,
            with the exact Haar moments (m, v) of :func:`exact_trace_moments`, and its two-sided
            normal p-value (the Haar trace is close to normal for any d >= 3, its first d
            moments being normal ones, and a sum of independent ones more so). Assumes the
            matrices are independent (not true of pairs sharing a seed).
    """

    per_matrix: list[HaarDiagnostics]
    pooled_ks_stat: float
    pooled_ks_p: float
    pooled_trace_z: float
    pooled_trace_p: float

    def to_dict(self, include_angles: bool = False) -> dict:
        return {"n_matrices": len(self.per_matrix), "pooled_ks_stat": self.pooled_ks_stat,
                "pooled_ks_p": self.pooled_ks_p, "pooled_trace_z": self.pooled_trace_z,
                "pooled_trace_p": self.pooled_trace_p,
                "per_matrix": [m.to_dict(include_angles=include_angles) for m in self.per_matrix]}


def pooled_trace_z(traces: list[float] | torch.Tensor | np.ndarray, d: int,
                   group: str = "O") -> float:
    """``sum_i (t_i - m) / sqrt(k v)`` for k traces of d x d matrices, exact Haar (m, v)."""
    t = np.asarray(traces, dtype=np.float64)
    if t.size == 0:
        raise ValueError("pooled_trace_z needs at least one trace")
    m, v = exact_trace_moments(d, group)
    if v == 0:
        return float("nan")
    return float((t - m).sum() / math.sqrt(t.size * v))


def diagnose_many(rs: list[torch.Tensor] | torch.Tensor, null: HaarNull) -> HaarDiagnosticsSet:
    """:func:`diagnose` each matrix, plus the pooled KS and a pooled trace test."""
    if len(rs) == 0:
        raise ValueError("diagnose_many needs at least one matrix")
    per = [diagnose(r, null) for r in rs]
    pooled = np.concatenate([np.asarray(m.eigen_angles) for m in per])
    ks = stats.ks_2samp(pooled, null.pooled_angles)
    z = pooled_trace_z([m.trace for m in per], null.d, null.group)
    return HaarDiagnosticsSet(per_matrix=per, pooled_ks_stat=float(ks.statistic),
                              pooled_ks_p=float(ks.pvalue), pooled_trace_z=z,
                              pooled_trace_p=float(2 * stats.norm.sf(abs(z))))
