"""Seeds side by side: the default launcher, its size on 1, 2 and 16 cores, the threads each
job gets, and the warning for more jobs than cores (config tests; no timing here)."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from polymorph import parallel
from polymorph.sweep import SweepSyntaxError, check_launcher_settings
from tests.helpers.config import compose

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def launcher_on(cores: int, monkeypatch, *overrides: str):
    monkeypatch.setattr(parallel, "usable_cores", lambda: cores)
    cfg = compose(list(overrides), return_hydra=True)
    return cfg, OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_the_default_sweep_runs_one_single_thread_job_per_core(cores, monkeypatch):
    cfg, launcher = launcher_on(cores, monkeypatch)
    assert launcher["_target_"] == JOBLIB and launcher["prefer"] == "processes"
    assert launcher["n_jobs"] == cores
    assert cfg.parallel.threads_per_job == 1
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "parallel"


@pytest.mark.parametrize(("cores", "jobs"), [(1, 1), (2, 1), (16, 4)])
def test_more_threads_per_job_means_fewer_jobs(cores, jobs, monkeypatch):
    _, launcher = launcher_on(cores, monkeypatch, "parallel.threads_per_job=4")
    assert launcher["n_jobs"] == jobs


def test_the_number_of_jobs_and_the_launcher_are_overridable(monkeypatch):
    _, launcher = launcher_on(16, monkeypatch, "parallel.jobs=3")
    assert launcher["n_jobs"] == 3
    _, basic = launcher_on(16, monkeypatch, "hydra/launcher=basic")
    assert basic["_target_"].endswith("BasicLauncher")


def test_more_jobs_than_cores_is_allowed_with_a_warning_that_says_what_it_costs(caplog):
    with caplog.at_level(logging.WARNING, logger="polymorph.parallel"):
        assert parallel.parallel_jobs(4, 1, cores=2) == 4
    message = caplog.text
    assert "4 threads on 2 usable cores" in message and "2.0x slower" in message
    assert "4 seeds in memory" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polymorph.parallel"):
        parallel.parallel_jobs(2, 1, cores=2)
    assert caplog.text == ""


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_bad_job_counts_say_what_is_wrong(bad):
    with pytest.raises(ValueError, match="positive integer"):
        parallel.parallel_jobs(bad, 1, cores=2)
    with pytest.raises(ValueError, match="threads_per_job"):
        parallel.parallel_jobs("auto", bad, cores=2)


def test_every_job_is_pinned_to_its_thread_count_alone_or_in_a_sweep():
    before = torch.get_num_threads()
    try:
        assert parallel.pin_threads(compose(["parallel.threads_per_job=2"])) == 2
        assert torch.get_num_threads() == 2
        assert parallel.pin_threads(compose([])) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_launcher_settings_are_checked_against_the_default_launcher():
    check_launcher_settings(["hydra.launcher.n_jobs=3"], default_launcher="parallel")
    with pytest.raises(SweepSyntaxError, match="not a setting of hydra/launcher=parallel"):
        check_launcher_settings(["hydra.launcher.n_job=3"], default_launcher="parallel")
    with pytest.raises(SweepSyntaxError, match="no launcher is chosen"):
        check_launcher_settings(["hydra.launcher.n_jobs=3"])


def test_side_by_side_jobs_draw_their_bars_on_rows_of_their_own(monkeypatch):
    """In a job of a parallel multirun, pin_threads gives the job the row job.num % jobs, which
    the progress bars read; a single run sets none."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from polymorph import progress

    monkeypatch.delenv(progress.ROW_ENV, raising=False)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    cfg = compose(["parallel.jobs=2"], return_hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = 3
    try:
        HydraConfig.instance().set_config(cfg)
        assert parallel.pin_threads(cfg) == 1
        assert progress._row() == 1  # job 3 of a 2-wide sweep
        basic = compose(["parallel.jobs=2", "hydra/launcher=basic"], return_hydra=True)
        with open_dict(basic):
            basic.hydra.mode = "MULTIRUN"
            basic.hydra.job.num = 3
        monkeypatch.delenv(progress.ROW_ENV)
        HydraConfig.instance().set_config(basic)
        parallel.pin_threads(basic)
        assert progress._row() is None  # one after another: one row is enough
    finally:
        HydraConfig.instance().cfg = None
        torch.set_num_threads(before)
