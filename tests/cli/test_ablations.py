"""The three moves as a researcher makes them, through the real entry points (subprocesses):
seeds of the plain preset, ablations by override, then a comparison and a W&B report."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from polymorph.layout import RunLayout, find_seed_runs
from polymorph.reports.wandb_report import panel_keys
from tests.helpers.cli import ENV, run
from tests.helpers.config import REPO

OFFLINE = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
# the analysis of the sequence: the callbacks the comparison's questions need (conf/compare),
# small nulls, no rank corrections (no headline reads them)
ANALYSIS = ["analysis.haar_null_samples=20", "~analysis.callbacks.convergence",
            "~analysis.callbacks.checkpoint_drift", "~analysis.callbacks.sparsity",
            "~analysis.callbacks.spliced_loss", "~analysis.callbacks.shared_dictionaries",
            "analysis.callbacks.map_family.ranks=[]",
            "analysis.callbacks.steering.n_boot=100", "analysis.callbacks.steering.n_sequences=64"]


def stamps(layout: RunLayout) -> dict:
    return {p: p.stat().st_mtime_ns for p in layout.checkpoints.iterdir()}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    """Default sweep and io=shared, then sae.expansion=16 on both (a rerun of every transformer
    run), the three analyses, comparison and report: one command per move, as a researcher
    types it."""
    root = tmp_path_factory.mktemp("ablations")
    common = ["experiment=smoke", f"paths.root={root}"]
    # jobs in turn in the sweep's own process: a sweep's side-by-side workers are tested in
    # tests/cli/test_cli.py, and here would only add their start-up to every move
    in_turn = "hydra/launcher=basic"
    out: dict = {"root": root, "common": common}
    run("train.py", "-m", "seed=0..1", "io=independent,shared", *common, in_turn, env=OFFLINE)
    out["plain_before"] = {s: stamps(r) for s, r in find_seed_runs(root, "smoke").items()}
    out["shared_before"] = {s: stamps(r)
                            for s, r in find_seed_runs(root, "smoke", "io=shared").items()}
    out["rerun"] = run("train.py", "-m", "seed=0..1", "io=independent,shared",
                       "sae.expansion=16", *common, in_turn, env=OFFLINE)
    # the three analyses the comparison reads (io=shared with x16 SAEs is no ablation of it)
    run("analyze.py", "-m", *common, "io=independent,shared", *ANALYSIS, in_turn, env=OFFLINE)
    run("analyze.py", *common, "sae.expansion=16", *ANALYSIS, env=OFFLINE)
    ablations = "ablations=[io=independent,io=shared,sae.expansion=16]"
    out["report"] = run("report.py", *common, *ANALYSIS, ablations, "--dry-run", env=OFFLINE)
    return out


def test_each_ablation_has_its_own_folder_and_the_sae_ablation_trains_no_transformer(sequence):
    root = sequence["root"]
    plain = find_seed_runs(root, "smoke")
    shared = find_seed_runs(root, "smoke", "io=shared")
    assert sorted(plain) == sorted(shared) == [0, 1]
    assert all(r.is_finished() for r in [*plain.values(), *shared.values()])
    # the x16 SAEs sit beside the x8 ones in the plain runs, whose transformers are untouched
    for seed, layout in plain.items():
        assert stamps(layout) == sequence["plain_before"][seed]
        for site in (layout.saes).iterdir():
            ids = sorted(p.name for p in site.iterdir())
            assert len(ids) == 2
            assert any("-x16-" in i for i in ids) and any("-x8-" in i for i in ids)
    assert not (root / "smoke" / "sae.expansion=16" / "seed=0").exists()
    assert "reused" in sequence["rerun"].stdout
    # the io=shared cohort's anchor is its own: the shared embedding differs from the plain one
    from safetensors.torch import load_file

    a = load_file(str(shared[0].best))["embed.W_E"]
    b = load_file(str(shared[1].best))["embed.W_E"]
    assert (a == b).all() and not (a == load_file(str(plain[1].best))["embed.W_E"]).all()


def test_a_rerun_of_an_ablation_reuses_its_runs(sequence):
    shared = find_seed_runs(sequence["root"], "smoke", "io=shared")
    for seed, layout in shared.items():
        assert stamps(layout) == sequence["shared_before"][seed]
    assert sequence["rerun"].stdout.count("reused in ") == 4  # 2 seeds x 2 cohorts


def test_each_ablation_is_analysed_in_its_own_folder_and_compared_in_one_table(sequence):
    exp = sequence["root"] / "smoke"
    # the analysis keys (smaller nulls) are part of each folder name, common to all three
    found = sorted(p.parent.relative_to(exp).as_posix() for p in exp.rglob("results.json"))
    assert len(found) == 3 and sum(f.startswith("io=shared/") for f in found) == 1
    assert sum("sae.expansion=16" in f for f in found) == 1
    comparison = json.loads((exp / "comparison" / "comparison.json").read_text())
    assert [a["name"] for a in comparison["ablations"]] == ["smoke preset", "io=shared",
                                                           "sae.expansion=16"]
    for entry in comparison["ablations"]:
        assert entry["seeds"] == [0, 1] and entry["headline"]
    md = (exp / "comparison" / "comparison.md").read_text()
    assert md.count("| `io=shared` |") >= 5  # a row in every question's table
    assert comparison["reading"] and all(r.startswith("`") for r in comparison["reading"])


def test_the_report_spec_names_metric_keys_the_logged_runs_contain(sequence):
    exp = sequence["root"] / "smoke"
    spec = json.loads((exp / "comparison" / "wandb_report.json").read_text())
    keys = panel_keys(spec)
    assert any(k.startswith("headline/sae_transfer/") for k in keys) and "val/min_acc" in keys
    logged = b"".join(p.read_bytes() for p in exp.rglob("run-*.wandb"))
    assert logged, "offline W&B runs were written"
    # W&B writes its run log from a separate process; allow it a moment to flush
    deadline = time.monotonic() + 60
    while any(k.encode() not in logged for k in keys) and time.monotonic() < deadline:
        time.sleep(1)
        logged = b"".join(p.read_bytes() for p in exp.rglob("run-*.wandb"))
    missing = [k for k in keys if k.encode() not in logged]
    assert not missing, missing
    # every run carries its ablation as config fields and tags, for W&B's own grouping
    for field in (b"ablation_run", b"io=shared", b"experiment=smoke", b"job=analyze"):
        assert field in logged, field
    assert "report (not saved, --dry-run)" in sequence["report"].stdout


def read_pty(args: list[str], env: dict, timeout: float = 300) -> str:
    """Run a command with its stdout and stderr on a pseudo-terminal; everything it printed."""
    master, slave = pty.openpty()
    # a terminal of a usual size (a fresh pseudo-terminal reports 0 columns)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_run_shows_each_log_line_once_and_no_library_noise(tmp_path):
    out = read_pty([sys.executable, str(REPO / "train.py"), "experiment=smoke", "logger=none",
                    f"paths.root={tmp_path}", "trainer.enable_progress_bar=true"],
                   {**ENV, "OMP_NUM_THREADS": "1"})
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", out) if ln.strip()]
    logged = [ln for ln in lines if re.match(r"^\[\d\d:\d\d:\d\d\] ", ln)]
    assert logged and len(logged) == len(set(logged)), logged
    finished = [ln for ln in logged if "seed 0 [smoke preset]: trained in" in ln]
    assert len(finished) == 1 and "best val/min_acc" in finished[0]
    assert "litlogger" not in out and not any(ln.startswith("INFO:") for ln in lines)
    assert "LeafSpec" not in out and "IterableDataset" not in out
    assert "GPU available" not in out and "Run summary" not in out
    assert re.search(r"seed 0: +\d+%", out) and re.search(r"SAEs \d/3", out)
    # the job's log file still has everything, each line once
    (log_file,) = (tmp_path / "smoke" / "_hydra").rglob("train.log")
    text = log_file.read_text()
    assert text.count("GPU available") >= 1 and text.count("trained in") == 1


def test_a_misspelt_site_fails_within_seconds_before_anything_is_imported_or_trained(tmp_path):
    start = time.monotonic()
    proc = run("train.py", "experiment=smoke", "sites=[blocks.1.hook_resid_mid,"
               "blocks.9.hook_resid_post]", f"paths.root={tmp_path}", check=False, fresh=True)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and elapsed < 10, elapsed
    (line,) = proc.stderr.strip().splitlines()
    assert "blocks.9.hook_resid_post" in line and "blocks.1.hook_resid_post" in line
    assert not list(tmp_path.rglob("seed=*"))


@pytest.mark.parametrize("overrides, fragment", [
    (["sae.architecture=nope"], "architecture"),
    (["stage=sae", "seed=0"], "stage=sae needs a finished run"),
])
def test_ablation_mistakes_are_one_line_before_training(tmp_path, overrides, fragment):
    proc = run("train.py", "experiment=smoke", "logger=none", f"paths.root={tmp_path}",
               *overrides, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_comparison_of_an_ablation_never_run_names_the_commands(tmp_path):
    proc = run("compare.py", "experiment=smoke", f"paths.root={tmp_path}",
               "ablations=[io=independent,io=shared]", check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: never analysed: ")
    assert "python train.py -m seed=0..8 experiment=smoke" in line and "io=shared" in line
