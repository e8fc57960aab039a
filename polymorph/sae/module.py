"""A LightningModule that trains one sae-lens *training* SAE with sae-lens' own loss.

There is no SAE mathematics here: encoding, decoding and every loss term come from
``TrainingSAE.training_forward_pass``. This module only does what sae-lens' ``SAETrainer``
does around that call: it supplies the coefficients (with sae-lens' own warm-up scheduler),
tracks which features have not fired recently (the dead-feature mask that TopK's auxiliary loss
needs) and lets Lightning run the Adam step.

Decoder norms. sae-lens 6 trains the standard (ReLU + L1) SAE with an *unconstrained* decoder
and an L1 penalty weighted by each decoder row's norm, ``sum_i f_i * ||W_dec[i]||``
(``StandardTrainingSAE.calculate_aux_loss``); TopK's ``rescale_acts_by_decoder_norm`` does the
same for its selection. Rescaling row i of ``W_dec`` by 1/c and ``W_enc[:, i]``, ``b_enc[i]``
by c leaves reconstruction and penalty unchanged (ReLU is positively homogeneous), so the
objective equals the docs/method.md one (unit-norm decoder, plain L1 on f) written in another
parametrisation. :func:`polymorph.sae.train.train_sae` folds the norms at the end with
sae-lens' ``fold_W_dec_norm`` so every returned SAE has unit-norm decoder rows.

The other architectures, and what ``save_inference_model`` turns each into (sae-lens 6.54):

* ``batchtopk`` (``BatchTopKTrainingSAE``, a TopK subclass with the same decoder-norm
  rescaling and auxiliary loss) keeps the top ``k * batch`` pre-activations of the whole
  minibatch, and tracks ``topk_threshold``, an exponential moving average (rate 0.01) of the
  smallest kept activation. It is saved as a **JumpReLU** SAE whose per-feature threshold is
  that scalar: at inference every row is thresholded on its own, so L0 is ~k on average,
  not exactly k, and depends on the data. The average starts at 0, so after few steps the
  threshold is low and L0 above k (measured: 7.1 for k 4 after 200 steps; 31.4 for k 32
  after 1000).
* ``matryoshka_batchtopk`` (``MatryoshkaBatchTopKTrainingSAE``) is batchtopk plus one extra
  reconstruction loss per nested prefix of the dictionary (``inner_mse_loss_<width>``); also
  saved as a **JumpReLU** SAE, with the prefix order kept in the feature order.
* ``jumprelu`` (``JumpReLUTrainingSAE``): learnable per-feature thresholds with DeepMind's
  "step" L0 penalty and a straight-through estimator of the given bandwidth (to the thresholds
  only); saved as a **JumpReLU** SAE. Its decoder is unconstrained; folding the decoder norms
  on load also rescales the thresholds (sae-lens' ``JumpReLUSAE.fold_W_dec_norm``).

All three therefore load as ``sae_lens.JumpReLUSAE`` (``cfg.architecture() == "jumprelu"``),
which ``polymorph.align.transfer.transfer_sae`` already supports.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import (
    SAEMetadata,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainStepInput,
)
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.optim import CoefficientScheduler

from polymorph.sae.config import SAETrainConfig
from polymorph.step_logging import StepLog

# A feature counts as dead for TopK's auxiliary loss once it has not fired on any row of this
# many consecutive minibatches (sae-lens' ``dead_feature_window``, whose default of 1000 steps
# is sized for LLM token streams; 50 x 4096 rows is about two passes over ~100k activations).
DEAD_FEATURE_WINDOW_STEPS = 50


def build_training_sae(
    cfg: SAETrainConfig,
    d_in: int,
    *,
    init_seed: int,
    hook_name: str,
    model_name: str,
    extra_metadata: dict[str, Any] | None = None,
) -> TrainingSAE:
    """A freshly initialised sae-lens training SAE whose weights depend only on ``init_seed``.

    sae-lens draws its initial weights from torch's global CPU generator; we seed that
    generator inside ``torch.random.fork_rng`` so the draw is reproducible and the caller's
    global RNG state is left exactly as it was. ``hook_name`` and ``model_name`` go into
    sae-lens' own metadata (saved in ``cfg.json``), as do ``extra_metadata`` entries
    (e.g. ``context_size``, ``prepend_bos``).
    """
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0:
        raise ValueError(f"init_seed must be a non-negative integer, got {init_seed!r}")
    d_sae = cfg.d_sae(d_in)
    metadata = SAEMetadata(
        model_name=model_name, hook_name=hook_name, hook_head_index=None, **(extra_metadata or {})
    )
    if cfg.k is not None and cfg.k > d_sae:
        raise ValueError(
            f"SAE config k={cfg.k} exceeds the dictionary size d_sae={d_sae} "
            f"(expansion {cfg.expansion} x d_in {d_in}); lower k or raise expansion"
        )
    common = {"d_in": d_in, "d_sae": d_sae, "metadata": metadata}
    sae_cls: type[TrainingSAE]
    if cfg.architecture == "relu_l1":
        sae_cfg: Any = StandardTrainingSAEConfig(l1_coefficient=cfg.sae_lens_coefficient(d_in),
                                                    **common)
        sae_cls = StandardTrainingSAE
    elif cfg.architecture == "topk":
        sae_cfg = TopKTrainingSAEConfig(k=cfg.k, **common)
        sae_cls = TopKTrainingSAE
    elif cfg.architecture == "batchtopk":
        sae_cfg = BatchTopKTrainingSAEConfig(k=cfg.k, **common)
        sae_cls = BatchTopKTrainingSAE
    elif cfg.architecture == "matryoshka_batchtopk":
        # The last width is d_sae by validation, so sae-lens never appends a level (and warns).
        sae_cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            k=cfg.k, matryoshka_widths=cfg.matryoshka_widths(d_in), **common
        )
        sae_cls = MatryoshkaBatchTopKTrainingSAE
    elif cfg.architecture == "jumprelu":
        sae_cfg = JumpReLUTrainingSAEConfig(
            l0_coefficient=cfg.sae_lens_coefficient(d_in),
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            **common,
        )
        sae_cls = JumpReLUTrainingSAE
    else:  # pragma: no cover - SAETrainConfig validates the architecture
        raise ValueError(f"no sae-lens training class for architecture {cfg.architecture!r}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(init_seed)
        return sae_cls(sae_cfg)


class SAETrainingModule(pl.LightningModule):
    """Optimises ``sae.training_forward_pass(...).loss`` with Adam.

    Logged per step under ``<log_prefix>/``: ``loss`` and each sae-lens loss term
    (``mse_loss`` = sum over dims of the squared error, mean over rows; ``l1_loss`` or
    ``auxiliary_reconstruction_loss``), ``l0`` (mean non-zero features per row of the batch)
    and ``dead_features`` (features silent for ``dead_feature_window`` steps). The total
    loss of every step is also kept in ``loss_history`` (CPU floats) for the caller.
    """

    def __init__(
        self,
        sae: TrainingSAE,
        *,
        lr: float,
        dead_feature_window: int = DEAD_FEATURE_WINDOW_STEPS,
        log_prefix: str = "sae",
    ) -> None:
        super().__init__()
        self.sae = sae
        self.lr = lr
        self.dead_feature_window = dead_feature_window
        self.log_prefix = log_prefix
        self.register_buffer(
            "steps_since_fired", torch.zeros(sae.cfg.d_sae, dtype=torch.long), persistent=False
        )
        self.coefficient_schedulers: dict[str, CoefficientScheduler] = {}
        for name, coeff in sae.get_coefficients().items():
            if not isinstance(coeff, TrainCoefficientConfig):
                coeff = TrainCoefficientConfig(value=coeff, warm_up_steps=0)
            self.coefficient_schedulers[name] = CoefficientScheduler(
                warm_up_steps=coeff.warm_up_steps, final_value=coeff.value
            )
        self.loss_history: list[float] = []
        self.step_log = StepLog()

    def dead_neuron_mask(self) -> torch.Tensor:
        """Features that fired on no row of the last ``dead_feature_window`` minibatches."""
        return self.steps_since_fired > self.dead_feature_window

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        dead = self.dead_neuron_mask()
        out = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=batch,
                coefficients={n: s.value for n, s in self.coefficient_schedulers.items()},
                dead_neuron_mask=dead,
                n_training_steps=self.global_step,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            active = out.feature_acts != 0
            self.steps_since_fired += 1
            self.steps_since_fired[active.any(dim=0)] = 0
            l0 = active.sum(dim=-1).float().mean()
        p = self.log_prefix
        metrics = {f"{p}/loss": out.loss.detach(),
                   **{f"{p}/{name}": value.detach() for name, value in out.losses.items()},
                   f"{p}/l0": l0, f"{p}/dead_features": dead.sum().float()}
        self.step_log.log(self, metrics, prog_bar=(f"{p}/loss", f"{p}/l0"))
        self.loss_history.append(float(out.loss.detach()))
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_log.on_train_batch_end(self)
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)
