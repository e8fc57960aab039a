"""Trace diagnostics restricted to a subspace: the observed span, or the complement of a shared one.

Span (rank-deficient sites). When a site's activations span r < d directions, the Procrustes R is
determined only on that span S (its completion on the other d - r directions is whatever the SVD
returned) and diagnosing the full matrix judges that arbitrary completion. The honest quantity is
how R moves the vectors of S. With B [d, r] an orthonormal basis of S (:func:`activation_span`),
the statistic is the trace of the *compression* of R to S::

    t_S = tr(B^T R B) = sum_a <b_a, b_a R>,    ||B^T (R - I)||_F^2 = 2r - 2 t_S

(R orthogonal, so ``||B^T R||_F^2 = r``): the span-restricted Frobenius distance is a function of
t_S, and both are basis-independent (any other orthonormal basis of S is B Q with Q orthogonal,
and the trace is invariant). ``B^T R B`` is a contraction, orthogonal only if R maps S onto
itself; an r x r orthogonal "restriction" ``B_s^T R B_t`` with B_t a basis of ``S R`` would need
two bases that are not related, which makes its trace arbitrary, hence the compression.

Null: R Haar on the fit's group in d dimensions, the hypothesis under test. By Haar invariance
t_S has the law of ``R_11 + ... + R_rr``: **mean 0, variance r / d** exactly
(:func:`~polymorph.align.haar.compressed_trace_moments`; r = d gives the ordinary trace), and a
Monte-Carlo sample is the partial diagonal sums of the null draws
(:meth:`~polymorph.align.haar.HaarNull.compressed_traces`). For R = I on S, t_S = r and
``z = sqrt(r d)``; for a Haar R, z ~ N(0, 1) whatever the completion.

Complement (a subspace shared by construction). The toy model's fixed positional code occupies
dims 0..5 in every seed, so a trace excess may come from it alone. With E [d, k] spanning the
subspace to exclude and C [d, d - k] an orthonormal basis of its complement
(:func:`complement_basis`), ``t_C = tr(C^T R C)``. The question is "is R Haar *apart from* E?":
the null hypothesis is that R leaves E (hence C) invariant and is Haar on C, so ``C^T R C`` is a
Haar draw on O(d - k) (SO(d - k) for an SO fit): its trace has the exact moments
``exact_trace_moments(d - k, group)``, (0, 1) for d - k >= 3, and its Monte-Carlo null is
``haar_null(d - k, group)``. (The unconditional null, R Haar on all of O(d), gives the same mean
and a variance (d - k) / d instead of 1, i.e. a z inflated by sqrt(d / (d - k)), 5% at d = 64,
k = 6; it is :func:`span_diagnostics` with ``basis=complement_basis(E)``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polymorph.align.haar import (
    HaarNull,
    _as_orthogonal,
    compressed_trace_moments,
    exact_trace_moments,
    mc_two_sided_p,
)
from polymorph.align.procrustes import single_threaded

# Orthonormality tolerance for a basis handed in by the caller.
_BASIS_TOL = 1e-6
NULL_KINDS = ("haar", "haar_on_complement")


def _default_rtol(d: int) -> float:
    """The relative eigenvalue tolerance of :meth:`Rotation.effective_rank` (d * 1e-12)."""
    return d * 1e-12


@single_threaded()
def principal_directions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors [d, d] of ``Xc^T Xc``, Xc = centred rows of x."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"x must be an activation matrix [n, d], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    vals, vecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    return vals.flip(0), vecs.flip(1)


def activation_span(x: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis [d, r] of the span of the centred rows of ``x`` [n, d], float64.

    The principal directions whose eigenvalue of ``Xc^T Xc`` exceeds ``rtol * max`` (default
    ``d * 1e-12``), in descending order of variance. With the defaults this is the same rank as
    :meth:`~polymorph.align.procrustes.Rotation.effective_rank` of a fit whose cross-covariance
    has the same spectrum (e.g. target = source rotated, where M's singular values *are* these
    eigenvalues).
    """
    vals, vecs = principal_directions(x)
    tol = (_default_rtol(x.shape[1]) if rtol is None else rtol) * float(vals[0].clamp(min=0))
    r = int((vals > tol).sum())
    return vecs[:, :r].contiguous()


