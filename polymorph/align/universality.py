"""Decoder universality between two SAE dictionaries, raw and after a rotation.

Dictionaries are ``[n_features, d]`` with one decoder direction per row (sae-lens ``W_dec`` layout
``[d_sae, d_in]``). Cosines are between rows; a zero row (a dead feature with a zeroed decoder)
has cosine 0 with everything.

Metrics (docs/method.md, "Metrics"):
  * max-cosine: for each row of A, ``max_j cos(a_i, b_j)`` over B's rows (the published number;
    several A features may claim the same B feature); its mean and the fraction above 0.5;
  * Hungarian: a one-to-one matching (``scipy.optimize.linear_sum_assignment`` maximising the
    total cosine; rectangular allowed, ``min(n_a, n_b)`` pairs) and the mean cosine of the pairs.

Chance (docs/method.md, "Calibration"). :func:`chance_level` draws rows uniformly on the sphere of all
d dimensions (expected max-cosine about ``sqrt(2 ln n_b / d)``). Trained decoder rows live in the
activation span and are anisotropic within it, so two unrelated dictionaries score far higher than
that: the isotropic value is a lower bound, not chance. :func:`matched_chance` is chance: random
dictionaries of the same shapes whose rows are drawn from N(0, C) with C each real dictionary's
row second-moment matrix (rotated with B when B is rotated), then unit-normalised.
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
    """Universality of two independent random dictionaries, mean (and spread) over trials.

    Attributes:
        d, n_a, n_b, n_trials: sizes. kind: "isotropic" (:func:`chance_level`, rows uniform on
            the sphere: a lower bound) or "matched" (:func:`matched_chance`: rows from each real
            dictionary's second-moment matrix). rotated: whether B's second moment was rotated
            into A's frame.
        mean_max_cos, frac_above_0_5, hungarian_mean_cos: the metrics of
            :func:`decoder_universality`, averaged over trials; ``*_std``: their spread across
            trials (ddof=1; 0 for one trial).
        effective_dim_a, effective_dim_b: participation ratio ``tr(C)^2 / tr(C^2)`` of the row
            second-moment matrices the rows were drawn from (d for isotropic rows; about r for
            rows spread evenly over an r-dimensional span).
    """

    d: int
    n_a: int
    n_b: int
    n_trials: int
    mean_max_cos: float
    mean_max_cos_std: float
    frac_above_0_5: float
    hungarian_mean_cos: float
    frac_above_0_5_std: float = 0.0
    hungarian_mean_cos_std: float = 0.0
    kind: str = "isotropic"
    rotated: bool = False
    effective_dim_a: float = float("nan")
    effective_dim_b: float = float("nan")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _chance_trials(draw_a, draw_b, n_trials: int, hungarian: bool) -> dict:
    """Score ``n_trials`` pairs of random dictionaries from the two samplers."""
    means, fracs, hungs = [], [], []
    for _ in range(n_trials):
        u = decoder_universality(draw_a(), draw_b(), hungarian=hungarian)
        means.append(u.mean_max_cos)
        fracs.append(u.frac_above_0_5)
        hungs.append(u.hungarian_mean_cos)
    return {"n_trials": n_trials, "mean_max_cos": float(np.mean(means)),
            "mean_max_cos_std": _std(means), "frac_above_0_5": float(np.mean(fracs)),
            "frac_above_0_5_std": _std(fracs), "hungarian_mean_cos": float(np.mean(hungs)),
            "hungarian_mean_cos_std": _std(hungs)}


def chance_level(d: int, n_a: int, n_b: int, seed: int = 0, n_trials: int = 3,
                 hungarian: bool = True) -> ChanceLevel:
    """Monte-Carlo universality of isotropic random dictionaries: a **lower bound**, not chance.

    Rows are Gaussian, hence uniform on the sphere after normalisation. Trained decoder rows
    concentrate in the activation span, where random directions agree more: use
    :func:`matched_chance` as the chance level of a real pair of dictionaries.
    ``mean_max_cos_std`` is the spread of the per-trial mean across trials.
    """
    if min(d, n_a, n_b, n_trials) < 1:
        raise ValueError("d, n_a, n_b and n_trials must all be >= 1")
    g = torch.Generator()
    g.manual_seed(seed)
    res = _chance_trials(lambda: torch.randn(n_a, d, generator=g, dtype=torch.float64),
                         lambda: torch.randn(n_b, d, generator=g, dtype=torch.float64),
                         n_trials, hungarian)
    return ChanceLevel(d=d, n_a=n_a, n_b=n_b, kind="isotropic", rotated=False,
                       effective_dim_a=float(d), effective_dim_b=float(d), **res)


def row_second_moment(dec: torch.Tensor) -> torch.Tensor:
    """``C = U^T U / n_live`` [d, d], U the unit-normalised non-zero rows of ``dec`` [n, d]."""
    u = _unit_rows(dec, "dec")
    live = u.norm(dim=1) > 0
    if not live.any():
        raise ValueError("the dictionary has no non-zero row")
    u = u[live]
    return u.T @ u / u.shape[0]


def _participation_ratio(c: torch.Tensor) -> float:
    return float(torch.trace(c) ** 2 / (c * c).sum())


def _gaussian_rows(c: torch.Tensor, n: int, zero: torch.Tensor, g: torch.Generator):
    """Sampler of [n, d] rows from N(0, C) with the rows flagged in ``zero`` set to 0."""
    vals, vecs = torch.linalg.eigh(c)
    factor = vecs * vals.clamp(min=0).sqrt()  # C = factor @ factor^T

    def draw() -> torch.Tensor:
        rows = torch.randn(n, c.shape[0], generator=g, dtype=torch.float64) @ factor.T
        rows[zero] = 0.0
        return rows

    return draw


def matched_chance(dec_a: torch.Tensor, dec_b: torch.Tensor,
                   rotation: Rotation | torch.Tensor | None = None, n_trials: int = 3,
                   seed: int = 0, hungarian: bool = True) -> ChanceLevel:
    """Chance level of ``decoder_universality(dec_a, dec_b, rotation)`` for these dictionaries.

    Two random dictionaries with the shapes of ``dec_a`` and ``dec_b`` [n, d]: rows drawn from
    N(0, C_a) and N(0, C_b), C the real dictionary's row second-moment matrix
    (:func:`row_second_moment`: rows unit-normalised first, zero rows left out), then
    unit-normalised by the scoring. With ``rotation`` (B's frame into A's, as in
    :func:`decoder_universality`) B's rows are rotated first, i.e. C_b becomes ``R^T C_b R``.
    Zero rows (dead features with a zeroed decoder) stay zero rows in the random dictionary, so
    they count as in the real comparison. Returns the metrics of :func:`decoder_universality`
    averaged over ``n_trials`` (with their spread across trials).
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    a = _unit_rows(dec_a, "dec_a")
    b = _unit_rows(dec_b, "dec_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries live in different spaces: dec_a is {a.shape[1]}-d, "
                         f"dec_b is {b.shape[1]}-d")
    if rotation is not None:
        b = rotate_directions(b, rotation)
    c_a, c_b = row_second_moment(a), row_second_moment(b)
    g = torch.Generator()
    g.manual_seed(seed)
    res = _chance_trials(_gaussian_rows(c_a, a.shape[0], a.norm(dim=1) == 0, g),
                         _gaussian_rows(c_b, b.shape[0], b.norm(dim=1) == 0, g),
                         n_trials, hungarian)
    return ChanceLevel(d=a.shape[1], n_a=a.shape[0], n_b=b.shape[0], kind="matched",
                       rotated=rotation is not None, effective_dim_a=_participation_ratio(c_a),
                       effective_dim_b=_participation_ratio(c_b), **res)
