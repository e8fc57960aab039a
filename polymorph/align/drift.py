"""How far a residual frame moves: rotations between checkpoints of one model, on the span.

Pure functions (tensors in, numbers out) used to follow one seed's frame during training.
"""

from __future__ import annotations

import math
import warnings

import torch

from polymorph.align.haar import diagnose, haar_null
from polymorph.align.procrustes import Rotation, fit_rotation, score_alignment


def frob_dist_on_span(rotation: Rotation, source: torch.Tensor) -> tuple[float, int]:
    """``||B^T (R - I)||_F`` and r, with B [d, r] an orthonormal basis of the source activations'
    span (the top-r principal directions of the centred ``source`` rows, r =
    ``rotation.effective_rank()``).

    Why: when the activations span r < d directions, the Procrustes R is arbitrary on the other
    d - r, and ``||R - I||_F`` counts that arbitrary part as drift. Restricted to the span, the
    distance is 0 for a map that is the identity on every observed direction, and about
    sqrt(2r) for a Haar-random R (each unit direction b moves by ``E||b R - b||^2 = 2``).
    """
    x = source.double()
    x = x - x.mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    r = rotation.effective_rank()
    basis = vecs[:, vecs.shape[1] - r:]
    eye = torch.eye(rotation.d, dtype=torch.float64)
    return float((basis.T @ (rotation.matrix - eye)).norm()), r


def rotation_summary(source_fit: torch.Tensor, target_fit: torch.Tensor,
                     source_score: torch.Tensor, target_score: torch.Tensor, group: str,
                     n_null: int) -> tuple[dict, Rotation]:
    """Fit source -> target on the fit rows and describe the rotation (see module docstring).

    Returns (summary, rotation). The summary holds ``frob_dist``, ``frob_ratio``, ``trace_z``,
    ``fixed_dim_estimate`` (Haar diagnostics of R), ``frob_dist_on_span``,
    ``frob_ratio_on_span``, ``span_rank`` (see :func:`frob_dist_on_span`) and
    ``raw_/rotated_/floor_`` x ``ev_published/ev_standard`` on the score rows
    (:func:`~polymorph.align.procrustes.score_alignment`). The rank-deficiency warning of
    ``fit_rotation`` is recorded as ``span_rank`` < d rather than raised at every checkpoint.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rot = fit_rotation(source_fit, target_fit, group=group)
    diag = diagnose(rot.matrix, haar_null(rot.d, group, n_null))
    on_span, rank = frob_dist_on_span(rot, source_fit)
    summary = {
        "frob_dist": diag.frob_dist,
        "frob_ratio": diag.frob_ratio,
        "trace_z": diag.trace_z,
        "fixed_dim_estimate": diag.fixed_dim_estimate,
        "frob_dist_on_span": on_span,
        "frob_ratio_on_span": on_span / math.sqrt(2 * rank) if rank else float("nan"),
        "span_rank": rank,
        **score_alignment(rot, source_score, target_score),
    }
    return summary, rot

