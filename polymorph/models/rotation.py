"""A function-preserving rotation of a HookedTransformer's residual stream (planted ground truth).

RMSNorm without its gain commutes with any orthogonal Q (``||x Q|| = ||x||``). So after folding
every norm gain into the weights that read the norm's output, multiplying every weight that
*writes* the residual stream on the right by Q and every weight that *reads* it on the left by
``Q^T`` gives a model with identical outputs whose residual activations are exactly the original
ones times Q (docs/method.md, "A planted rotation"). Two such models are polymorphic by construction.

Weights by role (TransformerLens names and shapes):
  * writers, ``W <- W Q``: ``embed.W_E`` [d_vocab, d_model], ``pos_embed.W_pos`` [n_ctx, d_model],
    ``attn.W_O`` [n_heads, d_head, d_model], ``attn.b_O``, ``mlp.W_out`` [d_mlp, d_model],
    ``mlp.b_out``;
  * readers, ``W <- Q^T W`` on the d_model axis: ``attn.W_Q/W_K/W_V`` [n_heads, d_model, d_head],
    ``mlp.W_in`` (and ``W_gate``) [d_model, d_mlp], ``unembed.W_U`` [d_model, d_vocab_out];
  * norm gains ``ln1.w`` (read by W_Q/W_K/W_V), ``ln2.w`` (read by W_in/W_gate), ``ln_final.w``
    (read by W_U): folded into their readers as ``diag(w) W``, then set to 1;
  * unchanged: the reader biases ``b_Q, b_K, b_V, b_in, b_U`` (added after the read).
Any other parameter is an error rather than a silently wrong model. LayerNorm (mean-centring
across d_model) does not commute with a rotation, so only RMS / RMSPre / no normalisation work.
"""

from __future__ import annotations

import copy
import re

import torch
from transformer_lens import HookedTransformer

SUPPORTED_NORMALIZATION = ("RMS", "RMSPre", None)
_ORTHO_TOL = 1e-5

# name pattern -> role. Readers carry the axis of d_model.
_WRITERS = re.compile(r"^(embed\.W_E|pos_embed\.W_pos|blocks\.\d+\.attn\.(W_O|b_O)"
                      r"|blocks\.\d+\.mlp\.(W_out|b_out))$")
_ATTN_READERS = re.compile(r"^blocks\.(\d+)\.attn\.(W_Q|W_K|W_V|_W_K|_W_V)$")
_MLP_READERS = re.compile(r"^blocks\.(\d+)\.mlp\.(W_in|W_gate)$")
_UNEMBED = "unembed.W_U"
_GAINS = re.compile(r"^(blocks\.(\d+)\.(ln1|ln2)\.w|ln_final\.w)$")
_UNCHANGED = re.compile(r"^(blocks\.\d+\.attn\.(b_Q|b_K|b_V|_b_K|_b_V)|blocks\.\d+\.mlp\.b_in"
                        r"|unembed\.b_U)$")


def _check_orthogonal(q: torch.Tensor, d_model: int) -> torch.Tensor:
    q = q.detach().to("cpu", torch.float64)
    if q.shape != (d_model, d_model):
        raise ValueError(f"Q must be [d_model, d_model] = [{d_model}, {d_model}], "
                         f"got {tuple(q.shape)}")
    err = (q.T @ q - torch.eye(d_model, dtype=torch.float64)).abs().max().item()
    if not err <= _ORTHO_TOL:
        raise ValueError(f"Q is not orthogonal (max |Q^T Q - I| = {err:.3g}); use e.g. "
                         "polymorph.align.haar.haar_orthogonal")
    return q


def _classify(params: dict[str, torch.Tensor]) -> None:
    for name in params:
        if not (_WRITERS.match(name) or _ATTN_READERS.match(name) or _MLP_READERS.match(name)
                or name == _UNEMBED or _GAINS.match(name) or _UNCHANGED.match(name)):
            raise ValueError(f"rotate_residual_stream does not know whether parameter {name!r} "
                             "reads or writes the residual stream; refusing to guess")


def _folded_weights(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """float64 copies of every parameter with the norm gains folded into their readers."""
    w = {n: p.detach().to("cpu", torch.float64).clone() for n, p in model.named_parameters()}
    _classify(w)
    for name in list(w):
        m = _GAINS.match(name)
        if m is None:
            continue
        gain = w[name]
        if name == "ln_final.w":
            readers = [_UNEMBED]
        else:
            layer, which = m.group(2), m.group(3)
            pattern = _ATTN_READERS if which == "ln1" else _MLP_READERS
            readers = [n for n in w if (r := pattern.match(n)) and r.group(1) == layer]
        for reader in readers:
            if reader not in w:
                continue
            # d_model is the second-to-last axis of every reader ([..., d_model, out]).
            w[reader] = w[reader] * gain.unsqueeze(-1)
        w[name] = torch.ones_like(gain)
    return w


def _load(model: HookedTransformer, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name].to(p.device, p.dtype))


def fold_norm_gains(model: HookedTransformer) -> HookedTransformer:
    """A deep copy with every RMSNorm gain folded into the weights reading it (gains set to 1).

    Same outputs, same config and modules (the norms stay RMS with unit gain), so the result can
    be rotated exactly.
    """
    _check_config(model)
    new = copy.deepcopy(model)
    _load(new, _folded_weights(model))
    return new


def _check_config(model: HookedTransformer) -> None:
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"expected a HookedTransformer, got {type(model).__name__}")
    norm = model.cfg.normalization_type
    if norm not in SUPPORTED_NORMALIZATION:
        raise ValueError(f"normalization_type={norm!r} is not rotation-equivariant (LayerNorm "
                         f"centres across d_model); supported: {SUPPORTED_NORMALIZATION}")


def rotate_residual_stream(model: HookedTransformer, q: torch.Tensor) -> HookedTransformer:
    """A new model whose residual stream is the original's times Q, with the same logits.

    Every ``hook_resid_*`` activation of the result equals the original's ``@ Q`` and the logits
    are unchanged (up to the model dtype's rounding: the rewrite is computed in float64). ``q``
    is an orthogonal [d_model, d_model] matrix (a tensor, or a Rotation's ``.matrix``). The input
    model is not modified. Activations map *original -> rotated* as ``x @ Q``, so
    ``fit_rotation(acts_original, acts_rotated).matrix`` recovers Q.
    """
    _check_config(model)
    q = _check_orthogonal(torch.as_tensor(q), model.cfg.d_model)
    w = _folded_weights(model)
    for name in w:
        if _WRITERS.match(name):
            w[name] = w[name] @ q
        elif _ATTN_READERS.match(name) or _MLP_READERS.match(name) or name == _UNEMBED:
            w[name] = q.T @ w[name]
    new = copy.deepcopy(model)
    _load(new, w)
    return new
