"""Data-parallel training on CPU: every rank draws its own batches, and the run resumes
bit-exactly (two processes, strategy=ddp, accelerator=cpu, devices=2)."""

from __future__ import annotations

import os
import signal
import time

import torch
from safetensors.torch import load_file

from polymorph.files import read_json
from polymorph.layout import RunLayout
from polymorph.tasks.datamodule import DyckDataModule
from tests.helpers.cli import run, start

DDP = ["experiment=smoke", "name=ddp", "stage=transformer", "logger=none", "trainer=ddp",
       "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "trainer.enable_progress_bar=false", "training.max_steps=30", "training.eval_every=10"]


class _FakeTrainer:
    def __init__(self, rank: int, step: int = 0) -> None:
        self.global_rank, self.global_step = rank, step


def test_every_rank_draws_its_own_batches_and_rank_0_the_single_device_one():
    single = DyckDataModule(seed=3, batch_size=8).training_batch(5).tokens
    ranks = {}
    for rank in (0, 1):
        dm = DyckDataModule(seed=3, batch_size=8)
        dm.trainer = _FakeTrainer(rank)
        ranks[rank] = dm.training_batch(5).tokens
    assert torch.equal(ranks[0], single)
    assert not torch.equal(ranks[0], ranks[1])


def test_a_two_process_ddp_run_finishes_and_resumes_bit_exactly(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run("train.py", *DDP, f"paths.root={whole}", env={"OMP_NUM_THREADS": "1"})
    reference = RunLayout.for_seed(whole, "ddp", 0)
    assert reference.is_finished() and sorted(reference.step_checkpoints()) == [10, 20, 30]

    # the same run, killed (both processes) once its first checkpoint is written, then rerun
    proc = start("train.py", *DDP, f"paths.root={broken}", env={"OMP_NUM_THREADS": "1"})
    layout = RunLayout.for_seed(broken, "ddp", 0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.exitcode is None:
        if layout.resume_state.is_file() and layout.checkpoint_index.is_file():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.join()
    assert not layout.is_finished(), "the run finished before it could be interrupted"
    run("train.py", *DDP, f"paths.root={broken}", env={"OMP_NUM_THREADS": "1"})
    assert layout.is_finished()
    assert read_json(layout.run_info)["resumed_from_step"] in (10, 20)
    a, b = load_file(str(reference.last)), load_file(str(layout.last))
    for name in a:
        assert torch.equal(a[name], b[name]), name
