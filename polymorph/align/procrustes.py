"""Orthogonal Procrustes: fit, apply and score the rotation between two residual streams.

Convention (used everywhere in ``polymorph.align``): rows are samples. A :class:`Rotation` fitted
with ``fit_rotation(source, target)`` maps *source-frame* activations into the *target frame*::

    apply(x) = (x - source_mean) @ R + target_mean

``R`` minimises ``||Xs_c R - Xt_c||_F`` over orthogonal matrices (``Xs_c``, ``Xt_c`` are the
per-dimension-centred activation matrices of the two models on the same inputs). With
``M = Xs_c^T Xt_c = U S V^T`` (SVD) the minimiser is ``R = U V^T`` (docs/method.md, "Procrustes":
B is the source, A the target). ``group="SO"`` restricts to proper rotations (det +1): when
``det(U V^T) < 0`` the sign of the last (smallest) singular direction is flipped, the standard
Kabsch fix, which gives the best proper rotation.

Fit on one batch and score on a held-out batch is the intended use: ``score_alignment`` takes the
rotation and any pair of matrices.

Threads: all d x d work (SVD here, QR/eigh and the rest of ``haar``) runs on one thread inside
:func:`single_threaded`, which restores torch's thread count afterwards. On the 2-core machines
this project targets, two OpenMP/MKL threads on 512 x 512 problems gain little when the cores
are idle and were measured 10-100x slower when other processes share them (every parallel region
waits for a descheduled thread); the big [n, d] products keep all threads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from polymorph.align.metrics import explained_variance

GROUPS: tuple[str, ...] = ("O", "SO")
PRECISIONS: tuple[str, ...] = ("float64", "float32")

# Rows per chunk when accumulating the cross-covariance: bounds the temporary float64 copies to
# a few tens of MB whatever n is.
_CHUNK_ROWS = 16_384
# Orthogonality tolerance when a Rotation is built from a user-supplied matrix.
_ORTHO_TOL = 1e-6


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the previous count."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS} (O(d) or the proper rotations SO(d)), "
                         f"got {group!r}")


def _det(m: torch.Tensor) -> float:
    with single_threaded():
        return float(torch.linalg.det(m))


@dataclass(frozen=True)
class Rotation:
    """An affine map between two models' frames: centre, rotate, add the target mean.

    Attributes:
        matrix: R, float64 [d, d], orthogonal. Right-multiplies row vectors of the source frame.
        source_mean: float64 [d], per-dimension mean of the source activations it was fitted on.
        target_mean: float64 [d], per-dimension mean of the target activations.
        group: "O" or "SO", the group the fit was restricted to.
        n_fit_rows: number of activation rows used in the fit (0 if built by hand).
        singular_values: float64 [d], singular values of the centred cross-covariance
            ``M = Xs_c^T Xt_c`` (descending); empty if built by hand. Small values mean the fit
            is not determined in those directions (see :meth:`effective_rank`).
    """

    matrix: torch.Tensor
    source_mean: torch.Tensor
    target_mean: torch.Tensor
    group: str = "O"
    n_fit_rows: int = 0
    singular_values: torch.Tensor = field(default_factory=lambda: torch.empty(0,
                                                                               dtype=torch.float64))

    @single_threaded()
    def __post_init__(self) -> None:
        _check_group(self.group)
        mat = torch.as_tensor(self.matrix).detach().to("cpu", torch.float64)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
            raise ValueError(f"Rotation.matrix must be square [d, d], got {tuple(mat.shape)}")
        d = mat.shape[0]
        means = {}
        for name in ("source_mean", "target_mean"):
            mean = torch.as_tensor(getattr(self, name)).detach().to("cpu", torch.float64)
            if mean.shape != (d,):
                raise ValueError(f"Rotation.{name} must have shape ({d},) to match the {d}x{d} "
                                 f"matrix, got {tuple(mean.shape)}")
            means[name] = mean
        if not (torch.isfinite(mat).all() and all(torch.isfinite(m).all() for m in means.values())):
            raise ValueError("Rotation has non-finite entries in its matrix or means")
        err = (mat.T @ mat - torch.eye(d, dtype=torch.float64)).abs().max().item()
        if err > _ORTHO_TOL:
            raise ValueError(f"Rotation.matrix is not orthogonal: max |R^T R - I| = {err:.3g} "
                             f"(tolerance {_ORTHO_TOL}); re-orthogonalise it (e.g. fit_rotation) "
                             "before wrapping it")
        if self.group == "SO" and _det(mat) < 0:
            raise ValueError("Rotation declared group='SO' but det(matrix) = -1; use group='O'")
        object.__setattr__(self, "matrix", mat)
        object.__setattr__(self, "source_mean", means["source_mean"])
        object.__setattr__(self, "target_mean", means["target_mean"])
        object.__setattr__(self, "singular_values",
                           torch.as_tensor(self.singular_values).detach().to("cpu", torch.float64))

    @property
    def d(self) -> int:
        return self.matrix.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Map source-frame activations ``x`` [..., d] into the target frame; returns x's dtype.

        Computed in float64 for float64 input, else in float32 (half-precision input is upcast
        for the arithmetic and cast back).
        """
        if x.shape[-1] != self.d:
            raise ValueError(f"last dimension of x is {x.shape[-1]}, the rotation is {self.d}-d")
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = self.matrix.to(x.device, cdt)
        out = (x.to(cdt) - self.source_mean.to(x.device, cdt)) @ r
        return (out + self.target_mean.to(x.device, cdt)).to(x.dtype)

    def inverse(self) -> Rotation:
        """The Rotation mapping target-frame activations back into the source frame."""
        return Rotation(matrix=self.matrix.T.contiguous(), source_mean=self.target_mean,
                        target_mean=self.source_mean, group=self.group,
                        n_fit_rows=self.n_fit_rows, singular_values=self.singular_values)

    @property
    def det(self) -> float:
        return _det(self.matrix)

    def effective_rank(self, rtol: float | None = None) -> int:
        """Number of singular values of M above ``rtol * max`` (default ``d * 1e-12``).

        Below d, the fitted R is arbitrary on the missing directions (e.g. activations confined
        to a subspace); the rotation still maps the observed subspace correctly.
        """
        if self.singular_values.numel() == 0:
            return self.d
        tol = (self.d * 1e-12 if rtol is None else rtol) * float(self.singular_values.max())
        return int((self.singular_values > tol).sum())

    def to_dict(self) -> dict:
        """Tensors and metadata, e.g. for ``torch.save``; inverse of :meth:`from_dict`."""
        return {"matrix": self.matrix, "source_mean": self.source_mean,
                "target_mean": self.target_mean, "group": self.group,
                "n_fit_rows": self.n_fit_rows, "singular_values": self.singular_values}

    @classmethod
    def from_dict(cls, state: dict) -> Rotation:
        return cls(**state)


