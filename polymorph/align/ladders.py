"""Dictionaries compared at matched sparsity, and how far seeds agree on one code (pure maths).

Two dictionaries trained with the same sparsity setting rarely end at the same L0 (a universal
SAE on pooled rows, a crosscoder whose code serves every seed, an SAE on one seed), and
reconstruction improves with L0, so comparing them rung by rung compares sparsities as much as
dictionaries. Each method is therefore trained as a *ladder* of sparsities and read at common
L0 values:

* :func:`interpolate_at_l0`: a ladder's values (EV, dead fraction, ...) at target L0s,
  piecewise-linear in log L0 between rungs, never extrapolated beyond a small tolerance;
* :func:`decoder_evenness`: for a crosscoder, how evenly each latent's decoder norm is spread
  over the seeds (1: the same norm in every seed; 0: some seed does not use it);
* :class:`FiringMoments`: per-feature Pearson correlation of two row-aligned code matrices
  (one dictionary read on two seeds' rows), accumulated chunk by chunk so neither code matrix
  is ever held whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: relative variance below which a feature counts as constant on the rows (no correlation)
_CONSTANT = 1e-10


def interpolate_at_l0(l0: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,
                      tolerance: float = 0.05) -> torch.Tensor:
    """A ladder's ``values`` read at ``targets`` L0s, linear in log L0 between rungs.

    Args:
        l0: [R] the rungs' L0s (> 0; any order; rungs with equal L0 are averaged).
        values: [..., R] one value per rung (leading dimensions, e.g. bootstrap replicates,
            are interpolated alike).
        targets: [T] L0s to read the ladder at (> 0).
        tolerance: a target within a factor ``1 + tolerance`` outside the ladder's L0 range
            takes the nearest end rung's value (a TopK rung at k = 32 measures L0 31.97);
            further out the result is NaN: a ladder is never extrapolated.

    Returns [..., T] float64; NaN where a target is out of range or a neighbouring rung's value
    is NaN.
    """
    l0 = torch.as_tensor(l0, dtype=torch.float64).flatten()
    values = torch.as_tensor(values, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.float64).flatten()
    if values.shape[-1] != l0.shape[0] or l0.numel() == 0:
        raise ValueError(f"values [..., R] must have R = {l0.numel()} rungs (one per L0, at "
                         f"least one), got shape {tuple(values.shape)}")
    if not (torch.isfinite(l0).all() and (l0 > 0).all()):
        raise ValueError(f"every rung's L0 must be finite and > 0 (log L0 is the axis), got "
                         f"{l0.tolist()}; leave out rungs whose code never fires")
    if not (torch.isfinite(targets).all() and (targets > 0).all()):
        raise ValueError(f"target L0s must be finite and > 0, got {targets.tolist()}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    x, inverse = torch.unique(l0.log(), sorted=True, return_inverse=True)
    lead = values.shape[:-1]
    flat = values.reshape(-1, l0.numel())
    merged = torch.zeros(flat.shape[0], x.numel(), dtype=torch.float64)
    merged.index_add_(1, inverse, flat)  # a NaN rung keeps its L0's average NaN
    merged /= torch.bincount(inverse, minlength=x.numel()).to(torch.float64)
    t = targets.log()
    slack = math.log1p(float(tolerance))
    out = torch.full((flat.shape[0], t.numel()), float("nan"), dtype=torch.float64)
    lo, hi = x[0], x[-1]
    below = (t < lo) & (t >= lo - slack)
    above = (t > hi) & (t <= hi + slack)
    out[:, below] = merged[:, :1]
    out[:, above] = merged[:, -1:]
    inside = (t >= lo) & (t <= hi)
    if inside.any():
        ti = t[inside]
        if x.numel() == 1:
            out[:, inside] = merged[:, :1]
        else:
            right = torch.searchsorted(x, ti, right=False).clamp(1, x.numel() - 1)
            left = right - 1
            frac = (ti - x[left]) / (x[right] - x[left])
            out[:, inside] = merged[:, left] + frac * (merged[:, right] - merged[:, left])
    return out.reshape(*lead, t.numel())


def decoder_evenness(norms: torch.Tensor) -> torch.Tensor:
    """Per latent, how evenly its decoder norm is spread over the seeds: ``min_s / max_s``.

    ``norms`` [m, S] holds ``||W_dec[s]_i||`` (a crosscoder's ``decoder_norms()``). The weakest
    seed's norm over the strongest's is 1 when every seed has the same norm and 0 when some seed
    does not use the latent at all; 0.5 means some seed writes it at half the strength of
    another. (A normalised entropy of the shares would barely move near even: shares
    0.4 / 0.3 / 0.3 still give 0.985, where this ratio gives 0.75.) Returns float64 [m]; NaN for
    a latent whose norms are all zero. Needs S >= 2.
    """
    norms = torch.as_tensor(norms, dtype=torch.float64)
    if norms.ndim != 2 or norms.shape[1] < 2:
        raise ValueError(f"norms must be [n_latents, n_seeds >= 2], got shape "
                         f"{tuple(norms.shape)}")
    if (norms < 0).any() or not torch.isfinite(norms).all():
        raise ValueError("decoder norms must be finite and >= 0")
    top = norms.max(1).values
    ratio = norms.min(1).values / top.clamp(min=1e-300)
    return torch.where(top > 0, ratio, torch.full_like(ratio, float("nan")))


def largest_share(norms: torch.Tensor) -> torch.Tensor:
    """Per latent, the largest seed's share of its summed decoder norm, [m] float64 (1/S when
    even, 1 when one seed only; NaN for all-zero norms)."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    if norms.ndim != 2:
        raise ValueError(f"norms must be [n_latents, n_seeds], got shape {tuple(norms.shape)}")
    total = norms.sum(1)
    share = norms.max(1).values / total
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


