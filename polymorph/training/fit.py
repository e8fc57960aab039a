"""One Lightning fit of the Dyck transformer into a run folder, resumable.

Everything a user swaps comes from the config as ``_target_`` nodes: the model builder
(``model``), the LightningModule with its partial optimiser and schedule (``training.module``),
the DataModule (``data``), the training callbacks (``training.callbacks``) and the Trainer
(``trainer``). Only :class:`~polymorph.training.callbacks.RunCheckpoints`, which writes the run
folder itself, is always added.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
from polymorph.training.callbacks import RunCheckpoints, StopAfterConvergence, StopOnDivergence
from polymorph.training.precision import PrecisionChoice, choose_precision
from polymorph.training.transformer_module import MIN_ACC
from polymorph.versions import library_versions

MIN_ACC_DEFINITION = (
    "minimum accuracy over 3 heads (tok, depth, valid) x 3 fixed evaluation sets (train "
    "distribution, compositional, long), over non-PAD positions"
)


#: the knobs a diverged run's message names when it has no Hydra overrides to quote
RECIPE_KNOBS = ("training.lr", "training.warmup_steps", "training.schedule_steps",
                "data.batch_size", "trainer.precision")


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


@dataclass
class TrainingSetup:
    """What one fit is made of, built from the config: the run's objects before ``fit``."""

    module: L.LightningModule
    datamodule: L.LightningDataModule
    callbacks: dict[str, L.Callback]
    checkpoints: RunCheckpoints
    precision: PrecisionChoice

    @property
    def convergence(self) -> StopAfterConvergence | None:
        return next((c for c in self.callbacks.values() if isinstance(c, StopAfterConvergence)),
                    None)

    def record(self) -> dict:
        """The recipe as run (the precision chosen and the schedule), for run.json."""
        return {"precision": self.precision.to_dict(),
                "lr_schedule": self.module.lr_schedule.to_dict()}


def build_training(cfg: DictConfig, model, layout: RunLayout) -> TrainingSetup:
    """The LightningModule, DataModule, callbacks and precision of one fit of ``model``."""
    t = cfg.training
    if bool(t.get("stop_annealed", False)) and str(t.module.lr_schedule.kind) == "cosine" \
            and int(t.module.lr_schedule.total_steps) > int(t.max_steps):
        raise PolymorphError(
            f"training.stop_annealed=true but the cosine reaches its floor at step "
            f"{t.module.lr_schedule.total_steps}, after training.max_steps={t.max_steps}: the run "
            "could never stop annealed; lower training.schedule_steps or raise training.max_steps")
    callbacks = build_callbacks(t.get("callbacks"))
    for callback in callbacks.values():
        if isinstance(callback, StopOnDivergence):  # outside a Hydra job: the main knobs
            callback.fallback_recipe = " ".join(
                f"{key}={OmegaConf.select(cfg, key)}" for key in RECIPE_KNOBS)
    return TrainingSetup(
        module=instantiate(t.module, model=model, _convert_="all"),
        datamodule=instantiate(cfg.data, seed=int(cfg.seed), _convert_="all"),
        callbacks=callbacks,
        checkpoints=RunCheckpoints(layout, int(t.eval_every),
                                   best_annealed_only=bool(t.get("stop_annealed", False))),
        precision=choose_precision(cfg.trainer.get("precision", "32-true"),
                                   cfg.trainer.get("accelerator", "cpu")),
    )


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
    setup = build_training(cfg, model, layout)
    module, checkpoints, precision = setup.module, setup.checkpoints, setup.precision
    trainer = instantiate(cfg.trainer, callbacks=[*setup.callbacks.values(), checkpoints],
                          logger=logger, default_root_dir=str(layout.logs),
                          precision=precision.precision)
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
        **setup.record(),
        "determinism": determinism_info(precision.precision),
    }
    if main:
        atomic_write_json(layout.run_info, info)
    log_config(logger, cfg, {"trainable_parameters": n_trainable})
    start = time.perf_counter()
    trainer.fit(module, datamodule=setup.datamodule, ckpt_path=resume, weights_only=True)
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
    convergence = setup.convergence
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


def determinism_info(precision: str) -> dict:
    """What bit-identical reruns of one seed and config depend on: all of these equal.

    On a CPU the one non-deterministic kernel found was the embedding lookup's backward (an
    accumulating ``index_put_`` whose parallel sum order varies with more than one thread);
    ``trainer.deterministic: true`` (``torch.use_deterministic_algorithms``) makes it
    deterministic. Matmul and reduction results still depend on the thread count, the CPU's
    instruction set, the precision and the torch / oneDNN / MKL builds.
    """
    import platform

    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch_threads": torch.get_num_threads(),
        "precision": precision,
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "onednn": torch.backends.mkldnn.is_available(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


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
