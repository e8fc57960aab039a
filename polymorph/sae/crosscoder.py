"""A cross-seed crosscoder: one sparse code shared by every seed's residual stream.

Given ``S`` row-aligned activation matrices (seed s's activations ``x_s`` [n, d] on the same
inputs, in the same order), the crosscoder has per-seed encoders ``W_enc[s]`` [d, m], decoders
``W_dec[s]`` [m, d] and decoder biases ``b_dec[s]`` [d], and one encoder bias ``b_enc`` [m]::

    f       = act( sum_s (x_s - b_dec[s]) W_enc[s] + b_enc )       one code per input row
    x_hat_s = f W_dec[s] + b_dec[s]                                 one reconstruction per seed

If the seeds differ by a rotation (``x_s = x Q_s``), a crosscoder can represent that exactly
with ``W_dec[s] = W_dec[0] Q_0^T Q_s``: the per-seed decoders are the test of the rotation
hypothesis that needs no Procrustes fit, and :meth:`Crosscoder.decoder_norms` says how evenly
each latent is spread over the seeds (a latent used by one seed only has its decoder norm there).

Loss (sae-lens' normalisation, as ``polymorph.sae.module`` uses for SAEs): the squared error
is summed over the d dimensions **and over the seeds** and averaged over the rows of the batch,
``mean_b sum_s sum_j (x_hat_s - x_s)_bj^2``; the published per-entry mean is this divided by
``S * d``. Sparsity:

* ``relu_l1``: ``act = ReLU`` and ``l1 * mean_b sum_i f_i * sum_s ||W_dec[s]_i||``, the L1 of
  each latent weighted by the sum over seeds of its decoder row norms (Anthropic's cross-model
  crosscoders; the same parametrisation as sae-lens' StandardTrainingSAE, whose L1 is weighted
  by the one decoder norm). Decoders are unconstrained while training.
* ``topk``: keep the k largest pre-activations of each row (then ReLU), no L1; selection is on
  ``pre_i * sum_s ||W_dec[s]_i||`` so it does not depend on how a latent's scale is split
  between encoder and decoder (sae-lens' ``rescale_acts_by_decoder_norm``), plus sae-lens'
  AuxK loss: latents dead for ``dead_feature_window`` steps reconstruct the residual.

Both parametrisations are folded at the end (:meth:`Crosscoder.fold_decoder_norms`): each
latent's decoder rows are divided by their summed norm ``n_i`` (so ``sum_s ||W_dec[s]_i|| = 1``)
and ``W_enc[:, :, i]``, ``b_enc[i]`` multiplied by it. Reconstructions do not change, the L1
becomes the plain ``sum_i f_i`` and TopK's selection becomes the plain top-k of the
pre-activations, which is what :meth:`Crosscoder.encode` computes. ``decoder_norms()`` rows
then sum to 1: ``1 / S`` per seed for a latent spread evenly.

From sae-lens: the initialisation convention (each seed's decoder rows drawn with
``kaiming_uniform_``, rescaled to ``TrainingSAEConfig``'s ``decoder_init_norm`` = 0.1, encoder
= decoder transposed, zero biases), the ``TopK`` activation module, ``mse_loss`` and
``calculate_topk_aux_acts`` (AuxK's choice of dead latents), and the AuxK constants (``k_aux =
d_in // 2``, ``aux_loss_coefficient``'s default). Written here by hand, because sae-lens' SAE
classes hold one [d_in, d_sae] encoder and one [d_sae, d_in] decoder for one input: the
per-seed weights, the encoder summed over seeds, the per-seed decoding, the summed-norm L1
weight and its fold, and the loss summed over seeds. A crosscoder is not a sae-lens ``SAE``
(no hooks, no ``cfg.json``); its own folder format is in :mod:`polymorph.sae.crosscoder_io`.

Not defined: reconstructing seed s from seed s's input alone. The code reads every seed at
once, so there is no ``encode_from(seed_subset)``: dropping seeds from the sum leaves
pre-activations that ``b_enc`` was never fitted for (the missing terms are not zero on
average), and any fill-in (means, rotated copies of another seed) would be a modelling choice
made outside the crosscoder. To compare with single-seed SAEs, encode all seeds and decode one
(:meth:`Crosscoder.decode_seed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAEConfig, mse_loss
from sae_lens.saes.topk_sae import TopK, TopKTrainingSAEConfig, calculate_topk_aux_acts
from torch import nn

from polymorph.sae.crosscoder_config import CrosscoderConfig

# sae-lens' defaults, read from its config classes so the two stay in step.
_DEFAULTS = {f.name: f.default for f in fields(TrainingSAEConfig)}
DECODER_INIT_NORM: float = _DEFAULTS["decoder_init_norm"]
AUX_LOSS_COEFFICIENT: float = {f.name: f.default
                               for f in fields(TopKTrainingSAEConfig)}["aux_loss_coefficient"]


@dataclass
class CrosscoderStepOutput:
    """One training forward pass: the total loss, its named terms and the code."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    feature_acts: torch.Tensor  # [batch, m]; in folded units for topk
    per_seed_mse: torch.Tensor  # [S]: squared error summed over d, mean over rows, per seed
    metrics: dict[str, Any] = field(default_factory=dict)


