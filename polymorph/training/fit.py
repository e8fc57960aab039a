"""One Lightning fit of the Dyck transformer into a run folder, resumable.

Everything a user swaps comes from the config as ``_target_`` nodes: the model builder
(``model``), the LightningModule with its partial optimiser and schedule (``training.module``),
the DataModule (``data``), the training callbacks (``training.callbacks``) and the Trainer
(``trainer``). Only :class:`~polymorph.training.callbacks.RunCheckpoints`, which writes the run
folder itself, is always added.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError
from polymorph.files import atomic_write_json, atomic_write_text
from polymorph.layout import RunLayout
from polymorph.models.dyck import count_trainable_parameters, freeze_io_parameters
from polymorph.runs import is_secondary_process
from polymorph.tracking import log_config
from polymorph.training.callbacks import RunCheckpoints, StopAfterConvergence
from polymorph.training.transformer_module import MIN_ACC
from polymorph.versions import library_versions

MIN_ACC_DEFINITION = (
    "minimum accuracy over 3 heads (tok, depth, valid) x 3 fixed evaluation sets (train "
    "distribution, compositional, long), over non-PAD positions"
)


def build_callbacks(nodes: DictConfig | None) -> dict[str, L.Callback]:
    """The configured training callbacks (``training.callbacks``: name -> ``_target_`` node;
    a null entry is switched off)."""
    out = {}
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        cb = instantiate(node)
        if not isinstance(cb, L.Callback):
            raise PolymorphError(f"training.callbacks.{name} is not a Lightning Callback "
                                 f"({type(cb).__name__}); give it a _target_ of one")
        out[str(name)] = cb
    return out


def fit_transformer(cfg: DictConfig, layout: RunLayout, logger, model,
                    anchor_io: dict[str, torch.Tensor] | None = None) -> dict:
    """Train ``model`` (freshly built from ``cfg.model`` under ``cfg.seed``) into ``layout``,
    resuming from its ``last.ckpt`` if there is one; returns the final metrics and marks the
    run finished. ``anchor_io``: the anchor's embedding and unembedding, copied in and frozen
    (the io=shared cohort)."""
    if anchor_io is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in anchor_io.items():
                params[name].copy_(value)
        freeze_io_parameters(model)
    n_trainable = count_trainable_parameters(model)
    t = cfg.training
    module = instantiate(t.module, model=model, _convert_="all")
    datamodule = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    callbacks = build_callbacks(t.get("callbacks"))
    checkpoints = RunCheckpoints(layout, int(t.eval_every))
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks.values(), checkpoints],
                          logger=logger, default_root_dir=str(layout.logs))
    resume = layout.resume_state if layout.resume_state.is_file() else None
    main = not is_secondary_process()  # a DDP worker trains but writes no record
    if resume is None and main:
        atomic_write_text(layout.config, OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "seed": int(cfg.seed),
        "experiment": str(cfg.name),
        "family": "dyck",
        "io": OmegaConf.to_container(cfg.io, resolve=True),
        "trainable_parameters": n_trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "versions": library_versions(),
        "status": "training",
        "resumed_from_step": None if resume is None else _check_resume_state(resume),
    }
    if main:
        atomic_write_json(layout.run_info, info)
    log_config(logger, cfg, {"trainable_parameters": n_trainable})
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise PolymorphError(f"training of {layout.root} was interrupted; rerun to resume")
    if not main:
        return {}
    if not layout.best.is_file():
        raise PolymorphError(
            f"{layout.root}: training ended before the first validation (max_steps="
            f"{t.max_steps} < eval_every={t.eval_every}); raise training.max_steps"
        )
    convergence = next((c for c in callbacks.values() if isinstance(c, StopAfterConvergence)),
                       None)
    first = None if convergence is None else convergence.first_reached_step
    final = {
        "seed": int(cfg.seed),
        "steps": int(trainer.global_step),
        "best_step": checkpoints.best_step,
        "best/" + MIN_ACC: checkpoints.best_score,
        "last_val": module.last_val_metrics,
        "converged_step": first,
        "converged": first is not None,
        "converge_threshold": None if convergence is None else float(convergence.threshold),
        "train_seconds_this_session": round(seconds, 2),
        "trainable_parameters": n_trainable,
        "definitions": {
            MIN_ACC: MIN_ACC_DEFINITION,
            "best_step": "step of the best checkpoint by val/min_acc (the analysed checkpoint)",
            "converged_step": "first validation step at which val/min_acc reached "
            "converge_threshold (null: never)",
        },
    }
    info["status"] = "finished"
    atomic_write_json(layout.run_info, info)
    atomic_write_json(layout.final_metrics, final)  # written last: marks the run finished
    return final


def _check_resume_state(path: Path) -> int:
    """The step a resume file holds; a clear error if it is unreadable (loaded without pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["global_step"])
    except Exception as err:
        raise PolymorphError(
            f"cannot resume from {path}: it is corrupt or not a polymorph checkpoint "
            f"({type(err).__name__}); delete it, or pass retrain=true to start this seed again"
        ) from err
