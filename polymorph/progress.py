"""Progress in the terminal: one bar per seed's training, one per SAE stage.

Both are plain Lightning callbacks that replace the Trainer's own progress bar (Lightning
draws a new bar per validation and per SAE; here the seed's bar shows step, loss,
``val/min_acc`` and the time left, and the SAE stage's bar counts every SAE step of the job).
They draw only where the Trainer would have drawn one (``trainer.enable_progress_bar``), so
``trainer.enable_progress_bar=false`` keeps a run silent.
"""

from __future__ import annotations

import os

import lightning as L
from tqdm.auto import tqdm

LOSS = "train/loss"
MIN_ACC = "val/min_acc"
#: the terminal row of this process's bars when a sweep runs jobs side by side (set by
#: polymorph.parallel.pin_threads), so parallel seeds draw on rows of their own
ROW_ENV = "POLYMORPH_PROGRESS_ROW"


def _row() -> int | None:
    value = os.environ.get(ROW_ENV)
    return int(value) if value and value.isdigit() else None


def _take_over(trainer: L.Trainer) -> bool:
    """Switch off Lightning's own bar; whether there was one (i.e. bars are wanted)."""
    bar = trainer.progress_bar_callback
    if bar is None:
        return False
    bar.disable()
    return True


def _metric(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


class SeedProgress(L.Callback):
    """One bar for a seed's training run: step / max_steps, loss, best ``val/min_acc``, ETA."""

    def __init__(self, description: str | None = None) -> None:
        # None: "seed <N>", the seed Lightning was seeded with (seed_everything records it)
        self.description = description
        self.bar = None
        self.best: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.active = _take_over(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            seed = os.environ.get("PL_GLOBAL_SEED")
            desc = self.description or (f"seed {seed}" if seed is not None else "training")
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc=desc,
                            unit="step", dynamic_ncols=True, leave=False, position=_row())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._postfix(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = _metric(trainer, MIN_ACC)
        if score is not None and not trainer.sanity_checking:
            self.best = score if self.best is None else max(self.best, score)
        if self.bar is not None:
            self._postfix(trainer)

    def _postfix(self, trainer: L.Trainer) -> None:
        post = {}
        loss = _metric(trainer, LOSS)
        if loss is not None:
            post["loss"] = f"{loss:.3f}"
        score = _metric(trainer, MIN_ACC)
        if score is not None:
            post["min_acc"] = f"{score:.4f}"
        if self.best is not None:
            post["best"] = f"{self.best:.4f}"
        self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")


class SAEStageProgress(L.Callback):
    """One bar for every SAE of a job: one instance shared by every SAE's Trainer (the
    ``sae_trainer`` partial builds it once). :meth:`begin` gives it the stage's total steps."""

    def __init__(self, description: str = "SAEs") -> None:
        self.description = description
        self.bar = None
        self.total: int | None = None
        self.n_saes: int | None = None
        self.done = 0

    def begin(self, total_steps: int, n_saes: int) -> None:
        self.close()
        self.total, self.n_saes, self.done = int(total_steps), int(n_saes), 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.active = _take_over(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.description, unit="step",
                            dynamic_ncols=True, leave=False, position=_row())
        if self.bar is not None:
            self.done += 1
            of = f"/{self.n_saes}" if self.n_saes else ""
            self.bar.set_description(f"{self.description} {self.done}{of}", refresh=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