def _validate_pair(source: torch.Tensor, target: torch.Tensor) -> None:
    for name, x in (("source", source), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [n, d], got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be a 2-D activation matrix [n, d] (rows are samples); "
                             f"got shape {tuple(x.shape)}: flatten batch and position first")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} must have "
                         "the same shape: the rows must be the two models' activations on the "
                         "same inputs, in the same order")
    n, d = source.shape
    if n <= d:
        raise ValueError(f"the fit is under-determined: {n} rows for d={d}; centring costs one "
                         f"degree of freedom, so at least {d + 1} rows are needed (use many more "
                         "for a stable estimate)")


def _centred_cross_covariance(source: torch.Tensor, target: torch.Tensor, precision: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = (Xs - mean_s)^T (Xt - mean_t) accumulated over row chunks, returned in float64.

    ``precision="float32"`` takes the means, centres and multiplies in float32 (several times
    faster on CPU) and only accumulates the d x d chunk products in float64; "float64" does
    everything in float64. A mean error e changes M only by ``n e_s e_t^T`` (second order).
    """
    if precision == "float32":
        mu_s = source.float().mean(dim=0).double()
        mu_t = target.float().mean(dim=0).double()
    else:
        mu_s = source.mean(dim=0, dtype=torch.float64)
        mu_t = target.mean(dim=0, dtype=torch.float64)
    # A NaN or an infinity anywhere in a column makes that column's mean non-finite, so checking
    # the means tests the whole matrix at no extra pass over the data (a float32 sum can also
    # overflow to inf for values near 1e38: also rejected, correctly).
    for name, mu in (("source", mu_s), ("target", mu_t)):
        if not torch.isfinite(mu).all():
            raise ValueError(f"{name} contains NaN or infinite values; drop those rows first")
    cdt = torch.float64 if precision == "float64" else torch.float32
    ms, mt = mu_s.to(source.device, cdt), mu_t.to(target.device, cdt)
    d = source.shape[1]
    m = torch.zeros(d, d, dtype=torch.float64, device=source.device)
    for start in range(0, source.shape[0], _CHUNK_ROWS):
        xs = source[start:start + _CHUNK_ROWS].to(cdt) - ms
        xt = target[start:start + _CHUNK_ROWS].to(cdt) - mt
        m += (xs.T @ xt).to(torch.float64)
    return m.cpu(), mu_s.cpu(), mu_t.cpu()


@single_threaded()
def procrustes_matrix(m: torch.Tensor, group: str = "O") -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal R maximising tr(R^T M) (= minimising ||Xs R - Xt||_F) and M's singular values.

    ``group="SO"``: if ``det(U V^T) < 0`` flip the sign of U's last column (the direction of the
    smallest singular value), which costs the least fit among proper rotations (Kabsch).
    """
    _check_group(group)
    m = m.to(torch.float64)
    u, s, vh = torch.linalg.svd(m)
    if group == "SO" and torch.linalg.det(u @ vh) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh, s


def fit_rotation(source: torch.Tensor, target: torch.Tensor, group: str = "O",
                 precision: str = "float64") -> Rotation:
    """Fit the rotation mapping ``source`` activations [n, d] onto ``target`` activations [n, d].

    Rows must be the two models' activations on the same inputs in the same order. Both are
    centred per dimension, ``M = Xs_c^T Xt_c`` is formed, and ``R = U V^T`` from its SVD (in
    float64). ``precision="float32"`` forms M with float32 arithmetic (faster; measured error in
    ``benchmarks/align.py``); the published method used float64, the default.

    Raises ValueError on mismatched shapes, non-2-D or non-finite input, fewer than d + 1 rows,
    or an unknown group/precision. Warns when M is rank-deficient (R is then not unique).
    """
    _check_group(group)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _validate_pair(source, target)
    m, mu_s, mu_t = _centred_cross_covariance(source, target, precision)
    r, s = procrustes_matrix(m, group)
    rot = Rotation(matrix=r, source_mean=mu_s, target_mean=mu_t, group=group,
                   n_fit_rows=source.shape[0], singular_values=s)
    rank = rot.effective_rank()
    if rank < rot.d:
        warnings.warn(f"the centred cross-covariance has rank {rank} < d={rot.d}: the activations "
                      f"span a subspace, so R is arbitrary on {rot.d - rank} directions (it still "
                      "maps the observed subspace correctly)", stacklevel=2)
    return rot


def score_alignment(rotation: Rotation, source: torch.Tensor, target: torch.Tensor
                    ) -> dict[str, float]:
    """Activation-level explained variance of the target, under both definitions.

    Keys ``{kind}_{definition}`` with kind in
      * ``raw``: the source activations taken as-is as a prediction of the target;
      * ``rotated``: ``rotation.apply(source)`` as the prediction;
      * ``floor``: the target's own per-dimension mean (on these rows) as the prediction
        (``ev_standard`` is 0 by construction; ``ev_published`` is >= 0, usually slightly > 0);
    and definition in ``polymorph.align.metrics.EV_DEFINITIONS`` (``ev_published``,
    ``ev_standard``). Score on a batch the rotation was not fitted on.
    """
    if source.shape != target.shape or source.ndim != 2:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} must be "
                         "matching [n, d] matrices of the same inputs")
    if source.shape[1] != rotation.d:
        raise ValueError(f"activations are {source.shape[1]}-d, the rotation is {rotation.d}-d")
    floor = target.double().mean(dim=0, keepdim=True).expand_as(target)
    out: dict[str, float] = {}
    for kind, pred in (("raw", source), ("rotated", rotation.apply(source)), ("floor", floor)):
        for name, value in explained_variance(pred, target).items():
            out[f"{kind}_{name}"] = value
    return out


