"""Train one crosscoder on several seeds' row-aligned activation matrices with Lightning.

Mirrors :mod:`polymorph.sae.module` and :mod:`polymorph.sae.train`: a LightningModule that
optimises :meth:`~polymorph.sae.crosscoder.Crosscoder.training_forward` with Adam and logs the
same way, and :func:`train_crosscoder`, which runs it in a ``lightning.Trainer`` over
minibatches of aligned rows and returns the folded crosscoder.

Memory. The seeds' matrices are never concatenated: each minibatch draws one set of row
indices and indexes every seed's matrix with it, so beyond the matrices themselves only one
[batch, S, d] minibatch is materialised at a time.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from polymorph.sae.crosscoder import Crosscoder
from polymorph.sae.crosscoder_config import CrosscoderConfig, crosscoder_config_id
from polymorph.sae.module import DEAD_FEATURE_WINDOW_STEPS
from polymorph.sae.train import check_activations, fit_in_memory
from polymorph.step_logging import StepLog


def batch_indices(n: int, *, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index tensors of ``batch_size`` rows of ``range(n)``, epoch by epoch.

    The same order as :class:`polymorph.sae.ShuffledMinibatches` with the same seed (each epoch
    a fresh ``torch.randperm`` from one generator; a batch crossing an epoch boundary takes the
    rest of one permutation and the start of the next), so a crosscoder and the single-seed
    SAEs trained with the same ``data_seed`` see the same rows in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        parts, need = [], batch_size
        while need > 0:
            if pos == n:
                perm, pos = torch.randperm(n, generator=generator), 0
            take = min(need, n - pos)
            parts.append(perm[pos : pos + take])
            pos, need = pos + take, need - take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


class AlignedMinibatches(IterableDataset):
    """``steps`` minibatches [batch, S, d]: the same rows of every seed's matrix, stacked."""

    def __init__(self, activations: list[torch.Tensor], *, batch_size: int, steps: int,
                 seed: int) -> None:
        super().__init__()
        self.activations = list(activations)
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.activations[0].shape[0]
        for index in batch_indices(n, batch_size=self.batch_size, steps=self.steps,
                                   seed=self.seed):
            yield torch.stack([a[index.to(a.device)] for a in self.activations], dim=1)


def check_aligned_activations(activations: Any, cfg: CrosscoderConfig) -> None:
    """Raise ValueError unless ``activations`` is a list of ``cfg.n_seeds`` finite float32
    matrices [n, cfg.d_in] with the same n; the message names the seed and the shapes."""
    if not isinstance(activations, (list, tuple)):
        raise TypeError(f"activations must be a list of {cfg.n_seeds} matrices [n, d_in] (one "
                        f"per seed, rows aligned), got {type(activations).__name__}")
    if len(activations) != cfg.n_seeds:
        raise ValueError(f"the crosscoder config has n_seeds={cfg.n_seeds}, got "
                         f"{len(activations)} activation matrices")
    for i, acts in enumerate(activations):
        try:
            check_activations(acts, d_in=cfg.d_in)
        except ValueError as err:
            raise ValueError(f"seed {i} (activations[{i}]): {err}") from None
    rows = activations[0].shape[0]
    for i, acts in enumerate(activations):
        if acts.shape[0] != rows:
            raise ValueError(f"seed {i} (activations[{i}]) has shape {tuple(acts.shape)} but "
                             f"seed 0 has {tuple(activations[0].shape)}: every seed's rows must "
                             "be its activations on the same inputs, in the same order")


