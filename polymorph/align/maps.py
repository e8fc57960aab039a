"""Families of maps between two models' activation spaces, and linear CKA (pure functions).

Is the seed-to-seed map really a rotation? Fit each family on one batch, score
on another with the same EV definitions (``polymorph.align.metrics``), and
compare. Rows are samples; every map sends source-frame rows into the target
frame: ``apply(x) = (x - source_offset) @ matrix + target_offset``.

Families (``MAP_FAMILIES``):

* ``identity``: x -> x (the naive transfer);
* ``orthogonal`` / ``special_orthogonal``: centre, rotate by R in O(d) / SO(d), add the
  target mean (``fit_rotation``);
* ``scaled_orthogonal``: the same with one global scale s (least-squares optimal:
  s = tr(S) / ||Xs_c||_F^2, S the singular values of Xs_c^T Xt_c);
* ``linear``: x -> x W, W by least squares through the origin (no offsets), optional ridge;
* ``affine``: centre, x_c -> x_c W (least squares, optional ridge), add the target mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymorph.align.metrics import explained_variance
from polymorph.align.procrustes import fit_rotation

MAP_FAMILIES = (
    "identity",
    "orthogonal",
    "special_orthogonal",
    "scaled_orthogonal",
    "linear",
    "affine",
)


@dataclass(frozen=True)
class FittedMap:
    family: str
    matrix: torch.Tensor  # float64 [d, d]
    source_offset: torch.Tensor  # float64 [d]
    target_offset: torch.Tensor  # float64 [d]
    n_fit_rows: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.double() - self.source_offset) @ self.matrix + self.target_offset
        return y.to(x.dtype)


def _check(source: torch.Tensor, target: torch.Tensor) -> None:
    if source.ndim != 2 or target.ndim != 2 or source.shape != target.shape:
        raise ValueError(
            f"source {tuple(source.shape)} and target {tuple(target.shape)} must be matching "
            "[n, d] activation matrices of the same inputs"
        )
    n, d = source.shape
    if n <= d:
        raise ValueError(
            f"under-determined fit: {n} rows for a {d}-dimensional map; use at least {d + 1} "
            "rows (many more for a held-out score worth reading)"
        )
    if not (torch.isfinite(source).all() and torch.isfinite(target).all()):
        raise ValueError("activations contain NaN or infinite values")


def _least_squares(xs: torch.Tensor, xt: torch.Tensor, ridge: float) -> torch.Tensor:
    d = xs.shape[1]
    if ridge > 0:
        gram = xs.T @ xs + ridge * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(gram, xs.T @ xt)
    # Minimum-norm solution: activations often span fewer than d directions (e.g. the
    # embedding site), where the normal equations are singular.
    return torch.linalg.lstsq(xs, xt, driver="gelsd").solution


def fit_map(source: torch.Tensor, target: torch.Tensor, family: str, ridge: float = 0.0) -> FittedMap:
    """Fit one map family sending ``source`` rows onto ``target`` rows (float64 arithmetic)."""
    if family not in MAP_FAMILIES:
        raise ValueError(f"unknown map family {family!r}; choose one of {MAP_FAMILIES}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _check(source, target)
    xs, xt = source.double(), target.double()
    d, n = xs.shape[1], xs.shape[0]
    zero = torch.zeros(d, dtype=torch.float64)
    if family == "identity":
        return FittedMap(family, torch.eye(d, dtype=torch.float64), zero, zero, n)
    if family in ("orthogonal", "special_orthogonal", "scaled_orthogonal"):
        rot = fit_rotation(source, target, group="SO" if family == "special_orthogonal" else "O")
        matrix = rot.matrix
        if family == "scaled_orthogonal":
            xs_c = xs - rot.source_mean
            xt_c = xt - rot.target_mean
            scale = float(((xs_c @ matrix) * xt_c).sum() / xs_c.pow(2).sum())
            matrix = scale * matrix
        return FittedMap(family, matrix, rot.source_mean, rot.target_mean, n)
    if family == "linear":
        return FittedMap(family, _least_squares(xs, xt, ridge), zero, zero, n)
    mu_s, mu_t = xs.mean(0), xt.mean(0)
    return FittedMap(family, _least_squares(xs - mu_s, xt - mu_t, ridge), mu_s, mu_t, n)


def score_map(fitted: FittedMap, source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """EV of ``target`` predicted by ``fitted.apply(source)``, both definitions."""
    return explained_variance(fitted.apply(source.double()), target.double())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two row-aligned activation matrices [n, d_x], [n, d_y].

    ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) with per-dimension centring: 1 for
    identical inputs, invariant to rotations and isotropic scaling of either side.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs row-aligned matrices, got {tuple(x.shape)} and {tuple(y.shape)}")
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    cross = (yc.T @ xc).pow(2).sum()
    return float(cross / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc)))