def _cyclic_derangement(items: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """(receivers, donors): a uniformly random cyclic order of ``items``, each paired with the
    next one, so that no item is paired with itself (for two or more items)."""
    order = items[torch.randperm(items.numel(), generator=g)]
    return order, order.roll(-1)


def shuffled_pairing(n_rows: int, seed: int = 0, groups: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """A row permutation ``perm`` [n_rows] such that ``(source[perm], target)`` is a wrong pairing.

    Without ``groups``: a random cyclic derangement of the rows (no row keeps its partner).
    With ``groups`` ([n_rows] sequence ids): whole sequences are deranged among the sequences
    of the same length, row i of one paired with row i of another (rows of a sequence taken in
    their order of appearance), so positions stay aligned and only the content is unpaired;
    with a positional code shared by the two models, this null still matches position.
    Sequences whose length no other sequence has are pooled and deranged row by row. (With a
    single such row in total, that row keeps its partner.)
    """
    if n_rows < 2:
        raise ValueError(f"a shuffled pairing needs at least 2 rows, got {n_rows}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    perm = torch.arange(n_rows)
    if groups is None:
        receivers, donors = _cyclic_derangement(torch.arange(n_rows), g)
        perm[receivers] = donors
        return perm
    ids = torch.as_tensor(groups)
    if ids.ndim != 1 or ids.shape[0] != n_rows:
        raise ValueError(f"groups must be a 1-D tensor of {n_rows} sequence ids, got shape "
                         f"{tuple(ids.shape)}")
    _, ids = torch.unique(ids, return_inverse=True)
    order = torch.argsort(ids, stable=True)  # rows grouped by sequence, in order of appearance
    sizes = torch.bincount(ids)
    rows_of = torch.split(order, sizes.tolist())
    singles: list[torch.Tensor] = []
    for length in sizes.unique().tolist():
        members = (sizes == length).nonzero().flatten()
        if members.numel() == 1:
            singles.append(rows_of[int(members)])
            continue
        receivers, donors = _cyclic_derangement(members, g)
        for t, s in zip(receivers.tolist(), donors.tolist()):
            perm[rows_of[t]] = rows_of[s]
    if singles:
        pool = torch.cat(singles)
        if pool.numel() > 1:
            receivers, donors = _cyclic_derangement(pool, g)
            perm[receivers] = donors
    return perm


def fit_rotation_shuffled(source: torch.Tensor, target: torch.Tensor, seed: int = 0,
                          groups: torch.Tensor | None = None, group: str = "O",
                          precision: str = "float64") -> Rotation:
    """The shuffled-pairing null of :func:`fit_rotation` (docs/method.md, "Calibration").

    The same Procrustes fit after the rows of ``source`` are re-paired with the wrong rows of
    ``target`` (:func:`shuffled_pairing`: rows, or whole sequences of equal length when
    ``groups`` gives each row's sequence id). The two distributions are matched as sets, not
    point by point: a transfer metric that this map also scores high says nothing about
    corresponding features. The means are those of the true fit (a permutation keeps them).
    """
    _validate_pair(source, target)
    perm = shuffled_pairing(source.shape[0], seed, groups).to(source.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a shuffled M is often ill-conditioned
        return fit_rotation(source[perm], target, group=group, precision=precision)
