"""Train one SAE on an activation matrix with Lightning and return a sae-lens inference SAE."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from sae_lens import SAE
from torch.utils.data import DataLoader, IterableDataset

from polymorph.sae.config import SAETrainConfig, config_id
from polymorph.sae.module import SAETrainingModule, build_training_sae


class ShuffledMinibatches(IterableDataset):
    """``steps`` minibatches of rows of ``activations`` in a reproducible shuffled order.

    Rows are visited in epochs: each epoch is a fresh permutation drawn from a generator seeded
    with ``seed``; a minibatch that crosses an epoch boundary takes the rest of one permutation
    and the start of the next. Every iteration restarts from ``seed``, so the sequence of
    batches is a function of (``activations``, ``batch_size``, ``steps``, ``seed``) only.
    """

    def __init__(self, activations: torch.Tensor, *, batch_size: int, steps: int, seed: int):
        super().__init__()
        self.activations = activations
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.activations.shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        perm, pos = torch.randperm(n, generator=generator), 0
        for _ in range(self.steps):
            parts, need = [], self.batch_size
            while need > 0:
                if pos == n:
                    perm, pos = torch.randperm(n, generator=generator), 0
                take = min(need, n - pos)
                parts.append(perm[pos : pos + take])
                pos, need = pos + take, need - take
            index = parts[0] if len(parts) == 1 else torch.cat(parts)
            yield self.activations[index.to(self.activations.device)]


def fit_in_memory(trainer: pl.Trainer, module: pl.LightningModule, loader: DataLoader) -> float:
    """``trainer.fit`` on a loader over in-memory tensors; the seconds it took. One tensor feeds
    a single-process loader, so Lightning's worker-count and IterableDataset-length advice does
    not apply (silenced here); the LeafSpec deprecation is raised inside Lightning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        t_fit = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        return time.perf_counter() - t_fit


def check_activations(activations: Any, d_in: int | None = None) -> None:
    """Raise ValueError unless ``activations`` is a finite float32 matrix [n >= 1, d_in]."""
    shape = tuple(getattr(activations, "shape", ()))
    if not isinstance(activations, torch.Tensor) or len(shape) != 2 or min(shape) < 1:
        raise ValueError(
            f"activations must be a non-empty torch.Tensor matrix [n_rows, d_in], got "
            f"{type(activations).__name__} of shape {shape}; flatten [batch, pos, d] to "
            "[batch * pos, d] first"
        )
    if activations.dtype != torch.float32:
        raise ValueError(
            f"activations must be float32, got {activations.dtype}; convert with .float()"
        )
    if d_in is not None and activations.shape[1] != d_in:
        raise ValueError(f"activations have width {activations.shape[1]}, the SAE expects {d_in}")
    if not bool(torch.isfinite(activations).all()):
        raise ValueError("activations contain NaN or infinite values")


def train_sae(
    activations: torch.Tensor,
    cfg: SAETrainConfig,
    *,
    init_seed: int,
    hook_name: str,
    model_name: str,
    progress_bar: bool = True,
    logger: Any = False,
    max_time: str | timedelta | dict[str, int] | None = None,
    accelerator: str = "cpu",
    default_root_dir: str | Path | None = None,
    log_prefix: str = "sae",
    extra_metadata: dict[str, Any] | None = None,
    trainer: Callable[..., pl.Trainer] | None = None,
) -> tuple[SAE, dict[str, Any]]:
    """Train one SAE on ``activations`` [n, d_in] and return ``(inference_sae, train_info)``.

    Minibatches of ``cfg.batch_size`` rows are drawn by :class:`ShuffledMinibatches` seeded
    with ``cfg.data_seed``; initial weights depend only on ``init_seed`` (see
    :func:`polymorph.sae.config.resolve_init_seed`). Training runs ``cfg.steps`` Adam steps
    (lr ``cfg.lr``) in a ``lightning.Trainer``, unless ``max_time`` stops it first
    (``train_info["stopped_early"]``). ``logger`` is passed to the Trainer (False: none);
    sae-lens' own W&B logging is never used. The Trainer's log directory is
    ``default_root_dir`` or, if None, a temporary directory deleted afterwards, never the CWD.

    The trained SAE is converted with sae-lens' own path: ``save_inference_model`` then
    ``SAE.load_from_disk(..., fold_W_dec_norm=True)``, which rescales decoder rows to unit
    norm and compensates in the encoder, leaving reconstructions unchanged up to float
    rounding (see
    :mod:`polymorph.sae.module`). The result is an inference ``sae_lens.SAE`` on CPU.

    ``trainer``: a partial ``lightning.Trainer`` (the ``sae_trainer`` config node) to train
    with; it is called with the run-specific arguments (steps, time limit, logger, progress
    bar, log folder). None: a single-device fp32 Trainer on ``accelerator``.

    ``train_info`` holds ``fit_seconds`` (``Trainer.fit`` wall time), ``total_seconds``,
    ``seconds_per_step``, ``steps``, ``samples_seen``, ``stopped_early``, ``loss_history``
    (the sae-lens total loss of every step), ``init_seed``, ``d_in``, ``d_sae``,
    ``config_id``, ``accelerator``.
    """
    t_start = time.perf_counter()
    check_activations(activations)
    d_in = int(activations.shape[1])
    sae = build_training_sae(
        cfg,
        d_in,
        init_seed=init_seed,
        hook_name=hook_name,
        model_name=model_name,
        extra_metadata=extra_metadata,
    )
    module = SAETrainingModule(sae, lr=cfg.lr, log_prefix=log_prefix)
    batches = ShuffledMinibatches(
        activations, batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.data_seed
    )
    loader = DataLoader(batches, batch_size=None, num_workers=0)

    with tempfile.TemporaryDirectory(prefix="polymorph-sae-") as scratch:
        root_dir = Path(default_root_dir) if default_root_dir is not None else Path(scratch)
        if trainer is None:
            trainer = partial(pl.Trainer, accelerator=accelerator, devices=1,
                              precision="32-true", enable_checkpointing=False,
                              enable_model_summary=False, num_sanity_val_steps=0)
        lightning_trainer = trainer(
            max_epochs=1,
            max_steps=cfg.steps,
            max_time=max_time,
            logger=logger,
            enable_progress_bar=progress_bar,
            log_every_n_steps=min(50, cfg.steps),
            default_root_dir=str(root_dir),
        )
        fit_seconds = fit_in_memory(lightning_trainer, module, loader)

        steps_done = int(lightning_trainer.global_step)
        trained = module.sae.to("cpu")
        trained.eval()
        export_dir = Path(scratch) / "inference_sae"
        trained.save_inference_model(export_dir)
        inference_sae = SAE.load_from_disk(export_dir, device="cpu", fold_W_dec_norm=True)
    inference_sae.eval()

    info: dict[str, Any] = {
        "fit_seconds": fit_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "seconds_per_step": fit_seconds / max(steps_done, 1),
        "steps": steps_done,
        "samples_seen": steps_done * cfg.batch_size,
        "stopped_early": steps_done < cfg.steps,
        "loss_history": list(module.loss_history),
        "init_seed": init_seed,
        "d_in": d_in,
        "d_sae": cfg.d_sae(d_in),
        "config_id": config_id(cfg),
        "accelerator": type(lightning_trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
    }
    return inference_sae, info
