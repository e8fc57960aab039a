"""Callbacks of the transformer run: convergence stopping and kept checkpoints."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback

from polymorph.checkpoints import save_weights
from polymorph.files import atomic_write_json, read_json
from polymorph.layout import RunLayout
from polymorph.training.transformer_module import MIN_ACC


class StopAfterConvergence(Callback):
    """Stop ``patience_steps`` steps after ``val/min_acc`` first reaches ``threshold``."""

    def __init__(self, threshold: float, patience_steps: int) -> None:
        self.threshold = threshold
        self.patience_steps = patience_steps
        self.first_reached_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = pl_module.last_val_metrics.get(MIN_ACC)
        step = trainer.global_step
        if self.first_reached_step is None and score is not None and score >= self.threshold:
            self.first_reached_step = step
        if (
            self.first_reached_step is not None
            and step - self.first_reached_step >= self.patience_steps
        ):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"first_reached_step": self.first_reached_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first_reached_step = state_dict.get("first_reached_step")


class RunCheckpoints(Callback):
    """At every validation: keep a step checkpoint (safetensors), update best/last,
    record the validation metrics in ``index.json``, and write Lightning's full
    ``last.ckpt`` so the run can resume. Every file is written atomically."""

    def __init__(self, layout: RunLayout, keep_every_n_steps: int) -> None:
        self.layout = layout
        self.keep_every = keep_every_n_steps
        self.best_score: float = float("-inf")
        self.best_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.is_global_zero:  # one writer of the run folder, whatever the strategy
            self._keep(trainer, pl_module)
        # Lightning's checkpoint save is collective (every rank must call it; rank 0 writes),
        # so all ranks save to one fixed temporary name that rank 0 then renames into place.
        tmp = self.layout.resume_state.with_name(".last.ckpt.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.layout.resume_state)

    def _keep(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        metrics = dict(pl_module.last_val_metrics)
        if trainer.optimizers:  # the learning rate the weights were taken at
            metrics["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        meta = {"step": step, "metrics": metrics}
        model = pl_module.model
        if self.keep_every > 0 and step % self.keep_every == 0:
            save_weights(model, self.layout.step_checkpoint(step), meta)
        score = metrics.get(MIN_ACC, float("-inf"))
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            save_weights(model, self.layout.best, meta)
        save_weights(model, self.layout.last, meta)
        index_path = self.layout.checkpoint_index
        index = read_json(index_path) if index_path.is_file() else {}
        index[str(step)] = metrics
        atomic_write_json(index_path, index)

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score", float("-inf"))
        self.best_step = state_dict.get("best_step")
