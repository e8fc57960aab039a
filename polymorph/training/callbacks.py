"""Callbacks of the transformer run: convergence stopping, a triggered LR decay, divergence,
weight averaging, and kept checkpoints."""

from __future__ import annotations

import math
import os

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging

from polymorph.checkpoints import save_weights
from polymorph.errors import PolymorphError
from polymorph.files import atomic_write_json, read_json
from polymorph.layout import RunLayout
from polymorph.training.transformer_module import MIN_ACC


def lr_fraction(pl_module: L.LightningModule) -> float:
    """The learning rate of the next optimiser step as a fraction of the peak (1.0 if unknown)."""
    current = getattr(pl_module, "current_lr", None)
    peak = getattr(pl_module, "lr", None)
    if current is None or not peak:
        return 1.0
    return float(current()) / float(peak)


def is_annealed(fraction: float, final_fraction: float) -> bool:
    return fraction <= final_fraction * (1.0 + 1e-6)


class StopAfterConvergence(Callback):
    """Stop ``patience_steps`` steps after ``val/min_acc`` first reaches ``threshold``.

    With ``require_annealed`` the run also waits until the learning rate has decayed to the
    schedule's final fraction: the checkpoints at its end then come from the annealed phase,
    so progress is never confounded with a high learning rate.
    """

    def __init__(self, threshold: float, patience_steps: int, require_annealed: bool = False
                 ) -> None:
        self.threshold = threshold
        self.patience_steps = patience_steps
        self.require_annealed = require_annealed
        self.first_reached_step: int | None = None

    def should_stop(self, step: int, score: float | None, annealed: bool) -> bool:
        """Record ``score`` at ``step`` and say whether the run should stop (pure logic)."""
        if self.first_reached_step is None and score is not None and score >= self.threshold:
            self.first_reached_step = step
        return (
            self.first_reached_step is not None
            and step - self.first_reached_step >= self.patience_steps
            and (annealed or not self.require_annealed)
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        schedule = getattr(pl_module, "lr_schedule", None)
        final = schedule.final_fraction if schedule is not None else 0.0
        annealed = is_annealed(lr_fraction(pl_module), final)
        if self.should_stop(trainer.global_step, pl_module.last_val_metrics.get(MIN_ACC), annealed):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"first_reached_step": self.first_reached_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first_reached_step = state_dict.get("first_reached_step")


class DecayAtThreshold(Callback):
    """Begin the triggered decay of a WSD schedule when ``val/min_acc`` first reaches
    ``threshold`` (does nothing for other schedules or once the decay has begun)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.triggered_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.triggered_step is not None:
            return
        score = pl_module.last_val_metrics.get(MIN_ACC)
        schedule = getattr(pl_module, "lr_schedule", None)
        triggered = score is not None and score >= self.threshold and schedule is not None
        if triggered and schedule.start_decay(trainer.global_step):
            self.triggered_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"triggered_step": self.triggered_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.triggered_step = state_dict.get("triggered_step")


class TrainingDiverged(PolymorphError):
    """The run stopped on a non-finite loss or an accuracy collapse."""


class StopOnDivergence(Callback):
    """Stop at the first non-finite training loss, or when ``val/min_acc`` collapses (falls
    more than ``collapse_drop`` below the best so far, once the best exceeds ``collapse_drop``,
    at ``collapse_evals`` validations in a row), with one line naming the step and the recipe.

    A collapse must last: at a high learning rate a healthy run's ``val/min_acc`` can dip by
    0.4-0.5 for one validation and recover at the next (seen in the default preset's seeds).

    It raises before any later validation, so the kept checkpoints (and the resume state) are
    those of the last good validation; ``retrain=true`` with a changed recipe starts over.
    """

    def __init__(self, recipe: str | None = None, collapse_drop: float | None = 0.5,
                 collapse_evals: int = 3) -> None:
        if int(collapse_evals) < 1:
            raise ValueError(f"training.collapse_evals={collapse_evals} must be >= 1")
        self.recipe = recipe
        self.collapse_drop = collapse_drop
        self.collapse_evals = int(collapse_evals)
        self.best: float = float("-inf")
        self.last_good_step: int | None = None
        self.collapsed_evals = 0
        #: what names the recipe without a Hydra job (set by the fit: the run's folder)
        self.fallback_recipe = "the config's"

    def _recipe(self) -> str:
        """The job's overrides (the recipe a user would change), or the given description."""
        if self.recipe is not None:
            return self.recipe
        try:
            from hydra.core.hydra_config import HydraConfig

            return " ".join(HydraConfig.get().overrides.task) or "the preset's own"
        except (ImportError, ValueError):
            return self.fallback_recipe

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        kept = (f"the last good checkpoint (step {self.last_good_step}) is kept"
                if self.last_good_step is not None else "no checkpoint was kept yet")
        raise TrainingDiverged(
            f"training diverged at step {trainer.global_step}: {what} (recipe: {self._recipe()}); "
            f"{kept}; change the recipe and rerun with retrain=true"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            self._fail(trainer, f"non-finite training loss {float(loss)}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = pl_module.last_val_metrics.get(MIN_ACC)
        if score is None:
            return
        drop = self.collapse_drop
        if drop is not None and self.best > drop and score < self.best - drop:
            self.collapsed_evals += 1
            if self.collapsed_evals >= self.collapse_evals:
                self._fail(trainer, f"val/min_acc collapsed to {score:.4f} from {self.best:.4f} "
                                    f"for {self.collapsed_evals} validations in a row")
            return
        self.collapsed_evals = 0
        self.best = max(self.best, score)
        self.last_good_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"best": self.best, "last_good_step": self.last_good_step,
                "collapsed_evals": self.collapsed_evals}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best", float("-inf"))
        self.last_good_step = state_dict.get("last_good_step")
        self.collapsed_evals = int(state_dict.get("collapsed_evals", 0))


class WeightEMA(EMAWeightAveraging):
    """An exponential moving average of the weights (Lightning's ``EMAWeightAveraging``) from
    ``start_step`` on: validation, the kept checkpoints and the finished model are the average.

    ``decay``: the weight of the old average at each step (0.998: a horizon of ~500 steps).
    Until the first update the live weights are validated and kept (Lightning's callback would
    use its copy of the initial weights)."""

    def __init__(self, decay: float = 0.998, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise PolymorphError(f"training.callbacks.ema.decay={decay}: the EMA decay must lie "
                                 "strictly between 0 and 1 (e.g. 0.998)")
        super().__init__(decay=decay, update_starting_at_step=start_step)

    def has_average(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def averaged(self, pl_module: L.LightningModule):
        """The averaged copy of ``pl_module.model`` (the live one before the first update)."""
        return self._average_model.module.model if self.has_average() else pl_module.model

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.has_average():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.has_average():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.has_average():
            super().on_train_end(trainer, pl_module)


def kept_model(trainer: L.Trainer, pl_module: L.LightningModule):
    """The model whose validation metrics were just logged: the EMA's, when one is in use."""
    ema = next((c for c in trainer.callbacks if isinstance(c, WeightEMA)), None)
    return pl_module.model if ema is None else ema.averaged(pl_module)


class RunCheckpoints(Callback):
    """At every validation: keep a step checkpoint (safetensors), update best/last,
    record the validation metrics and the learning rate (``lr``: that of the next step;
    ``lr_fraction``: of the peak) in ``index.json``, and write Lightning's full ``last.ckpt``
    so the run can resume. Every file is written atomically.

    ``best_annealed_only``: once a checkpoint with an annealed learning rate (at the
    schedule's final fraction) exists, only annealed checkpoints can be ``best``, so the
    analysed checkpoint never comes from the high-LR phase (before that, the best of all is
    kept, so a run cut short still has one)."""

    def __init__(self, layout: RunLayout, keep_every_n_steps: int,
                 best_annealed_only: bool = False) -> None:
        self.layout = layout
        self.keep_every = keep_every_n_steps
        self.best_annealed_only = best_annealed_only
        self.best_score: float = float("-inf")
        self.best_step: int | None = None
        self.best_annealed: bool = False

    def is_better(self, score: float, annealed: bool) -> bool:
        if self.best_annealed_only and annealed != self.best_annealed:
            return annealed
        return score > self.best_score

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
        fraction = lr_fraction(pl_module)
        metrics["lr"] = fraction * float(getattr(pl_module, "lr", 1.0))
        metrics["lr_fraction"] = fraction
        schedule = getattr(pl_module, "lr_schedule", None)
        annealed = schedule is not None and is_annealed(fraction, schedule.final_fraction)
        meta = {"step": step, "metrics": metrics}
        model = kept_model(trainer, pl_module)
        if self.keep_every > 0 and step % self.keep_every == 0:
            save_weights(model, self.layout.step_checkpoint(step), meta)
        score = metrics.get(MIN_ACC, float("-inf"))
        if self.is_better(score, annealed):
            self.best_score, self.best_step, self.best_annealed = score, step, annealed
            save_weights(model, self.layout.best, meta)
        save_weights(model, self.layout.last, meta)
        index_path = self.layout.checkpoint_index
        index = read_json(index_path) if index_path.is_file() else {}
        index[str(step)] = metrics
        atomic_write_json(index_path, index)

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step,
                "best_annealed": self.best_annealed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score", float("-inf"))
        self.best_step = state_dict.get("best_step")
        self.best_annealed = state_dict.get("best_annealed", False)