class CrosscoderTrainingModule(pl.LightningModule):
    """Optimises ``crosscoder.training_forward(batch).loss`` with Adam.

    Logged per step under ``<log_prefix>/``: ``loss``, ``mse_loss`` (summed over seeds and
    dims, mean over rows), ``l1_loss`` or ``auxiliary_reconstruction_loss``,
    ``mse_loss_seed<s>`` (seed s's part of the squared error), ``l0`` (mean non-zero latents
    per row) and ``dead_features`` (latents silent for ``dead_feature_window`` steps, the mask
    TopK's AuxK loss uses). The total loss of every step is kept in ``loss_history``.
    """

    def __init__(self, crosscoder: Crosscoder, *, lr: float,
                 dead_feature_window: int = DEAD_FEATURE_WINDOW_STEPS,
                 log_prefix: str = "crosscoder") -> None:
        super().__init__()
        self.crosscoder = crosscoder
        self.lr = lr
        self.dead_feature_window = dead_feature_window
        self.log_prefix = log_prefix
        self.register_buffer("steps_since_fired",
                             torch.zeros(crosscoder.cfg.d_latent, dtype=torch.long),
                             persistent=False)
        self.loss_history: list[float] = []
        self.step_log = StepLog()

    def dead_neuron_mask(self) -> torch.Tensor:
        """Latents that fired on no row of the last ``dead_feature_window`` minibatches."""
        return self.steps_since_fired > self.dead_feature_window

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        dead = self.dead_neuron_mask()
        out = self.crosscoder.training_forward(batch, dead_mask=dead)
        with torch.no_grad():
            active = out.feature_acts != 0
            self.steps_since_fired += 1
            self.steps_since_fired[active.any(dim=0)] = 0
            l0 = active.sum(dim=-1).float().mean()
        p = self.log_prefix
        metrics = {f"{p}/loss": out.loss.detach(),
                   **{f"{p}/{name}": value.detach() for name, value in out.losses.items()},
                   **{f"{p}/mse_loss_seed{s}": v for s, v in enumerate(out.per_seed_mse)},
                   f"{p}/l0": l0, f"{p}/dead_features": dead.sum().float()}
        self.step_log.log(self, metrics, prog_bar=(f"{p}/loss", f"{p}/l0"))
        self.loss_history.append(float(out.loss.detach()))
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_log.on_train_batch_end(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.crosscoder.parameters(), lr=self.lr)


def train_crosscoder(
    activations: list[torch.Tensor],
    cfg: CrosscoderConfig,
    *,
    progress_bar: bool = True,
    logger: Any = False,
    max_time: str | timedelta | dict[str, int] | None = None,
    accelerator: str = "cpu",
    default_root_dir: str | Path | None = None,
    log_prefix: str = "crosscoder",
) -> tuple[Crosscoder, dict[str, Any]]:
    """Train one crosscoder on ``activations`` (S matrices [n, d_in], rows aligned).

    As :func:`polymorph.sae.train_sae`: minibatches of ``cfg.batch_size`` aligned rows in the
    order of :func:`batch_indices` seeded with ``cfg.data_seed``; initial weights from
    ``cfg.init_seed``; ``cfg.steps`` Adam steps (lr ``cfg.lr``) in a ``lightning.Trainer``
    unless ``max_time`` stops it first; ``logger`` goes to the Trainer; the Trainer's log
    directory is ``default_root_dir`` or a temporary directory deleted afterwards. The returned
    crosscoder is on CPU, in eval mode, with its decoder norms folded
    (:meth:`~polymorph.sae.crosscoder.Crosscoder.fold_decoder_norms`).

    ``train_info`` holds ``fit_seconds``, ``total_seconds``, ``seconds_per_step``, ``steps``,
    ``samples_seen`` (rows; each row is S activation vectors), ``stopped_early``,
    ``loss_history``, ``n_seeds``, ``d_in``, ``d_latent``, ``config_id``, ``accelerator``.
    """
    t_start = time.perf_counter()
    check_aligned_activations(activations, cfg)
    crosscoder = Crosscoder(cfg)
    module = CrosscoderTrainingModule(crosscoder, lr=cfg.lr, log_prefix=log_prefix)
    batches = AlignedMinibatches(activations, batch_size=cfg.batch_size, steps=cfg.steps,
                                 seed=cfg.data_seed)
    loader = DataLoader(batches, batch_size=None, num_workers=0)

    with tempfile.TemporaryDirectory(prefix="polymorph-crosscoder-") as scratch:
        root_dir = Path(default_root_dir) if default_root_dir is not None else Path(scratch)
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision="32-true",
            max_epochs=1,
            max_steps=cfg.steps,
            max_time=max_time,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=min(50, cfg.steps),
            default_root_dir=str(root_dir),
        )
        fit_seconds = fit_in_memory(trainer, module, loader)

    steps_done = int(trainer.global_step)
    trained = module.crosscoder.to("cpu")
    trained.eval()
    trained.fold_decoder_norms()
    info: dict[str, Any] = {
        "fit_seconds": fit_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "seconds_per_step": fit_seconds / max(steps_done, 1),
        "steps": steps_done,
        "samples_seen": steps_done * cfg.batch_size,
        "stopped_early": steps_done < cfg.steps,
        "loss_history": list(module.loss_history),
        "n_seeds": cfg.n_seeds,
        "d_in": cfg.d_in,
        "d_latent": cfg.d_latent,
        "config_id": crosscoder_config_id(cfg),
        "accelerator": accelerator,
    }
    return trained, info
