"""Generalised Procrustes analysis: one consensus frame for many seeds' residual streams.

Pairwise Procrustes (:mod:`polymorph.align.procrustes`) gives one map per *pair* of seeds; with
nine seeds those 36 maps need not compose consistently (``R_ab R_bc != R_ac`` under noise).
Generalised Procrustes (Gower 1975; Ten Berge 1977) instead fits one map per seed into a shared
*consensus* frame, so every pairwise map is implied and the maps compose exactly.

Objective. Rows are samples and every matrix holds the seeds' activations on the same inputs in
the same order. With ``X_i`` seed i's per-dimension-centred activations, ``R_i`` orthogonal and
``s_i > 0`` (1 unless ``scale=True``), ``Z_i = s_i X_i R_i`` and ``Y = mean_i Z_i``::

    f(R, s) = sum_i ||Z_i - Y||_F^2

Algorithm (Gower's simultaneous update). Start from ``Y = X_ref``; repeat: fit every ``R_i`` by
Procrustes of ``X_i`` onto the current ``Y`` (:func:`~polymorph.align.procrustes.procrustes_matrix`,
so ``group="SO"`` gets the Kabsch fix); with ``scale=True`` set the scales to their optimum for
the new rotations; recompute ``Y``. Each Procrustes step lowers each seed's distance to the fixed
``Y`` and the new mean is the best ``Y`` for the new ``Z_i``, so ``f`` never increases. Stop when
``(f_prev - f) <= tol * f_prev`` (or ``f`` is ~0: the seeds are exact rotations of each other).

Scales (``scale=True``). Without a constraint, shrinking every ``s_i`` to 0 would win, so the
scales obey Ten Berge's normalisation ``sum_i s_i^2 ||X_i||^2 = sum_i ||X_i||^2``. Under it
``f = sum_i ||X_i||^2 - n ||Y||^2``, and the optimal scales for fixed rotations maximise
``s^T G s`` with ``G_ij = tr(R_i^T X_i^T X_j R_j)``: ``s = sqrt(K) D^-1/2 v``, v the leading
eigenvector of ``D^-1/2 G D^-1/2`` (``D = diag G``, ``K = tr D``). ``objective`` and
``residual_fraction`` are reported in that normalisation; the returned maps and consensus use
the reference gauge below instead (``s_ref = 1``).

Gauge. ``R_i -> R_i G`` (and ``s_i -> c s_i``) leaves ``f`` unchanged, so the consensus frame is
only defined up to one global rotation and scale. polymorph fixes it in the ``reference`` seed's
frame by right-multiplying every map by ``R_ref^T`` and dividing every scale by ``s_ref``: the
reference seed's map is then the identity **up to float rounding** (its centring and the
rounding of ``R_ref R_ref^T`` are the only differences), and every consensus coordinate is
expressed in the reference's basis and units, with the reference's mean added back. At a GPA
fixed point this is the same as re-fitting the consensus onto the reference by Procrustes (the
reverse fit of ``X_ref`` onto ``Y`` is ``R_ref^T``); fixing the gauge this way is exact instead
of depending on how converged the last iteration is. Implied pairwise maps
(:meth:`Consensus.pairwise_map`) do not depend on the gauge.

Two seeds. For n = 2 the objective is ``const - 2 s_0 s_1 tr(R_0^T X_0^T X_1 R_1)``, maximised
by the pairwise Procrustes rotation whatever the scales, so the implied map equals
:func:`~polymorph.align.procrustes.fit_rotation` of the pair (``Consensus.is_pairwise``); one seed
gives the identity map.

Cost. Nothing in the loop touches the [n, d] data: the cross-Gram blocks ``C_ij = X_i^T X_j``
are accumulated once over row chunks (float64, or float32 products accumulated in float64 with
``precision="float32"``, as in ``fit_rotation``), and each iteration is ``n_seeds^2`` d x d
products plus ``n_seeds`` d x d SVDs, on one thread
(:func:`~polymorph.align.procrustes.single_threaded`). Only the returned consensus matrix is
[n, d] (float64 for ``precision="float64"``, else float32).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from polymorph.align.procrustes import (
    PRECISIONS,
    Rotation,
    _check_group,
    procrustes_matrix,
    single_threaded,
)

# Row chunk for the cross-Gram accumulation, chosen so one float64 chunk of all seeds side by
# side ([rows, n_seeds * d]) stays near 128 MB whatever n, d and n_seeds are.
_CHUNK_ELEMENTS = 1 << 24
# An objective below this fraction of the total sum of squares means the seeds are exact
# rotations of each other (float rounding only): stop, the relative change is noise there.
_EXACT_FIT = 1e-14


@dataclass(frozen=True)
class ScaledRotation:
    """An orthogonal map with one global scale: ``apply(x) = (x - source_mean) @ (scale R) +
    target_mean``. What ``fit_consensus(..., scale=True)`` returns per seed.

    Attributes:
        matrix: R, float64 [d, d], orthogonal (checked as in :class:`Rotation`).
        scale: s > 0, multiplies the centred, rotated activations.
        source_mean, target_mean: float64 [d].
        group: "O" or "SO".
        n_fit_rows: rows the fit used.
    """

    matrix: torch.Tensor
    scale: float
    source_mean: torch.Tensor
    target_mean: torch.Tensor
    group: str = "O"
    n_fit_rows: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)
                and self.scale > 0):
            raise ValueError(f"ScaledRotation.scale must be a finite number > 0, got "
                             f"{self.scale!r}")
        # Rotation validates the matrix, the means and the group; keep its float64 copies.
        rot = self.rotation
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "matrix", rot.matrix)
        object.__setattr__(self, "source_mean", rot.source_mean)
        object.__setattr__(self, "target_mean", rot.target_mean)

    @property
    def rotation(self) -> Rotation:
        """The same map without its scale (e.g. for ``transfer_sae``, which needs a Rotation)."""
        return Rotation(matrix=self.matrix, source_mean=self.source_mean,
                        target_mean=self.target_mean, group=self.group,
                        n_fit_rows=self.n_fit_rows)

    @property
    def d(self) -> int:
        return self.matrix.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Map source-frame ``x`` [..., d] into the target frame; float64 in, float64 out, else
        float32 arithmetic, returned in x's dtype."""
        if x.shape[-1] != self.d:
            raise ValueError(f"last dimension of x is {x.shape[-1]}, the map is {self.d}-d")
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = self.matrix.to(x.device, cdt) * self.scale
        out = (x.to(cdt) - self.source_mean.to(x.device, cdt)) @ r
        return (out + self.target_mean.to(x.device, cdt)).to(x.dtype)

    def inverse(self) -> ScaledRotation:
        """The map from the target frame back into the source frame (R^T, 1 / scale)."""
        return ScaledRotation(matrix=self.matrix.T.contiguous(), scale=1.0 / self.scale,
                              source_mean=self.target_mean, target_mean=self.source_mean,
                              group=self.group, n_fit_rows=self.n_fit_rows)


