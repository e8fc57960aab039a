"""Decoder universality between two SAE dictionaries, raw and after a rotation.

Dictionaries are ``[n_features, d]`` with one decoder direction per row (sae-lens ``W_dec`` layout
``[d_sae, d_in]``). Cosines are between rows; a zero row (a dead feature with a zeroed decoder)
has cosine 0 with everything.

Metrics (METHOD.md, "Metrics"):
  * max-cosine: for each row of A, ``max_j cos(a_i, b_j)`` over B's rows (the published number;
    several A features may claim the same B feature); its mean and the fraction above 0.5;
  * Hungarian: a one-to-one matching (``scipy.optimize.linear_sum_assignment`` maximising the
    total cosine; rectangular allowed, ``min(n_a, n_b)`` pairs) and the mean cosine of the pairs.

Chance: for independent random unit dictionaries the expected max-cosine grows like
``sqrt(2 ln n_b / d)``; :func:`chance_level` measures it by Monte Carlo for the sizes at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from polymorph.align.procrustes import Rotation

DEFAULT_BINS = 20


@dataclass(frozen=True)
class Universality:
    """Universality of dictionary A against dictionary B.

    Attributes:
        max_cos: float64 [n_a], each A feature's best cosine over B's features.
        mean_max_cos, frac_above_0_5: mean of ``max_cos`` and the fraction of it > 0.5.
        hist_counts, hist_edges: histogram of ``max_cos`` on [-1, 1] (``len(edges) = bins + 1``).
        hungarian_mean_cos: mean cosine over the one-to-one matching.
        hungarian_pairs: [(i_a, j_b), ...] the matched index pairs, ``min(n_a, n_b)`` of them.
        rotated: whether B was rotated into A's frame first.
    """

    max_cos: torch.Tensor
    mean_max_cos: float
    frac_above_0_5: float
    hist_counts: list[int]
    hist_edges: list[float]
    hungarian_mean_cos: float
    hungarian_pairs: list[tuple[int, int]]
    rotated: bool

    def to_dict(self, include_per_feature: bool = False) -> dict:
        """JSON-serialisable summary; per-feature values and pairs only on request."""
        out = {"mean_max_cos": self.mean_max_cos, "frac_above_0_5": self.frac_above_0_5,
               "hist_counts": list(self.hist_counts), "hist_edges": list(self.hist_edges),
               "hungarian_mean_cos": self.hungarian_mean_cos, "rotated": self.rotated}
        if include_per_feature:
            out["max_cos"] = self.max_cos.tolist()
            out["hungarian_pairs"] = [list(p) for p in self.hungarian_pairs]
        return out


def _unit_rows(dec: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(dec, torch.Tensor) or dec.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n_features, d] (sae-lens W_dec layout), "
                         f"got {getattr(dec, 'shape', type(dec).__name__)}")
    dec = dec.detach().to("cpu", torch.float64)
    if not torch.isfinite(dec).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return dec / dec.norm(dim=1, keepdim=True).clamp(min=1e-30)


def cosine_matrix(dec_a: torch.Tensor, dec_b: torch.Tensor) -> torch.Tensor:
    """float64 [n_a, n_b] cosines between the rows of two dictionaries."""
    a, b = _unit_rows(dec_a, "dec_a"), _unit_rows(dec_b, "dec_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries live in different spaces: dec_a is {a.shape[1]}-d, "
                         f"dec_b is {b.shape[1]}-d")
    return a @ b.T


def rotate_directions(dec: torch.Tensor, rotation: Rotation | torch.Tensor) -> torch.Tensor:
    """Directions (rows) from the rotation's source frame into its target frame: ``dec @ R``.

    Directions carry no offset, so the rotation's means are not used.
    """
    r = rotation.matrix if isinstance(rotation, Rotation) else torch.as_tensor(rotation)
    r = r.detach().to("cpu", torch.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] != dec.shape[-1]:
        raise ValueError(f"rotation must be [{dec.shape[-1]}, {dec.shape[-1]}] to act on these "
                         f"directions, got {tuple(r.shape)}")
    return dec.detach().to("cpu", torch.float64) @ r


def decoder_universality(dec_a: torch.Tensor, dec_b: torch.Tensor,
                         rotation: Rotation | torch.Tensor | None = None,
                         bins: int = DEFAULT_BINS, hungarian: bool = True) -> Universality:
    """Max-cosine and Hungarian universality of dictionary A against B, both [n, d].

    ``rotation`` (optional) maps B's frame into A's frame, i.e. it was fitted as
    ``fit_rotation(acts_B, acts_A)``; B's directions are rotated (``dec_b @ R``, no means)
    before matching. ``hungarian=False`` skips the O(n^3) matching (reported as NaN).
    """
    a = _unit_rows(dec_a, "dec_a")
    b = _unit_rows(dec_b, "dec_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries live in different spaces: dec_a is {a.shape[1]}-d, "
                         f"dec_b is {b.shape[1]}-d")
    if rotation is not None:
        b = rotate_directions(b, rotation)
    cos = a @ b.T
    max_cos = cos.max(dim=1).values
    counts, edges = np.histogram(max_cos.numpy(), bins=bins, range=(-1.0, 1.0))
    pairs: list[tuple[int, int]] = []
    h_mean = float("nan")
    if hungarian:
        rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols)]
        h_mean = float(cos[rows, cols].mean())
    return Universality(max_cos=max_cos, mean_max_cos=float(max_cos.mean()),
                        frac_above_0_5=float((max_cos > 0.5).double().mean()),
                        hist_counts=[int(c) for c in counts], hist_edges=[float(e) for e in edges],
                        hungarian_mean_cos=h_mean, hungarian_pairs=pairs,
                        rotated=rotation is not None)


@dataclass(frozen=True)
class ChanceLevel:
    """Universality of two independent random unit dictionaries (mean over trials)."""

    d: int
    n_a: int
    n_b: int
    n_trials: int
    mean_max_cos: float
    mean_max_cos_std: float
    frac_above_0_5: float
    hungarian_mean_cos: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def chance_level(d: int, n_a: int, n_b: int, seed: int = 0, n_trials: int = 3,
                 hungarian: bool = True) -> ChanceLevel:
    """Monte-Carlo chance level of :func:`decoder_universality` for isotropic random dictionaries.

    Rows are Gaussian, hence uniform on the sphere after normalisation. ``mean_max_cos_std`` is
    the spread of the per-trial mean across trials.
    """
    if min(d, n_a, n_b, n_trials) < 1:
        raise ValueError("d, n_a, n_b and n_trials must all be >= 1")
    g = torch.Generator()
    g.manual_seed(seed)
    means, fracs, hungs = [], [], []
    for _ in range(n_trials):
        a = torch.randn(n_a, d, generator=g, dtype=torch.float64)
        b = torch.randn(n_b, d, generator=g, dtype=torch.float64)
        u = decoder_universality(a, b, hungarian=hungarian)
        means.append(u.mean_max_cos)
        fracs.append(u.frac_above_0_5)
        hungs.append(u.hungarian_mean_cos)
    return ChanceLevel(d=d, n_a=n_a, n_b=n_b, n_trials=n_trials,
                       mean_max_cos=float(np.mean(means)),
                       mean_max_cos_std=float(np.std(means, ddof=1)) if n_trials > 1 else 0.0,
                       frac_above_0_5=float(np.mean(fracs)),
                       hungarian_mean_cos=float(np.mean(hungs)))
