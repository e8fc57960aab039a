"""Move SAEs and steering vectors between two models' residual-stream frames.

Directions, once and for all: a :class:`~polymorph.align.procrustes.Rotation` fitted as
``fit_rotation(acts_B, acts_A)`` maps model B's activations (source) into model A's frame
(target): ``x_A ~ (x_B - mu_B) R + mu_A``.

* :func:`transfer_sae` takes an SAE trained on **A** (the rotation's target) and returns an SAE that
  reads **B**'s activations (the rotation's source) directly and reconstructs them in B's frame.
* :func:`transfer_vector` maps a direction from the rotation's **source** frame into its **target**
  frame (``v @ R``); use ``rotation.inverse()`` for the other way.

SAE rewrite (sae-lens computes ``f = act((x - a b_dec) W_enc + b_enc)``, ``x_hat = f W_dec +
b_dec``, with ``a = cfg.apply_b_dec_to_input``). Write ``x_A = x_B R + s`` with
``s = mu_A - mu_B R``. Setting::

    W_enc' = R W_enc,   W_dec' = W_dec R^T,   b_dec' = (b_dec - mu_A) R^T + mu_B,
    b_enc' = b_enc + (1 - a) s W_enc

gives ``(x_B - a b_dec') W_enc' + b_enc' = (x_A - a b_dec) W_enc + b_enc`` exactly, so the features
are the original SAE's features of ``rotation.apply(x_B)``, and ``f W_dec' + b_dec' =
(x_hat_A - mu_A) R^T + mu_B`` is the original reconstruction mapped back into B's frame. R is
orthogonal, so decoder row norms (used by TopK's ``rescale_acts_by_decoder_norm`` and by the L1
penalty) are unchanged. Gated SAEs shift ``b_gate`` and ``b_mag`` (the latter through
``W_enc * exp(r_mag)``) the same way as ``b_enc``.
"""

from __future__ import annotations

import copy

import torch
from sae_lens import SAE

from polymorph.align.procrustes import Rotation

# Architectures whose encoder reads the input only through ``sae_in @ W_enc`` (plus biases and
# per-feature parameters), and whose decoder is ``f @ W_dec + b_dec``: exactly what the rewrite
# above covers. Others (transcoders, temporal, matching pursuit, ...) are rejected.
SUPPORTED_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
_ENCODER_BIASES = {"standard": ("b_enc",), "topk": ("b_enc",), "jumprelu": ("b_enc",),
                   "gated": ("b_gate", "b_mag")}
# Parameters that live in feature space and are unaffected by a change of input frame.
_FEATURE_PARAMS = {"threshold", "r_mag"}


def _check_sae(sae: SAE, rotation: Rotation) -> str:
    if not isinstance(sae, SAE):
        raise TypeError(f"expected a sae_lens SAE, got {type(sae).__name__}")
    if not isinstance(rotation, Rotation):
        raise TypeError(f"expected a polymorph.align.Rotation, got {type(rotation).__name__}")
    arch = sae.cfg.architecture()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"transfer_sae supports architectures {SUPPORTED_ARCHITECTURES}, got "
                         f"{arch!r}: its weights may read the input in ways a frame change does "
                         "not cover")
    if sae.cfg.normalize_activations != "none":
        raise ValueError(
            f"SAE has normalize_activations={sae.cfg.normalize_activations!r}: its input scaling "
            "is not rotation-equivariant or lives outside the SAE. Fold it into the weights first "
            "(sae.fold_activation_norm_scaling_factor(...) or sae.fold_activation_whitening(...)), "
            "which sets normalize_activations='none'")
    if sae.cfg.reshape_activations != "none":
        raise ValueError(f"SAE has reshape_activations={sae.cfg.reshape_activations!r}: it reads "
                         "per-head activations, not the residual stream a Rotation acts on")
    if sae.cfg.d_in != rotation.d:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} but the rotation is {rotation.d}-d: fit the "
                         "rotation at the SAE's hook site")
    known = {"W_enc", "W_dec", "b_dec", *_ENCODER_BIASES[arch], *_FEATURE_PARAMS}
    names = [n for n, _ in sae.named_parameters()] + [n for n, _ in sae.named_buffers()]
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise ValueError(f"SAE has parameters/buffers {unknown} that transfer_sae does not know "
                         "how to move between frames")
    return arch


@torch.no_grad()
def transfer_sae(sae: SAE, rotation: Rotation) -> SAE:
    """A new SAE (same class and cfg, deep copy) that reads the rotation's *source* frame.

    ``sae`` was trained on model A; ``rotation`` maps model B's activations into A's frame
    (``fit_rotation(acts_B, acts_A)``). The result satisfies, up to the SAE's float precision,
    ``new.encode(x_B) == sae.encode(rotation.apply(x_B))`` and
    ``new.decode(f) == rotation.inverse().apply(sae.decode(f))``. It is a plain sae-lens SAE
    (saveable with ``save_model`` / ``save_inference_model``, loadable with
    ``SAE.load_from_disk``). The rewrite is computed in float64 and cast to the SAE's dtype.
    """
    arch = _check_sae(sae, rotation)
    new = copy.deepcopy(sae)
    r = rotation.matrix
    mu_a, mu_b = rotation.target_mean, rotation.source_mean
    shift = mu_a - mu_b @ r  # s: x_A = x_B R + s
    a = 1.0 if sae.cfg.apply_b_dec_to_input else 0.0

    def f64(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to("cpu", torch.float64)

    w_enc = f64(sae.W_enc)
    updates = {"W_enc": r @ w_enc, "W_dec": f64(sae.W_dec) @ r.T,
               "b_dec": (f64(sae.b_dec) - mu_a) @ r.T + mu_b}
    if arch == "gated":
        updates["b_gate"] = f64(sae.b_gate) + (1 - a) * (shift @ w_enc)
        updates["b_mag"] = f64(sae.b_mag) + (1 - a) * (shift @ (w_enc * f64(sae.r_mag).exp()))
    else:
        updates["b_enc"] = f64(sae.b_enc) + (1 - a) * (shift @ w_enc)
    for name, value in updates.items():
        param = getattr(new, name)
        param.data.copy_(value.to(param.device, param.dtype))
    return new


def transfer_vector(v: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Map direction(s) ``v`` [..., d] from the rotation's source frame into its target frame.

    ``v @ R`` with no means: a steering vector is a difference of activations, so offsets cancel.
    For a vector built on model A to be used on model B with ``fit_rotation(acts_B, acts_A)``,
    pass ``rotation.inverse()``. Returns v's dtype.
    """
    if not isinstance(rotation, Rotation):
        raise TypeError(f"expected a polymorph.align.Rotation, got {type(rotation).__name__}")
    if v.shape[-1] != rotation.d:
        raise ValueError(f"vector is {v.shape[-1]}-d, the rotation is {rotation.d}-d")
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    return (v.to(cdt) @ rotation.matrix.to(v.device, cdt)).to(v.dtype)