@dataclass(frozen=True)
class Consensus:
    """The result of :func:`fit_consensus`.

    Attributes:
        maps: one map per seed, from that seed's frame into the consensus frame: a
            :class:`~polymorph.align.procrustes.Rotation` (``scale=False``) or a
            :class:`ScaledRotation` (``scale=True``). ``maps[i].apply(acts[i])`` ~ consensus.
            Every ``target_mean`` is the reference seed's mean; ``singular_values`` (Rotation
            only) are those of ``X_i^T Y`` at the last iteration.
        consensus: [n, d] mean of the aligned seeds in the reference gauge (reference basis,
            units and mean); float64 for ``precision="float64"``, else float32.
        scales: float64 [n_seeds], the per-seed scales in the reference gauge (``scales[ref]``
            = 1; all ones when ``scale=False``). A seed whose activations are c times another's
            gets 1/c times its scale.
        objective: ``f`` after each iteration (Ten Berge normalisation when ``scale=True``),
            non-increasing up to float rounding.
        residual_fraction: final ``f`` / ``sum_i ||X_i||^2``: the share of the seeds' centred
            sum of squares that the consensus does not explain (0 for exact rotations).
        n_iter: iterations run. converged: the stopping rule was met within ``max_iter``.
        is_pairwise: True for two seeds, where the implied map is plain pairwise Procrustes
            (``fit_rotation``) and the iteration only fixes the gauge.
        reference, group, scaled, precision: the arguments of the fit.
    """

    maps: tuple[Rotation | ScaledRotation, ...]
    consensus: torch.Tensor
    scales: torch.Tensor
    objective: tuple[float, ...]
    residual_fraction: float
    n_iter: int
    converged: bool
    is_pairwise: bool
    reference: int
    group: str
    scaled: bool
    precision: str = "float64"
    tol: float = field(default=1e-8)

    @property
    def n_seeds(self) -> int:
        return len(self.maps)

    def pairwise_map(self, source: int, target: int) -> Rotation | ScaledRotation:
        """The implied map from seed ``source``'s frame into seed ``target``'s frame.

        ``maps[target]^-1 o maps[source]``: matrix ``R_source R_target^T`` (scale
        ``s_source / s_target``), source's mean in, target's mean out. Gauge-free, and
        consistent: ``pairwise_map(a, c)`` is ``pairwise_map(b, c) o pairwise_map(a, b)``.
        """
        for name, index in (("source", source), ("target", target)):
            if isinstance(index, bool) or not isinstance(index, int) or not (
                    0 <= index < self.n_seeds):
                raise ValueError(f"{name} must be a seed index in [0, {self.n_seeds}), got "
                                 f"{index!r}")
        a, b = self.maps[source], self.maps[target]
        with single_threaded():
            matrix = a.matrix @ b.matrix.T
        common = {"matrix": matrix, "source_mean": a.source_mean,
                  "target_mean": b.source_mean, "group": self.group, "n_fit_rows": a.n_fit_rows}
        if self.scaled:
            return ScaledRotation(scale=a.scale / b.scale, **common)
        return Rotation(**common)


