"""StepLog hands Lightning's loggers exactly what logging every step would, with one ``log``
call per written step instead of one per step."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from polymorph.step_logging import StepLog


class Tiny(pl.LightningModule):
    def __init__(self, every_step: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.every_step = every_step
        self.step_log = StepLog()
        self.log_calls = 0

    def log(self, *args, **kwargs):
        self.log_calls += 1
        super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch).sum() ** 2
        metrics = {"t/loss": loss.detach(), "t/step": float(self.global_step)}
        if self.every_step:
            for name, value in metrics.items():
                self.log(name, value, prog_bar=name == "t/loss", on_step=True, on_epoch=False)
        else:
            self.step_log.log(self, metrics, prog_bar=("t/loss",))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if not self.every_step:
            self.step_log.on_train_batch_end(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def fit(tmp_path, every_step: bool, max_steps: int, every_n: int, stop_at: int | None):
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2)
    module = Tiny(every_step)
    trainer = pl.Trainer(max_steps=max_steps, log_every_n_steps=every_n, accelerator="cpu",
                         logger=CSVLogger(tmp_path, name=str(every_step)),
                         callbacks=[StopAt(stop_at)] if stop_at is not None else [],
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, module.log_calls, trainer.callback_metrics


@pytest.mark.parametrize("max_steps, every_n, stop_at", [
    (23, 5, None),   # the run ends between written steps
    (23, 5, 7),      # a callback stops it between written steps
    (20, 5, 10),     # ... on a written step
    (6, 1, None),    # every step written
])
def test_the_loggers_receive_what_logging_every_step_gives(tmp_path, max_steps, every_n, stop_at):
    rows_every, calls_every, callback_every = fit(tmp_path, True, max_steps, every_n, stop_at)
    rows, calls, callback = fit(tmp_path, False, max_steps, every_n, stop_at)
    assert rows == rows_every and rows
    # the last written row holds that step's own values
    assert float(rows[-1]["t/step"]) == float(rows[-1]["step"])
    assert callback.keys() == callback_every.keys()
    assert all(float(callback[k]) == float(callback_every[k]) for k in callback)
    # two metrics a step when logging every step; through StepLog two per written step and
    # two for a last step that is not written
    assert calls_every == 2 * (stop_at or max_steps)
    assert 2 * len(rows) <= calls <= 2 * (len(rows) + 1)
    assert calls < calls_every or every_n == 1


def test_the_sae_module_writes_the_stopping_steps_own_values(tmp_path):
    """The SAE trainer through StepLog: a run a callback stops between written steps ends
    with that step's loss in the logger and in ``callback_metrics``, not the last written one's."""
    from functools import partial

    from polymorph.sae import SAETrainConfig, train_sae

    cfg = SAETrainConfig(architecture="relu_l1", expansion=2, l1_coefficient=1e-2, k=None,
                         lr=2e-3, batch_size=64, steps=120, init_seed="shared",
                         shared_init_seed=0, data_seed=0)
    trainer = partial(pl.Trainer, accelerator="cpu", devices=1, precision="32-true",
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[StopAt(57)])
    logger = CSVLogger(tmp_path, name="sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = train_sae(torch.randn(2000, 8), cfg, init_seed=0, hook_name="h",
                            model_name="m", progress_bar=False, logger=logger, trainer=trainer)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sae/loss")]
    assert [int(r["step"]) for r in rows] == [49, 56]  # every 50th step, and the stop
    for row in rows:
        assert float(row["sae/loss"]) == pytest.approx(info["loss_history"][int(row["step"])],
                                                       rel=1e-6)