@single_threaded()
def complement_basis(exclude: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis [d, d - k] of the orthogonal complement of the column span of
    ``exclude`` [d, m] (any vectors, e.g. the positional code's rows transposed; k is their rank,
    counted like :func:`activation_span`: squared singular values above ``rtol * max``).
    """
    if not isinstance(exclude, torch.Tensor) or exclude.ndim != 2:
        raise ValueError(f"exclude must be a [d, m] matrix of column vectors, got "
                         f"{getattr(exclude, 'shape', type(exclude).__name__)}")
    e = exclude.detach().to("cpu", torch.float64)
    d = e.shape[0]
    u, s, _ = torch.linalg.svd(e, full_matrices=True)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return u
    tol = (_default_rtol(d) if rtol is None else rtol) * float(s.max()) ** 2
    k = int((s.pow(2) > tol).sum())
    return u[:, k:].contiguous()


def _check_basis(basis: torch.Tensor, d: int) -> torch.Tensor:
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[0] != d:
        raise ValueError(f"basis must be [d={d}, r] with orthonormal columns, got "
                         f"{getattr(basis, 'shape', type(basis).__name__)}")
    b = basis.detach().to("cpu", torch.float64)
    err = (b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max().item() \
        if b.shape[1] else 0.0
    if err > _BASIS_TOL:
        raise ValueError(f"basis columns are not orthonormal (max |B^T B - I| = {err:.3g}); "
                         "build it with activation_span or complement_basis")
    return b


@dataclass(frozen=True)
class SpanDiagnostics:
    """Trace diagnostics of R restricted to an r-dimensional subspace with basis B [d, r].

    Attributes:
        d, rank: ambient dimension and r. group: the group of the fit and of the null.
        null: "haar" (R Haar on O(d)/SO(d): :func:`span_diagnostics`) or "haar_on_complement"
            (R invariant on the subspace and Haar there: :func:`complement_diagnostics`).
        trace: ``tr(B^T R B)``.
        trace_exact_mean, trace_exact_var: its exact null moments.
        trace_z: ``(trace - mean) / sqrt(var)`` (NaN for an empty subspace).
        trace_p: two-sided Monte-Carlo p-value against the null's samples, centred at the exact
            mean (see :func:`~polymorph.align.haar.mc_two_sided_p`).
        frob_dist_on_span: ``||B^T (R - I)||_F = sqrt(2r - 2 trace)``; 0 iff R fixes every
            vector of the subspace. frob_ratio_on_span: divided by sqrt(2r), its Haar scale.
        retained: ``||B^T R B||_F^2 / r`` in [0, 1], the fraction of the subspace R maps back
            into itself (1 if R maps it onto itself; r / d on average for a Haar R).
    """

    d: int
    rank: int
    group: str
    null: str
    trace: float
    trace_exact_mean: float
    trace_exact_var: float
    trace_z: float
    trace_p: float
    frob_dist_on_span: float
    frob_ratio_on_span: float
    retained: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _summarise(r: torch.Tensor, b: torch.Tensor, group: str, null_kind: str,
               moments: tuple[float, float], null_traces) -> SpanDiagnostics:
    rank = b.shape[1]
    comp = b.T @ r @ b
    trace = float(torch.trace(comp))
    mean, var = moments
    z = (trace - mean) / math.sqrt(var) if var > 0 else float("nan")
    frob = math.sqrt(max(2 * rank - 2 * trace, 0.0))
    return SpanDiagnostics(
        d=r.shape[0], rank=rank, group=group, null=null_kind, trace=trace,
        trace_exact_mean=mean, trace_exact_var=var, trace_z=z,
        trace_p=mc_two_sided_p(trace, null_traces, mean), frob_dist_on_span=frob,
        frob_ratio_on_span=frob / math.sqrt(2 * rank) if rank else float("nan"),
        retained=float(comp.pow(2).sum() / rank) if rank else float("nan"))


@single_threaded()
def span_diagnostics(r: torch.Tensor, basis: torch.Tensor, null: HaarNull) -> SpanDiagnostics:
    """Trace test of orthogonal ``r`` [d, d] restricted to the span of ``basis`` [d, r_span].

    ``basis``: orthonormal columns spanning the *source* activations of the fit (R acts on
    source-frame rows: ``x R``), e.g. ``activation_span(source_fit_rows)``. ``null``: the Haar
    null of the fit's d and group (``haar_null(d, rotation.group)``). Null "haar": exact
    moments ``(0, r_span / d)`` (module docstring); for r_span = d this is :func:`diagnose`'s
    trace test.
    """
    r = _as_orthogonal(r, null.d)
    b = _check_basis(basis, null.d)
    moments = compressed_trace_moments(null.d, b.shape[1], null.group)
    return _summarise(r, b, null.group, "haar", moments, null.compressed_traces(b.shape[1]))


@single_threaded()
def complement_diagnostics(r: torch.Tensor, exclude: torch.Tensor, null: HaarNull,
                           rtol: float | None = None) -> SpanDiagnostics:
    """Trace test of orthogonal ``r`` [d, d] on the orthogonal complement of ``exclude`` [d, m].

    ``exclude``: vectors spanning the subspace to leave out (any [d, m], e.g. the positional
    code's rows transposed; its rank k is counted as in :func:`complement_basis`). ``null``:
    the Haar null of the *complement*, ``haar_null(d - k, group)`` with the fit's group: the
    null hypothesis is "R leaves the excluded subspace invariant and is Haar on the rest", under
    which ``C^T R C`` is a Haar draw in d - k dimensions (exact moments
    ``exact_trace_moments(d - k, group)``). A trace excess from the excluded subspace alone then
    gives a z ~ N(0, 1); an excess elsewhere a large z.
    """
    r = _as_orthogonal(r)
    d = r.shape[0]
    if not isinstance(exclude, torch.Tensor) or exclude.ndim != 2 or exclude.shape[0] != d:
        raise ValueError(f"exclude must be [d={d}, m] (column vectors), got "
                         f"{getattr(exclude, 'shape', type(exclude).__name__)}")
    c = complement_basis(exclude, rtol)
    if null.d != c.shape[1]:
        raise ValueError(f"the complement is {c.shape[1]}-d (d={d} minus the excluded rank "
                         f"{d - c.shape[1]}) but the null is {null.d}-d: pass "
                         f"haar_null({c.shape[1]}, group)")
    moments = exact_trace_moments(c.shape[1], null.group) if c.shape[1] else (0.0, 0.0)
    return _summarise(r, c, null.group, "haar_on_complement", moments, null.traces)
