"""The entry points as a user runs them: sweeps, presets, launchers and bad input (subprocesses)."""

from __future__ import annotations

import json

import pytest

from polymorph.layout import find_seed_runs
from tests.helpers.cli import run
from tests.helpers.config import compose, tiny_lm_overrides

FAST = ["logger=none", "stage=transformer", "trainer.enable_progress_bar=false"]
# a sweep's jobs in turn in its own process, where what is tested is not the launcher (the
# default side-by-side launcher has its own test below)
IN_TURN = "hydra/launcher=basic"


def with_model_id(args: list[str], model_id: str) -> list[str]:
    """``args`` with ``family.model_id`` set to ``model_id`` as a user would type it."""
    return [f"family.model_id={model_id}" if a.startswith("family.model_id=") else a
            for a in args]


def test_inclusive_seed_range_launches_one_job_per_seed(tmp_path):
    run("train.py", "-m", "seed=0..2", "experiment=smoke", f"paths.root={tmp_path}", *FAST,
        IN_TURN)
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


@pytest.mark.parametrize("group, value, options", [
    ("experiment", "nope", "default, paper, polypythia, smoke"), ("io", "half", "independent"),
    ("logger", "tb", "csv, none, wandb"), ("family", "nope", "dyck, pretrained"),
    ("experiment", "smoke,nope", "smoke")])
def test_unknown_config_choices_fail_with_one_line_naming_the_options(tmp_path, group, value,
                                                                      options):
    proc = run("train.py", "-m" if "," in value else "--cfg=job", f"{group}={value}",
               f"paths.root={tmp_path}", check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {group}=nope" if "," in value else f"error: {group}={value}")
    assert options in line and f"conf/{group}/" in line
    assert not any(tmp_path.iterdir())


def test_a_launcher_without_its_plugin_says_how_to_install_it(monkeypatch):
    import importlib.util

    from polymorph.sweep import SweepSyntaxError, check_choices

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "submitit" in name else real(name, *a))
    with pytest.raises(SweepSyntaxError, match=r"pip install -e '\.\[launchers\]'"):
        check_choices(["hydra/launcher=submitit_local"])


def test_every_preset_runs_a_couple_of_steps(tmp_path):
    # Each preset end to end (transformer and SAE stage) with its size cut down: the cuts are
    # an ablation of each preset, so its runs land in that ablation's folder.
    run(
        "train.py", "-m", "experiment=smoke,default,paper", f"paths.root={tmp_path}",
        "logger=none", "trainer.enable_progress_bar=false",
        "training.max_steps=2", "training.schedule_steps=2", "training.eval_every=2",
        "data.batch_size=8",
        "data.eval_size=16", "activations.n_sequences=64", "sae.steps=2", "sae.batch_size=64",
        "sites=[blocks.0.hook_resid_post]", IN_TURN,
    )
    for preset in ("smoke", "default", "paper"):
        (folder,) = (tmp_path / preset).glob("*training.max_steps=2*")
        assert "data.batch_size=8" in folder.name and "sae." not in folder.name, folder
        runs = find_seed_runs(folder)
        assert list(runs) == [0] and runs[0].is_finished(), preset
        assert list(runs[0].saes.glob("*/*/cfg.json")), preset


def test_a_sweep_runs_its_seeds_side_by_side_by_default(tmp_path):
    """No launcher named: the default (hydra/launcher=parallel) runs the two seeds in two
    worker processes, one torch thread each."""
    proc = run("train.py", "-m", "seed=0,1", "experiment=smoke", f"paths.root={tmp_path}",
               *FAST, "parallel.jobs=2", env={"OMP_NUM_THREADS": "2"})
    assert "Joblib.Parallel(n_jobs=2," in proc.stdout + proc.stderr
    runs = find_seed_runs(tmp_path, "smoke")
    assert sorted(runs) == [0, 1] and all(r.is_finished() for r in runs.values())
    infos = [json.loads(r.run_info.read_text()) for r in runs.values()]
    assert [i["determinism"]["torch_threads"] for i in infos] == [1, 1]