@dataclass
class FiringMoments:
    """Running sums for the per-feature Pearson correlation of two row-aligned code matrices.

    ``update(a, b)`` adds a chunk of rows ([rows, m] each: the same dictionary's codes on seed
    a's rows and on seed b's corresponding rows); :meth:`correlation` is the Pearson correlation
    over all rows seen, per feature. Sums are float64, so chunking does not change the result
    beyond rounding.
    """

    n: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sum_aa: torch.Tensor
    sum_bb: torch.Tensor
    sum_ab: torch.Tensor

    @classmethod
    def zeros(cls, n_features: int) -> FiringMoments:
        z = torch.zeros(int(n_features), dtype=torch.float64)
        return cls(0, z.clone(), z.clone(), z.clone(), z.clone(), z.clone())

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape or a.ndim != 2 or a.shape[1] != self.sum_a.numel():
            raise ValueError(f"code chunks must both be [rows, {self.sum_a.numel()}], got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        self.n += a64.shape[0]
        self.sum_a += a64.sum(0)
        self.sum_b += b64.sum(0)
        self.sum_aa += (a64 * a64).sum(0)
        self.sum_bb += (b64 * b64).sum(0)
        self.sum_ab += (a64 * b64).sum(0)

    def correlation(self) -> torch.Tensor:
        """[m] Pearson correlation per feature; NaN where a feature is constant on either side."""
        n = float(self.n)
        var_a = n * self.sum_aa - self.sum_a**2
        var_b = n * self.sum_bb - self.sum_b**2
        cov = n * self.sum_ab - self.sum_a * self.sum_b
        varies = (var_a > _CONSTANT * n * self.sum_aa) & (var_b > _CONSTANT * n * self.sum_bb)
        corr = cov / (var_a.clamp(min=0) * var_b.clamp(min=0)).sqrt().clamp(min=1e-300)
        return torch.where(varies, corr.clamp(-1.0, 1.0), torch.full_like(corr, float("nan")))

    def mean_correlation(self) -> tuple[float, int]:
        """(mean correlation over the features that vary on both sides, how many they are);
        NaN and 0 when none does."""
        corr = self.correlation()
        ok = torch.isfinite(corr)
        return (float(corr[ok].mean()) if ok.any() else float("nan")), int(ok.sum())
