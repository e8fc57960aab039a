"""Training-step metrics handed to Lightning only on the steps its loggers write.

Lightning writes a training step's ``on_step`` values to its loggers every ``log_every_n_steps``
steps and at a stop; what is logged on the other steps is overwritten unread. Yet each
``LightningModule.log`` call does Python work on every step (Lightning moves its whole record
of the metric to the value's device on every call), which is a noticeable part of a small
SAE's step (docs/benchmarks.md). So the training modules log through :class:`StepLog`: on a step
Lightning writes, at once; on any other step it holds the values, and logs them from
``on_train_batch_end`` if a callback stopped the run in that step (Lightning then writes that
step too, and would otherwise write the last written step's values under this step's number) or
the step is the run's last. What the loggers receive is what logging every step gives them, and
so is what the run ends with in ``trainer.callback_metrics``; between written steps the
progress bar and ``callback_metrics`` show the last written step's values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import lightning.pytorch as pl


def lightning_writes_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning hands this training step's logged values to its loggers.

    Lightning's own rule (``_LoggerConnector.should_update_logs``, read as it stands: every
    ``log_every_n_steps``-th step and a step in which the run was told to stop); tested against
    logging every step in tests/test_step_logging.py, so a Lightning that changes it fails there.
    """
    return bool(trainer.fast_dev_run) or bool(trainer._logger_connector.should_update_logs)


class StepLog:
    """One training module's per-step metrics (see the module docstring)."""

    def __init__(self) -> None:
        self._held: tuple[Mapping[str, Any], Collection[str]] | None = None

    def log(self, module: pl.LightningModule, metrics: Mapping[str, Any],
            prog_bar: Collection[str] = ()) -> None:
        """From ``training_step``: ``metrics`` ({name: scalar}) as ``module.log(name, value,
        on_step=True, on_epoch=False)``, names in ``prog_bar`` also on the progress bar."""
        if lightning_writes_this_step(module.trainer):
            self._held = None
            _send(module, metrics, prog_bar)
        else:
            self._held = (metrics, prog_bar)

    def on_train_batch_end(self, module: pl.LightningModule) -> None:
        """From the module's ``on_train_batch_end`` (after the callbacks' hooks have run)."""
        held, self._held = self._held, None
        trainer = module.trainer
        last = 0 < trainer.max_steps <= trainer.global_step
        if held is not None and (trainer.should_stop or last):
            _send(module, *held)


def _send(module: pl.LightningModule, metrics: Mapping[str, Any], prog_bar: Collection[str]):
    for name, value in metrics.items():
        module.log(name, value, prog_bar=name in prog_bar, on_step=True, on_epoch=False)
