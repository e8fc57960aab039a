"""Explained-variance scores (pure functions).

Two definitions are in use and polymorph always labels which one a number is:

* ``ev_published``: 1 - mean((x_hat - x)^2) / var(X), where var(X) is the
  variance of *all entries* of X around one grand mean (the definition of the
  published replication code).
* ``ev_standard``: 1 - sum((x_hat - x)^2) / sum((x - mean_over_rows(x))^2), the
  usual definition whose denominator is the total variance after centring each
  dimension separately.

Both equal 1 for a perfect reconstruction, and ``ev_standard`` is 0 for
predicting each dimension's mean (the "floor").
"""

from __future__ import annotations

import torch

EV_DEFINITIONS = {
    "ev_published": "1 - mean((x_hat - x)^2) / var(all entries of X around one grand mean)",
    "ev_standard": "1 - sum((x_hat - x)^2) / sum((x - per-dimension mean)^2)",
}


def _check_pair(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if x_hat.shape != x.shape:
        raise ValueError(f"shape mismatch: reconstruction {tuple(x_hat.shape)} vs data {tuple(x.shape)}")
    if x.ndim != 2:
        raise ValueError(f"expected activation matrices [n, d], got shape {tuple(x.shape)}")


def ev_published(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """1 - MSE / variance of all entries of ``x`` around their grand mean."""
    _check_pair(x_hat, x)
    x64, r64 = x.double(), x_hat.double()
    mse = (r64 - x64).pow(2).mean()
    var = x64.var(unbiased=False)
    return float(1.0 - mse / var)


def ev_standard(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """1 - residual sum of squares / per-dimension-centred total sum of squares."""
    _check_pair(x_hat, x)
    x64, r64 = x.double(), x_hat.double()
    rss = (r64 - x64).pow(2).sum()
    tss = (x64 - x64.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(1.0 - rss / tss)


def explained_variance(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Both definitions at once, keyed by their names in ``EV_DEFINITIONS``."""
    return {"ev_published": ev_published(x_hat, x), "ev_standard": ev_standard(x_hat, x)}
