"""LightningModule that trains the Dyck-3 transformer.

Loss: the sum over the three heads of the cross-entropy averaged over non-PAD
positions (BOS and EOS included). Validation reports per-head accuracy on
each fixed evaluation set and ``val/min_acc``, the minimum over
3 heads x {train, compositional, long}: the convergence criterion.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from polymorph.models.dyck import split_logits
from polymorph.step_logging import StepLog
from polymorph.tasks.datamodule import EVAL_SPLITS
from polymorph.tasks.dyck import HEADS, DyckBatch
from polymorph.training.schedules import LRSchedule

MIN_ACC = "val/min_acc"


def bucketed_forward(
    model: HookedTransformer, batch: DyckBatch, n_buckets: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Summed cross-entropy and correct counts per head over non-PAD positions.

    About half of every batch is trailing PAD. Attention is causal and every
    other operation is per position, so trailing PAD never changes the outputs
    at real positions: sorting the batch by length and cutting each of
    ``n_buckets`` slices to its own longest sequence gives bit-for-bit the same
    loss for roughly half the compute.
    """
    lengths = batch.mask.sum(dim=1)
    order = torch.argsort(lengths)
    loss_sum = {h: torch.zeros((), device=batch.tokens.device) for h in HEADS}
    correct = {h: torch.zeros((), dtype=torch.long, device=batch.tokens.device) for h in HEADS}
    for idx in order.tensor_split(max(1, min(n_buckets, len(order)))):
        if len(idx) == 0:
            continue
        width = int(lengths[idx].max())
        logits = split_logits(model(batch.tokens[idx, :width]))
        for head in HEADS:
            target = getattr(batch, head)[idx, :width]
            out = logits[head]
            loss_sum[head] = loss_sum[head] + F.cross_entropy(
                out.reshape(-1, out.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            correct[head] = correct[head] + ((out.argmax(-1) == target) & (target != -100)).sum()
    return loss_sum, correct, int(lengths.sum())


@torch.no_grad()
def min_accuracy(model: HookedTransformer, eval_sets: dict[str, list[DyckBatch]],
                 n_buckets: int = 4) -> float:
    """``val/min_acc`` of ``model`` scored directly: the minimum over (set, head) of the share
    of non-PAD positions predicted right, as validation computes it (for checks outside the
    training loop, e.g. a saved checkpoint rescored in fp32)."""
    accs = []
    for batches in eval_sets.values():
        correct = {h: 0 for h in HEADS}
        count = 0
        for batch in batches:
            _, c, n = bucketed_forward(model, batch, n_buckets)
            correct = {h: correct[h] + int(c[h]) for h in HEADS}
            count += n
        accs += [correct[h] / max(1, count) for h in HEADS]
    return min(accs)


class DyckTransformerModule(L.LightningModule):
    """The Dyck training loop around a HookedTransformer.

    Args:
        model: the transformer (its frozen parameters are not optimised).
        optimizer: a partial optimiser called as ``optimizer(params, lr=lr)``
            (``training.module.optimizer``, e.g. ``torch.optim.AdamW`` with ``_partial_: true``).
        lr: the peak learning rate (the schedule's multipliers are fractions of it).
        lr_schedule: an :class:`~polymorph.training.schedules.LRSchedule` (cosine as published,
            WSD, constant), stepped once per optimiser step.
        length_buckets: forward each batch in this many length-sorted slices
            (:func:`bucketed_forward`).
        head_weights: per-head loss weights (default 1 each: the published summed loss).

    None of these changes the model or the evaluation: they are the recipe's levers.
    """

    def __init__(
        self,
        model: HookedTransformer,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
        lr_schedule: LRSchedule,
        length_buckets: int = 4,
        head_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.lr = float(lr)
        self.lr_schedule = lr_schedule
        self.length_buckets = length_buckets
        self.head_weights = {h: 1.0 for h in HEADS}
        unknown = sorted(set(head_weights or {}) - set(HEADS))
        if unknown:
            raise ValueError(f"head_weights keys must be among {HEADS}, got {unknown}")
        self.head_weights.update({h: float(w) for h, w in (head_weights or {}).items()})
        self._val_correct: dict[str, dict[str, int]] = {}
        self._val_count: dict[str, int] = {}
        self.last_val_metrics: dict[str, float] = {}
        self.step_log = StepLog()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: DyckBatch, batch_idx: int) -> torch.Tensor:
        loss_sum, correct, n_tokens = bucketed_forward(self.model, batch, self.length_buckets)
        loss = sum(self.head_weights[h] * loss_sum[h] for h in HEADS) / n_tokens
        metrics = {"train/loss": loss.detach(), "train/lr": self.current_lr(),
                   **{f"train/acc_{h}": correct[h].float() / n_tokens for h in HEADS},
                   "train/real_tokens": float(n_tokens)}
        self.step_log.log(self, metrics, prog_bar=("train/loss",))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.step_log.on_train_batch_end(self)

    # -- validation: accumulate counts ourselves so min_acc is exact ------------
    def on_validation_epoch_start(self) -> None:
        self._val_correct = {s: {h: 0 for h in HEADS} for s in EVAL_SPLITS}
        self._val_count = {s: 0 for s in EVAL_SPLITS}

    def validation_step(self, batch: DyckBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = EVAL_SPLITS[dataloader_idx]
        _, correct, n_tokens = bucketed_forward(self.model, batch, self.length_buckets)
        for head in HEADS:
            self._val_correct[split][head] += int(correct[head])
        self._val_count[split] += n_tokens

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for split in EVAL_SPLITS:
            for head in HEADS:
                metrics[f"val/{split}/acc_{head}"] = self._val_correct[split][head] / max(
                    1, self._val_count[split]
                )
        metrics[MIN_ACC] = min(metrics.values())
        self.last_val_metrics = metrics
        # Every rank validates the whole fixed sets with the same weights, so the values agree
        # across ranks already; sync_dist only says so to Lightning.
        self.log_dict({k: v for k, v in metrics.items() if k != MIN_ACC}, sync_dist=True)
        self.log(MIN_ACC, metrics[MIN_ACC], prog_bar=True, sync_dist=True)

    def current_lr(self) -> float:
        """The learning rate of the next optimiser step (the peak lr before training starts)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.optimizers:
            return float(trainer.optimizers[0].param_groups[0]["lr"])
        return self.lr

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params, lr=self.lr)
        # The schedule object itself (not a lambda): LambdaLR then saves its state for a resume.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