def fit_consensus(acts: list[torch.Tensor], group: str = "O", scale: bool = False,
                  tol: float = 1e-8, max_iter: int = 100, precision: str = "float64",
                  reference: int = 0) -> Consensus:
    """Fit one map per seed into a consensus frame (generalised Procrustes; module docstring).

    Args:
        acts: per seed an [n, d] activation matrix, row-aligned (the same inputs in the same
            order for every seed), n > d.
        group: "O" or "SO" for every per-seed rotation.
        scale: also fit one positive global scale per seed.
        tol: stop when the objective's relative decrease over one iteration is <= tol.
        max_iter: at most this many iterations (``converged`` says whether tol was met).
        precision: "float64" or "float32" for forming the cross-Gram blocks (the iteration is
            always float64).
        reference: the seed whose frame (basis, units, mean) the consensus is expressed in.

    Raises ValueError on an empty list, a non-matrix, mismatched shapes (naming the seed index
    and both shapes), n <= d, non-finite values, or a bad argument. Warns when a seed's
    cross-covariance with the consensus is rank-deficient (its map is then arbitrary on the
    missing directions, as with ``fit_rotation``).
    """
    _check_group(group)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be True or False, got {scale!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    n_seeds, n, d = _validate(acts, reference)

    gram, means = _cross_gram(acts, precision)  # [S, d, S, d] float64, [S, d]
    total = float(sum(torch.trace(gram[i, :, i, :]) for i in range(n_seeds)))
    rotations = torch.eye(d, dtype=torch.float64).repeat(n_seeds, 1, 1)
    scales = torch.ones(n_seeds, dtype=torch.float64)
    singular = torch.zeros(n_seeds, d, dtype=torch.float64)
    objective: list[float] = []
    converged = n_seeds == 1  # one seed: the identity, nothing to iterate

    with single_threaded():
        # Iteration 1 aligns every seed onto the reference itself (Y = X_ref).
        cross = gram[:, :, reference, :]  # M_i = X_i^T X_ref
        for _ in range(0 if converged else max_iter):
            for i in range(n_seeds):
                rotations[i], singular[i] = procrustes_matrix(cross[i], group)
            # blocks[i, j] = C_ij R_j: the only d^3 work per iteration (S^2 products).
            blocks = torch.einsum("iajb,jbc->ijac", gram, rotations)
            inner = torch.einsum("iac,ijac->ij", rotations, blocks)  # G_ij = tr(R_i^T C_ij R_j)
            if scale:
                scales = _optimal_scales(inner, total)
            f = float((scales**2 * inner.diagonal()).sum() - scales @ inner @ scales / n_seeds)
            objective.append(f)
            if f <= _EXACT_FIT * total or (
                    len(objective) > 1 and objective[-2] - f <= tol * objective[-2]):
                converged = True
                break
            cross = torch.einsum("j,ijac->iac", scales, blocks) / n_seeds  # M_i = X_i^T Y

        # Gauge: express everything in the reference seed's frame and units.
        ref_t = rotations[reference].T.clone()
        rotations = rotations @ ref_t
        scales = scales / scales[reference]

    consensus = _consensus_matrix(acts, means, rotations, scales, reference, precision)
    maps = []
    for i in range(n_seeds):
        common = {"matrix": rotations[i], "source_mean": means[i],
                  "target_mean": means[reference], "group": group, "n_fit_rows": n}
        if scale:
            maps.append(ScaledRotation(scale=float(scales[i]), **common))
        else:
            # One seed has no cross-covariance to report: leave singular_values empty.
            sv = singular[i] if n_seeds > 1 else torch.empty(0, dtype=torch.float64)
            maps.append(Rotation(singular_values=sv, **common))
    _warn_rank(singular, n_seeds)
    return Consensus(
        maps=tuple(maps), consensus=consensus, scales=scales, objective=tuple(objective),
        residual_fraction=(objective[-1] / total if objective and total > 0 else 0.0),
        n_iter=len(objective), converged=converged, is_pairwise=n_seeds == 2,
        reference=reference, group=group, scaled=scale, precision=precision, tol=float(tol))


# --------------------------------------------------------------------------- helpers


def _validate(acts: list[torch.Tensor], reference: int) -> tuple[int, int, int]:
    if not isinstance(acts, (list, tuple)) or len(acts) == 0:
        raise ValueError("acts must be a non-empty list of [n, d] activation matrices, one per "
                         "seed")
    for i, x in enumerate(acts):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            shape = tuple(getattr(x, "shape", ()))
            raise ValueError(f"acts[{i}] must be a floating-point torch.Tensor matrix [n, d] "
                             f"(rows are samples), got {type(x).__name__} of shape {shape}")
    if isinstance(reference, bool) or not isinstance(reference, int) or not (
            0 <= reference < len(acts)):
        raise ValueError(f"reference must be a seed index in [0, {len(acts)}), got "
                         f"{reference!r}")
    shape = tuple(acts[0].shape)
    for i, x in enumerate(acts[1:], start=1):
        if tuple(x.shape) != shape:
            raise ValueError(f"acts[{i}] has shape {tuple(x.shape)} but acts[0] has {shape}: "
                             "every seed's rows must be its activations on the same inputs, in "
                             "the same order")
    n, d = shape
    if n <= d:
        raise ValueError(f"the fit is under-determined: {n} rows for d={d}; centring costs one "
                         f"degree of freedom, so at least {d + 1} rows are needed")
    return len(acts), n, d


def _cross_gram(acts: list[torch.Tensor], precision: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """All centred cross-Gram blocks ``C[i, :, j, :] = X_i^T X_j`` (float64) and the means."""
    n_seeds, (n, d) = len(acts), acts[0].shape
    cdt = torch.float64 if precision == "float64" else torch.float32
    means = torch.stack([x.to(cdt).mean(dim=0).double().cpu() for x in acts])
    if not torch.isfinite(means).all():
        bad = [i for i in range(n_seeds) if not torch.isfinite(means[i]).all()]
        raise ValueError(f"acts{bad} contain NaN or infinite values; drop those rows first")
    rows = max(1, _CHUNK_ELEMENTS // (n_seeds * d))
    gram = torch.zeros(n_seeds * d, n_seeds * d, dtype=torch.float64)
    centre = means.to(cdt)
    for start in range(0, n, rows):
        # Every seed side by side in one [rows, S*d] chunk; only the block upper triangle
        # (C_ij, j >= i) is multiplied, which is ~(S+1)/(2S) of the full product's work.
        chunk = torch.cat([acts[i][start:start + rows].to("cpu", cdt) - centre[i]
                           for i in range(n_seeds)], dim=1)
        for i in range(n_seeds):
            rows_i = slice(i * d, (i + 1) * d)
            gram[rows_i, i * d:] += (chunk[:, rows_i].T @ chunk[:, i * d:]).double()
    for i in range(n_seeds):  # C_ji = C_ij^T
        for j in range(i + 1, n_seeds):
            gram[j * d:(j + 1) * d, i * d:(i + 1) * d] = gram[i * d:(i + 1) * d,
                                                              j * d:(j + 1) * d].T
    return gram.view(n_seeds, d, n_seeds, d), means


def _optimal_scales(inner: torch.Tensor, total: float) -> torch.Tensor:
    """Ten Berge's scales: maximise s^T G s subject to sum_i s_i^2 G_ii = total."""
    diag = inner.diagonal().clamp(min=1e-300)
    root = diag.rsqrt()
    _, vecs = torch.linalg.eigh(root[:, None] * inner * root[None, :])
    v = vecs[:, -1]
    v = v if v.sum() >= 0 else -v
    if (v <= 0).any():
        warnings.warn("the optimal consensus scales are not all positive: some seeds share "
                      "(almost) nothing with the others; those scales are clamped near 0",
                      stacklevel=3)
        v = v.clamp(min=1e-12)
    s = root * v
    return s * math.sqrt(total / float((s**2 * diag).sum()))


def _consensus_matrix(acts: list[torch.Tensor], means: torch.Tensor, rotations: torch.Tensor,
                      scales: torch.Tensor, reference: int, precision: str) -> torch.Tensor:
    """``mean_i s_i (X_i - mu_i) R_i + mu_ref`` in the reference gauge, row chunk by row chunk."""
    n_seeds, (n, d) = len(acts), acts[0].shape
    cdt = torch.float64 if precision == "float64" else torch.float32
    maps = (rotations * (scales / n_seeds)[:, None, None]).to(cdt)
    out = torch.empty(n, d, dtype=cdt)
    rows = max(1, _CHUNK_ELEMENTS // d)
    centre = means.to(cdt)
    for start in range(0, n, rows):
        acc = centre[reference].expand(min(rows, n - start), d).clone()
        for i in range(n_seeds):
            acc += (acts[i][start:start + rows].to("cpu", cdt) - centre[i]) @ maps[i]
        out[start:start + rows] = acc
    return out


def _warn_rank(singular: torch.Tensor, n_seeds: int) -> None:
    if n_seeds == 1:
        return
    d = singular.shape[1]
    for i in range(n_seeds):
        s = singular[i]
        rank = int((s > d * 1e-12 * float(s.max())).sum()) if float(s.max()) > 0 else 0
        if rank < d:
            warnings.warn(f"seed {i}: the cross-covariance with the consensus has rank {rank} < "
                          f"d={d}: its map is arbitrary on {d - rank} directions (it still maps "
                          "the observed subspace correctly)", stacklevel=3)