def test_submitit_launcher_runs_a_two_seed_sweep_and_a_rerun_reuses_it(tmp_path):
    """The SLURM path's machinery for real: submitit_local starts each job as its own process
    through submitit, as submitit_slurm does on a cluster."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = ["train.py", "-m", "experiment=smoke", f"paths.root={tmp_path}", *FAST,
             "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
             "hydra.launcher.cpus_per_task=1"]
    run(*sweep, "seed=0,1", env={"OMP_NUM_THREADS": "1"})
    runs = find_seed_runs(tmp_path, "smoke")
    assert sorted(runs) == [0, 1] and all(r.is_finished() for r in runs.values())
    jobs = list((tmp_path / "smoke" / "_hydra").rglob(".submitit/*/*_log.out"))
    assert len(jobs) == 2  # two submitit jobs, each with its own log
    before = {s: r.best.stat().st_mtime_ns for s, r in runs.items()}
    # a rerun of one of them (one job: each submitit job is a fresh interpreter, ~13 s of
    # imports, and what is tested is that a job finds its finished run, not the count)
    run(*sweep, "seed=1", env={"OMP_NUM_THREADS": "1"})
    assert {s: r.best.stat().st_mtime_ns for s, r in runs.items()} == before
    logs = list((tmp_path / "smoke" / "_hydra").rglob(".submitit/*/*_log.out"))
    assert len(logs) == 3 and sum("reused in" in p.read_text() for p in logs) == 1


def test_gpu_and_cluster_configs_compose():
    """The GPU / multi-GPU / SLURM paths can't run here; check they compose to what they claim."""
    gpu = compose(["trainer=gpu"])
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "bf16-mixed"
    ddp = compose(["trainer=ddp"])
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == -1
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = compose(["hydra/launcher=submitit_slurm"], return_hydra=True)
    assert "SlurmLauncher" in slurm.hydra.launcher._target_


def test_pretrained_family_train_then_analyze(tiny_lm, tmp_path):
    """The real entry points on tiny local checkpoints: a two-seed multirun, then the analysis;
    the model id's {seed} placeholder is written unquoted, as a user types it."""
    out = tmp_path / "out"
    args = with_model_id(tiny_lm_overrides(tiny_lm, out), tiny_lm["model_id_template"])
    run("train.py", "-m", "seed=1..2", *args, IN_TURN, env={"OMP_NUM_THREADS": "1"})
    for seed in (1, 2):
        assert (out / tiny_lm["name"] / f"seed={seed}" / "metrics.json").is_file()
    # no SAE-seed ceiling was trained here: not asking for one keeps the results complete
    run("analyze.py", *tiny_lm_overrides(tiny_lm, out, "~analysis.callbacks.checkpoint_drift",
                                         "analysis.callbacks.universality.ceiling=false",
                                         analysis=True), env={"OMP_NUM_THREADS": "1"})
    results = json.loads((out / tiny_lm["name"] / "analysis" / "results.json").read_text())
    assert results["meta"]["ablation"]["name"] == tiny_lm["name"]  # name= given: it wins
    assert results["meta"]["context"]["seeds"] == [1, 2] and not results["meta"]["partial"]


def test_pretrained_offline_error_is_one_clear_line(tmp_path):
    proc = run("train.py", "seed=4", "experiment=polypythia", "logger=none",
               f"paths.root={tmp_path}", check=False, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model EleutherAI/pythia-70m-seed4 at revision step143000")
    assert "snapshot_download" in last and "Traceback" not in proc.stderr


def test_a_seed_sweep_over_one_fixed_model_id_is_refused_up_front(tiny_lm, tmp_path):
    fixed = tiny_lm["model_id_template"].format(seed=1)
    proc = run("train.py", "-m", "seed=1,2",
               *with_model_id(tiny_lm_overrides(tiny_lm, tmp_path), fixed), check=False)
    assert proc.returncode == 1
    assert "has no {seed}" in proc.stderr and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, ending with what to write instead
    assert line.endswith(f"e.g. family.model_id='{fixed}-seed{{seed}}'"), line
    # refused in the sweep's own process (polymorph/preflight.py): no job was launched
    assert not list(tmp_path.rglob("run.json")) and not list(tmp_path.rglob("multirun_*/0"))
    assert "Joblib" not in proc.stdout + proc.stderr
