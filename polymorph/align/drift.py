"""How far apart are two frames? One rotation fitted and summarised (e.g. checkpoint to final).

Pure copies of ``frob_dist_on_span`` and ``rotation_summary`` from
``polymorph.analysis.checkpoint_drift`` (same definitions and keys), so that the analysis can take
them from ``align``; :func:`rotation_summary` adds the span-restricted trace test of
:mod:`polymorph.align.span` (keys ``trace_on_span``, ``trace_z_on_span``, ``trace_p_on_span``).
"""

from __future__ import annotations

import math
import warnings

import torch

from polymorph.align.haar import diagnose, haar_null
from polymorph.align.procrustes import Rotation, fit_rotation, score_alignment
from polymorph.align.span import principal_directions, span_diagnostics


def span_of_fit(rotation: Rotation, source: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [d, r] of the source activations' top-r principal directions, with
    r = ``rotation.effective_rank()`` (the directions on which the fit determined R)."""
    _, vecs = principal_directions(source)
    return vecs[:, :rotation.effective_rank()].contiguous()


def frob_dist_on_span(rotation: Rotation, source: torch.Tensor) -> tuple[float, int]:
    """``||B^T (R - I)||_F`` and r, with B [d, r] an orthonormal basis of the source activations'
    span (the top-r principal directions of the centred ``source`` rows, r =
    ``rotation.effective_rank()``).

    Why: when the activations span r < d directions, the Procrustes R is arbitrary on the other
    d - r, and ``||R - I||_F`` counts that arbitrary part as drift. Restricted to the span, the
    distance is 0 for a map that is the identity on every observed direction, and about
    sqrt(2r) for a Haar-random R (each unit direction b moves by ``E||b R - b||^2 = 2``).
    """
    basis = span_of_fit(rotation, source)
    eye = torch.eye(rotation.d, dtype=torch.float64)
    return float((basis.T @ (rotation.matrix - eye)).norm()), basis.shape[1]


def rotation_summary(source_fit: torch.Tensor, target_fit: torch.Tensor,
                     source_score: torch.Tensor, target_score: torch.Tensor, group: str,
                     n_null: int) -> tuple[dict, Rotation]:
    """Fit source -> target on the fit rows and describe the rotation.

    Returns (summary, rotation). The summary holds ``frob_dist``, ``frob_ratio``, ``trace_z``,
    ``fixed_dim_estimate`` (Haar diagnostics of R, :func:`~polymorph.align.haar.diagnose`, with
    a null of ``n_null`` draws), ``frob_dist_on_span``, ``frob_ratio_on_span`` (divided by
    sqrt(2r)), ``span_rank`` (see :func:`frob_dist_on_span`), ``trace_on_span``,
    ``trace_z_on_span``, ``trace_p_on_span`` (the trace of R compressed to that span against
    its exact Haar moments (0, r/d), :func:`~polymorph.align.span.span_diagnostics`) and
    ``raw_/rotated_/floor_`` x ``ev_published/ev_standard`` on the score rows
    (:func:`~polymorph.align.procrustes.score_alignment`). The rank-deficiency warning of
    ``fit_rotation`` is recorded as ``span_rank`` < d rather than raised at every call.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rot = fit_rotation(source_fit, target_fit, group=group)
    null = haar_null(rot.d, group, n_null)
    diag = diagnose(rot.matrix, null)
    basis = span_of_fit(rot, source_fit)
    on_span = span_diagnostics(rot.matrix, basis, null)
    rank = basis.shape[1]
    eye = torch.eye(rot.d, dtype=torch.float64)
    frob_on_span = float((basis.T @ (rot.matrix - eye)).norm())
    summary = {
        "frob_dist": diag.frob_dist,
        "frob_ratio": diag.frob_ratio,
        "trace_z": diag.trace_z,
        "fixed_dim_estimate": diag.fixed_dim_estimate,
        "frob_dist_on_span": frob_on_span,
        "frob_ratio_on_span": frob_on_span / math.sqrt(2 * rank) if rank else float("nan"),
        "span_rank": rank,
        "trace_on_span": on_span.trace,
        "trace_z_on_span": on_span.trace_z,
        "trace_p_on_span": on_span.trace_p,
        **score_alignment(rot, source_score, target_score),
    }
    return summary, rot