class Crosscoder(nn.Module):
    """Per-seed encoders and decoders around one shared code (see the module docstring).

    Parameters (float32): ``W_enc`` [S, d, m], ``W_dec`` [S, m, d], ``b_enc`` [m],
    ``b_dec`` [S, d]. ``Crosscoder(cfg)`` initialises them from ``cfg.init_seed`` (inside
    ``torch.random.fork_rng``, so the caller's RNG is untouched); ``init=False`` leaves them
    uninitialised for loading.

    Inputs: a list of S tensors [..., d] (seed s's activations on the same rows), or one tensor
    [..., S, d].
    """

    def __init__(self, cfg: CrosscoderConfig, *, init: bool = True) -> None:
        super().__init__()
        if not isinstance(cfg, CrosscoderConfig):
            raise TypeError(f"expected a CrosscoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        s, d, m = cfg.n_seeds, cfg.d_in, cfg.d_latent
        self.W_enc = nn.Parameter(torch.empty(s, d, m))
        self.W_dec = nn.Parameter(torch.empty(s, m, d))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(s, d))
        self.activation: nn.Module = nn.ReLU() if cfg.architecture == "relu_l1" else TopK(cfg.k)
        if init:
            self._initialise(cfg.init_seed)

    @torch.no_grad()
    def _initialise(self, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for s in range(self.cfg.n_seeds):
                # sae-lens TrainingSAE.initialize_weights, per seed.
                w = torch.empty(self.cfg.d_latent, self.cfg.d_in)
                nn.init.kaiming_uniform_(w)
                w *= DECODER_INIT_NORM / w.norm(dim=-1, keepdim=True)
                self.W_dec[s] = w
                self.W_enc[s] = w.T
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------ shapes

    @property
    def n_seeds(self) -> int:
        return self.cfg.n_seeds

    def stack(self, xs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Seeds' inputs as one tensor [..., S, d] (checked: S seeds, width d, same rows)."""
        s, d = self.cfg.n_seeds, self.cfg.d_in
        if isinstance(xs, torch.Tensor):
            if xs.ndim < 2 or tuple(xs.shape[-2:]) != (s, d):
                raise ValueError(f"a stacked crosscoder input must be [..., n_seeds={s}, "
                                 f"d_in={d}], got shape {tuple(xs.shape)}")
            return xs
        if not isinstance(xs, (list, tuple)) or len(xs) != s:
            got = len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__
            raise ValueError(f"the crosscoder reads {s} seeds at once: pass a list of {s} "
                             f"tensors [..., {d}], got {got}")
        first = tuple(xs[0].shape)
        for i, x in enumerate(xs):
            if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != d:
                shape = tuple(getattr(x, "shape", ()))
                raise ValueError(f"seed {i}: input has shape {shape}, the crosscoder expects "
                                 f"width d_in={d}")
            if tuple(x.shape) != first:
                raise ValueError(f"seed {i}: input has shape {tuple(x.shape)} but seed 0 has "
                                 f"{first}; the seeds' rows must be the same inputs")
        return torch.stack(list(xs), dim=-2)

    # ------------------------------------------------------------------ inference

    def hidden_pre(self, xs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Pre-activations ``sum_s (x_s - b_dec[s]) W_enc[s] + b_enc`` [..., m]."""
        x = self.stack(xs).to(self.W_enc.dtype)
        lead = x.shape[:-2]
        s, d, m = self.cfg.n_seeds, self.cfg.d_in, self.cfg.d_latent
        # One [rows, S*d] @ [S*d, m] product: the sum over seeds is part of the contraction.
        flat = (x - self.b_dec).reshape(-1, s * d)
        return (flat @ self.W_enc.reshape(s * d, m) + self.b_enc).reshape(*lead, m)

    def encode(self, xs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The shared code f [..., m] of the seeds' inputs (folded form: plain ReLU / TopK)."""
        return self.activation(self.hidden_pre(xs))

    def decode_stacked(self, f: torch.Tensor) -> torch.Tensor:
        """Every seed's reconstruction as one tensor [..., S, d]."""
        lead, m = f.shape[:-1], f.shape[-1]
        # S batched [rows, m] @ [m, d] products (W_dec stays in place), then rows first.
        out = torch.matmul(f.reshape(1, -1, m), self.W_dec)  # [S, rows, d]
        return (out.transpose(0, 1) + self.b_dec).reshape(*lead, self.cfg.n_seeds,
                                                          self.cfg.d_in)

    def decode(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions of every seed from the code: a list of S tensors [..., d]."""
        return list(self.decode_stacked(f).unbind(dim=-2))

    def decode_seed(self, f: torch.Tensor, seed: int) -> torch.Tensor:
        """Seed ``seed``'s reconstruction ``f W_dec[seed] + b_dec[seed]`` [..., d]."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < self.n_seeds:
            raise ValueError(f"seed must be an index in [0, {self.n_seeds}), got {seed!r}")
        return f @ self.W_dec[seed] + self.b_dec[seed]

    def forward(self, xs: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        return self.decode(self.encode(xs))

    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """``||W_dec[s]_i||`` as [m, S]: how each latent's decoder is spread over the seeds.

        After :meth:`fold_decoder_norms` each row sums to 1 (``1 / S`` each when even).
        """
        return self.W_dec.detach().norm(dim=-1).T.contiguous()

    @torch.no_grad()
    def fold_decoder_norms(self) -> torch.Tensor:
        """Rescale so every latent's summed decoder norm is 1 (module docstring); returns the
        summed norms before folding [m]. Reconstructions are unchanged up to float rounding."""
        norms = self.summed_decoder_norms().detach().clamp(min=1e-8)
        self.W_dec.div_(norms[None, :, None])
        self.W_enc.mul_(norms[None, None, :])
        self.b_enc.mul_(norms)
        return norms

    def summed_decoder_norms(self) -> torch.Tensor:
        """``sum_s ||W_dec[s]_i||`` [m] (differentiable: the L1 weight while training)."""
        return self.W_dec.norm(dim=-1).sum(dim=0)

    # ------------------------------------------------------------------ training

    def training_forward(self, x: torch.Tensor, *, dead_mask: torch.Tensor | None = None
                         ) -> CrosscoderStepOutput:
        """Loss of one minibatch ``x`` [batch, S, d] (module docstring), in the unfolded form.

        ``losses`` holds ``mse_loss`` (summed over seeds and d, mean over rows) and
        ``l1_loss`` (relu_l1) or ``auxiliary_reconstruction_loss`` (topk).
        """
        x = self.stack(x)
        pre = self.hidden_pre(x)
        norms = self.summed_decoder_norms()
        if self.cfg.architecture == "relu_l1":
            feats = torch.relu(pre)
            x_hat = self.decode_stacked(feats)
            sparsity = {"l1_loss": self.cfg.l1_coefficient * (feats * norms).sum(-1).mean()}
        else:
            scaled = pre * norms
            feats = self.activation(scaled)
            x_hat = self.decode_stacked(feats / norms)
            sparsity = {"auxiliary_reconstruction_loss": self._aux_loss(x, x_hat, scaled,
                                                                        norms, dead_mask)}
        per_entry = mse_loss(x_hat, x)  # [batch, S, d]
        per_seed = per_entry.sum(dim=-1).mean(dim=0)
        mse = per_seed.sum()
        loss = mse + sum(sparsity.values())
        return CrosscoderStepOutput(loss=loss, losses={"mse_loss": mse, **sparsity},
                                    feature_acts=feats, per_seed_mse=per_seed.detach())

    def _aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, scaled: torch.Tensor,
                  norms: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """sae-lens' TopK AuxK loss with the crosscoder's decoder and per-seed residuals."""
        if dead_mask is None or (num_dead := int(dead_mask.sum())) == 0:
            return x_hat.new_tensor(0.0)
        k_aux = max(1, self.cfg.d_in // 2)
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        aux_acts = calculate_topk_aux_acts(k_aux=k_aux, hidden_pre=scaled,
                                           dead_neuron_mask=dead_mask)
        recons = self.decode_stacked(aux_acts / norms) - self.b_dec  # no bias: AuxK's e-hat
        residual = (x - x_hat).detach()
        aux = (recons - residual).pow(2).sum(dim=(-1, -2)).mean()
        return AUX_LOSS_COEFFICIENT * scale * aux
