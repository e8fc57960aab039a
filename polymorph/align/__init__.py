"""polymorph.align: the mathematics the project reports (pure functions, planted-truth tested).

* :mod:`~polymorph.align.metrics` (explained variance, both definitions);
* :mod:`~polymorph.align.procrustes` (fit / apply / score a rotation; the shuffled-pairing null);
* :mod:`~polymorph.align.haar` (is a rotation a Haar draw? trace, KS, near-fixed subspace);
* :mod:`~polymorph.align.fixed` (near-fixed subspace thresholded at the fit's bootstrap noise);
* :mod:`~polymorph.align.span` (the trace test on the activations' span or a subspace's complement);
* :mod:`~polymorph.align.drift` (one fitted rotation summarised, e.g. a checkpoint to the final);
* :mod:`~polymorph.align.statistics` (sequence and pair bootstrap intervals from per-sequence sums);
* :mod:`~polymorph.align.universality` (decoder max-cosine, Hungarian matching, matched chance);
* :mod:`~polymorph.align.consensus` (generalised Procrustes: one frame for many seeds);
* :mod:`~polymorph.align.outputs` (per-row agreement, KL and cross-entropy of two output sets);
* :mod:`~polymorph.align.transfer` (move an SAE or a steering vector between frames).

``transfer`` imports sae-lens, so its names are loaded lazily.
"""

from polymorph.align.consensus import Consensus, ScaledRotation, fit_consensus
from polymorph.align.drift import frob_dist_on_span, rotation_summary
from polymorph.align.fixed import (
    FitBootstrap,
    NearFixedSubspace,
    bootstrap_rotations,
    near_fixed_subspace,
)
from polymorph.align.haar import (
    HaarDiagnostics,
    HaarDiagnosticsSet,
    HaarNull,
    compressed_trace_moments,
    diagnose,
    diagnose_many,
    eigen_angles,
    exact_trace_moments,
    haar_null,
    haar_orthogonal,
    haar_with_fixed_block,
    pooled_trace_z,
    trace_zscore,
)
from polymorph.align.metrics import EV_DEFINITIONS, ev_published, ev_standard, explained_variance
from polymorph.align.procrustes import (
    Rotation,
    fit_rotation,
    fit_rotation_shuffled,
    score_alignment,
    shuffled_pairing,
)
from polymorph.align.span import (
    SpanDiagnostics,
    activation_span,
    complement_basis,
    complement_diagnostics,
    span_diagnostics,
)
from polymorph.align.statistics import (
    EVSums,
    Interval,
    bootstrap_ci,
    bootstrap_weights,
    ev_ci,
    ev_from_sums,
    hierarchical_ci,
    hierarchical_ev_ci,
    hierarchical_ratio_ci,
    ratio_ci,
)
from polymorph.align.universality import (
    ChanceLevel,
    Universality,
    chance_level,
    decoder_universality,
    matched_chance,
)

_LAZY = {"transfer_sae", "transfer_vector"}

__all__ = [
    "EV_DEFINITIONS",
    "ChanceLevel",
    "Consensus",
    "EVSums",
    "FitBootstrap",
    "HaarDiagnostics",
    "HaarDiagnosticsSet",
    "HaarNull",
    "Interval",
    "NearFixedSubspace",
    "Rotation",
    "ScaledRotation",
    "SpanDiagnostics",
    "Universality",
    "activation_span",
    "bootstrap_ci",
    "bootstrap_rotations",
    "bootstrap_weights",
    "chance_level",
    "complement_basis",
    "complement_diagnostics",
    "compressed_trace_moments",
    "decoder_universality",
    "diagnose",
    "diagnose_many",
    "eigen_angles",
    "ev_ci",
    "ev_from_sums",
    "ev_published",
    "ev_standard",
    "exact_trace_moments",
    "explained_variance",
    "fit_consensus",
    "fit_rotation",
    "fit_rotation_shuffled",
    "frob_dist_on_span",
    "haar_null",
    "haar_orthogonal",
    "haar_with_fixed_block",
    "hierarchical_ci",
    "hierarchical_ev_ci",
    "hierarchical_ratio_ci",
    "matched_chance",
    "near_fixed_subspace",
    "pooled_trace_z",
    "ratio_ci",
    "rotation_summary",
    "score_alignment",
    "shuffled_pairing",
    "span_diagnostics",
    "trace_zscore",
    "transfer_sae",
    "transfer_vector",
]


def __getattr__(name: str):
    if name in _LAZY:
        from polymorph.align import transfer

        return getattr(transfer, name)
    raise AttributeError(f"module 'polymorph.align' has no attribute {name!r}")
