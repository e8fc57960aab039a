"""The entry points as a user runs them: sweeps, presets, launchers and bad input (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from polymorph.layout import find_seed_runs
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
FAST = ["logger=none", "stage=transformer", "trainer.enable_progress_bar=false"]


def run(script: str, *args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_inclusive_seed_range_launches_one_job_per_seed(tmp_path):
    run("train.py", "-m", "seed=0..2", "experiment=smoke", f"paths.root={tmp_path}", *FAST)
    runs = find_seed_runs(tmp_path, "smoke")
    assert sorted(runs) == [0, 1, 2]
    for layout in runs.values():
        assert layout.is_finished() and layout.step_checkpoints()


@pytest.mark.parametrize(
    "arg, message", [("seed=5..2", "reversed"), ("seed=a..b", "two integers")]
)
def test_bad_seed_ranges_fail_with_one_clear_line(tmp_path, arg, message):
    proc = run("train.py", "-m", arg, f"paths.root={tmp_path}", check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize("group, value", [("experiment", "nope"), ("io", "half"), ("logger", "tb")])
def test_unknown_config_choices_name_the_options(tmp_path, group, value):
    proc = run("train.py", f"{group}={value}", f"paths.root={tmp_path}", check=False)
    assert proc.returncode != 0
    assert f"Could not find '{group}/{value}'" in proc.stderr
    assert "Available options" in proc.stderr


def test_every_preset_runs_a_couple_of_steps(tmp_path):
    # Each preset end to end (transformer and SAE stage) with its size cut down.
    run(
        "train.py", "-m", "experiment=smoke,default,paper", f"paths.root={tmp_path}",
        "logger=none", "trainer.enable_progress_bar=false",
        "training.max_steps=2", "training.eval_every=2", "data.batch_size=8",
        "data.eval_size=16", "activations.n_sequences=64", "sae.steps=2", "sae.batch_size=64",
        "sites=[blocks.0.hook_resid_post]",
    )
    for preset in ("smoke", "default", "paper"):
        runs = find_seed_runs(tmp_path, preset)
        assert list(runs) == [0] and runs[0].is_finished(), preset
        assert list(runs[0].saes.glob("*/*/cfg.json")), preset


def test_parallel_launcher_runs_a_two_seed_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    run(
        "train.py", "-m", "seed=0,1", "experiment=smoke", f"paths.root={tmp_path}", *FAST,
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
    )
    runs = find_seed_runs(tmp_path, "smoke")
    assert sorted(runs) == [0, 1] and all(r.is_finished() for r in runs.values())


def test_gpu_and_cluster_configs_compose():
    """The GPU / multi-GPU / SLURM paths can't run here; check they compose to what they claim."""
    from tests.conftest import compose

    gpu = compose(["trainer=gpu"])
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "bf16-mixed"
    ddp = compose(["trainer=ddp"])
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == -1
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = compose(["hydra/launcher=submitit_slurm"], return_hydra=True)
    assert "SlurmLauncher" in slurm.hydra.launcher._target_
