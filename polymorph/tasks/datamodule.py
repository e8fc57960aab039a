"""Lightning DataModule for Dyck-3: a fresh batch every step, fixed evaluation sets.

Training batches are a pure function of (seed, step, rank): batch ``s`` is drawn from
a generator seeded with ``(seed, s, rank)``. A run resumed from a checkpoint at step
``s`` therefore sees exactly the batches an uninterrupted run would have seen,
and no data-loader state needs saving; under DDP every rank draws its own batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from polymorph.tasks.dyck import DyckBatch, generate_training_tokens, label_tokens, make_batch

EVAL_SPLITS = ("train", "compositional", "long")
# Seeds of the fixed evaluation sets: far from any training-stream seed and
# from the analysis batches (polymorph.activations).
EVAL_SEED_OFFSET = 1_000_000


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of training batch ``step`` of model ``seed`` on data-parallel ``rank``.

    Seed and step are mixed so that neighbouring seeds never share a batch; under DDP every rank
    draws its own batch (rank 0 draws exactly the single-device batch, so a one-device run is
    the same run whatever the strategy)."""
    mixed = seed * 1_000_003 + step + rank * 7_919_000_009_209
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


class _TrainingStream(IterableDataset):
    def __init__(self, datamodule: DyckDataModule) -> None:
        self.dm = datamodule

    def __iter__(self) -> Iterator[DyckBatch]:
        step = self.dm.current_step()
        while True:
            yield self.dm.training_batch(step)
            step += 1


class _FixedBatches(IterableDataset):
    def __init__(self, batches: list[DyckBatch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[DyckBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DyckDataModule(L.LightningDataModule):
    def __init__(
        self,
        seed: int,
        batch_size: int = 128,
        min_len: int = 2,
        max_len: int = 62,
        p_valid: float = 0.5,
        eval_size: int = 1024,
        eval_batch_size: int = 1024,
        eval_seed: int = 0,
        batch_schedule: list | None = None,
        max_len_schedule: list | None = None,
    ) -> None:
        """``batch_schedule`` / ``max_len_schedule``: optional ``[[from_step, value], ...]``
        (ascending steps) giving the training batch size / the longest content length from
        each step on; ``batch_size`` / ``max_len`` apply before the first entry and wherever
        no schedule is given. The evaluation sets never depend on them."""
        super().__init__()
        if batch_size < 1 or eval_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size, data.eval_size and data.eval_batch_size must be >= 1")
        self.seed = seed
        self.batch_size = batch_size
        self.min_len, self.max_len, self.p_valid = min_len, max_len, p_valid
        self.eval_size, self.eval_batch_size, self.eval_seed = eval_size, eval_batch_size, eval_seed
        self._eval: dict[str, list[DyckBatch]] | None = None
        self.batch_schedule = _check_schedule("data.batch_schedule", batch_schedule, 1, None)
        self.max_len_schedule = _check_schedule("data.max_len_schedule", max_len_schedule,
                                                min_len, max_len)

    # -- training stream -------------------------------------------------
    def current_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def current_rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def batch_size_at(self, step: int) -> int:
        return _value_at(self.batch_schedule, step, self.batch_size)

    def max_len_at(self, step: int) -> int:
        return _value_at(self.max_len_schedule, step, self.max_len)

    def training_batch(self, step: int) -> DyckBatch:
        tokens = generate_training_tokens(
            self.batch_size_at(step),
            step_generator(self.seed, step, self.current_rank()),
            min_len=self.min_len,
            max_len=self.max_len_at(step),
            p_valid=self.p_valid,
        )
        return label_tokens(tokens)

    def train_dataloader(self) -> DataLoader:
        # Batches are already whole: batch_size=None passes them through.
        return DataLoader(_TrainingStream(self), batch_size=None, num_workers=0)

    # -- fixed evaluation sets ---------------------------------------------
    def eval_sets(self) -> dict[str, list[DyckBatch]]:
        """The same sequences for every model seed (they depend on eval_seed only)."""
        if self._eval is None:
            self._eval = {}
            for i, split in enumerate(EVAL_SPLITS):
                full = make_batch(split, self.eval_size, EVAL_SEED_OFFSET + 10 * self.eval_seed + i)
                self._eval[split] = _chunk(full, self.eval_batch_size)
        return self._eval

    def val_dataloader(self) -> list[DataLoader]:
        sets = self.eval_sets()
        return [DataLoader(_FixedBatches(sets[s]), batch_size=None) for s in EVAL_SPLITS]


def _check_schedule(name: str, schedule, low: int, high: int | None) -> list[tuple[int, int]]:
    out = [(int(step), int(value)) for step, value in (schedule or [])]
    steps = [step for step, _ in out]
    if steps != sorted(steps) or any(step < 0 for step in steps):
        raise ValueError(f"{name} must list [from_step, value] pairs with ascending steps >= 0")
    for _, value in out:
        if value < low or (high is not None and value > high):
            raise ValueError(f"{name}: value {value} outside [{low}, {high}]")
    return out


def _value_at(schedule: list[tuple[int, int]], step: int, default: int) -> int:
    value = default
    for from_step, v in schedule:
        if step < from_step:
            break
        value = v
    return value


def slice_batch(batch: DyckBatch, start: int, stop: int) -> DyckBatch:
    """Rows [start, stop) of every tensor field of a batch."""
    values = {
        f.name: getattr(batch, f.name)[start:stop]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **values)


def _chunk(batch: DyckBatch, size: int) -> list[DyckBatch]:
    n = batch.tokens.shape[0]
    return [slice_batch(batch, i, min(i + size, n)) for i in range(0, n, size)]
