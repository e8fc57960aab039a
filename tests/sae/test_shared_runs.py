"""stage=shared on a real (smoke) experiment: the folders it writes, what they record, resuming,
and bad input refused in one line before anything trains."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from sae_lens import SAE

from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout
from polymorph.sae.shared_io import load_consensus, read_cohort
from polymorph.sae.shared_layout import SharedLayout
from tests.helpers.cli import run
from tests.helpers.config import REPO, compose
from tests.helpers.shared import (
    CROSSCODER,
    NAME,
    SITE,
    UNIVERSAL,
    copy_experiment,
    overrides,
    train_stage,
)

RUNGS = {"k4", "k8", "k16"}


def _cohort(root, method):
    (folder,) = SharedLayout.for_experiment(root / NAME).cohorts(SITE, method)
    return folder


def test_universal_sae_folders_are_twins_of_the_per_seed_saes(shared_runs):
    folder = _cohort(shared_runs, "universal")
    record = read_cohort(folder / "cohort.json")
    assert record["seeds"] == [0, 1, 2] and record["reference_seed"] == 0
    assert record["fit_batch"]["seed"] == "1001" and record["activations"]["seed"] == "12345"
    assert record["consensus"]["n_fit_rows"] > 64 and record["consensus"]["converged"]
    assert folder.name.startswith("seeds_0-1-2-")
    consensus = load_consensus(folder / "consensus.safetensors")
    assert consensus.seeds == [0, 1, 2] and consensus.group == "O"
    torch.testing.assert_close(consensus.maps[0].matrix, torch.eye(64, dtype=torch.float64),
                               atol=1e-9, rtol=0)  # the reference seed's frame
    saes = SharedLayout.for_experiment(shared_runs / NAME).dictionaries(folder, "universal")
    assert {p.name.split("-")[2] for p in saes} == RUNGS
    for sae_dir in saes:
        sae = SAE.load_from_disk(str(sae_dir))
        assert sae.cfg.d_sae == 512 and sae.cfg.metadata.hook_name == SITE
        meta = json.loads((sae_dir / "polymorph.json").read_text())
        assert meta["method"] == "universal" and meta["seeds"] == [0, 1, 2]
        # the per-seed SAE of the same config has the same folder name in every seed
        for seed in (0, 1, 2):
            assert (RunLayout.for_seed(shared_runs, NAME, seed).saes / SITE / sae_dir.name
                    / "cfg.json").is_file()
        metrics = json.loads((sae_dir / "metrics.json").read_text())
        assert set(metrics["per_seed"]) == {"0", "1", "2"}
        assert metrics["train_info"]["samples_seen"] == 100 * 256


def test_crosscoder_folders_load_in_a_fresh_process(shared_runs):
    folder = _cohort(shared_runs, "crosscoder")
    assert read_cohort(folder / "cohort.json")["d_in"] == 64
    ccs = SharedLayout.for_experiment(shared_runs / NAME).dictionaries(folder, "crosscoder")
    assert len(ccs) == 3
    code = ("import sys, json; from polymorph.sae.crosscoder_io import load_crosscoder; "
            "s = load_crosscoder(sys.argv[1]); "
            "print(json.dumps([s.crosscoder.cfg.n_seeds, s.crosscoder.cfg.k, s.metadata['seeds'],"
            " s.metadata['metrics']['l0']]))")
    out = subprocess.run([sys.executable, "-c", code, str(ccs[0])], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=300)
    n_seeds, k, seeds, l0 = json.loads(out.stdout.strip().splitlines()[-1])
    assert n_seeds == 3 and seeds == [0, 1, 2] and 0 < l0 <= k


def test_a_rerun_keeps_every_dictionary_and_redoes_only_what_is_missing(shared_runs, tmp_path):
    copy_experiment(shared_runs, tmp_path)
    folder = _cohort(tmp_path, "crosscoder")
    stamps = {p.name: (p / "crosscoder_cfg.json").stat().st_mtime_ns
              for p in folder.iterdir() if p.is_dir()}
    train_stage(tmp_path, CROSSCODER)  # nothing to do: no model is even loaded
    assert {p.name: (p / "crosscoder_cfg.json").stat().st_mtime_ns
            for p in folder.iterdir() if p.is_dir()} == stamps
    gone = min(stamps)
    shutil.rmtree(folder / gone)
    metrics, _ = train_stage(tmp_path, CROSSCODER)
    assert [k.rsplit("/", 1)[-1] for k in metrics if k.startswith("shared/")] == [gone]
    after = {p.name: (p / "crosscoder_cfg.json").stat().st_mtime_ns
             for p in folder.iterdir() if p.is_dir()}
    assert after.pop(gone) and after == {k: v for k, v in stamps.items() if k != gone}


def test_a_consensus_over_two_seeds_is_allowed_and_says_it_is_pairwise(shared_runs, tmp_path):
    copy_experiment(shared_runs, tmp_path, shared=False)
    metrics, objects = train_stage(tmp_path, UNIVERSAL, "shared.seeds=[0,1]",
                                   "sae_ladder.rungs=[{k:4}]", "shared.min_rungs=1")
    assert objects["seeds"] == [0, 1] and "pairwise Procrustes" in metrics["notes"][0]
    record = read_cohort(_cohort(tmp_path, "universal") / "cohort.json")
    assert record["consensus"]["is_pairwise"] is True
    assert "pairwise Procrustes" in record["consensus"]["note"]


def test_rows_that_do_not_correspond_are_refused_before_training(shared_runs, tmp_path):
    from safetensors import safe_open

    from polymorph.activations import load_activations, save_activations

    copy_experiment(shared_runs, tmp_path, shared=False)
    cache = RunLayout.for_seed(tmp_path, NAME, 2).activation_file(SITE)
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    cache.unlink()
    save_activations(cache, load_activations(shared_runs / NAME / "seed=2" / "activations"
                                             / f"{SITE}.safetensors")[:-5], meta)
    with pytest.raises(PolymorphError, match=r"seed 2's activations are \(\d+, 64\), seed 0's "
                                             r"\(\d+, 64\): their rows do not correspond"):
        train_stage(tmp_path, CROSSCODER)
    assert not list((tmp_path / NAME).glob(f"shared/{SITE}/crosscoder/*/crosscoder_*"))


@pytest.mark.parametrize("extra, message", [
    (["stage=shared"], "stage=shared needs a method: shared=universal"),
    ([*UNIVERSAL, "sae_ladder.rungs=[{k:4}]"], r"1 config\(s\) is fewer than shared.min_rungs=3.*"
                                      "sae_ladder=topk"),
    ([*CROSSCODER, "shared.rungs=[{k:4},{n_seeds:3}]"], r"rung 1 sets \['n_seeds'\]"),
    ([*CROSSCODER, "shared.rungs=[{k:4},{k:4},{k:8}]"], "rungs 0 and 1 give the same"),
    ([*CROSSCODER, "shared.rungs=[{k:4},{k:8},{k:9999}]"], "k=9999 exceeds d_latent=512"),
    ([*UNIVERSAL, "shared.group=U"], "shared.group=U is unknown"),
    ([*UNIVERSAL, "shared.seeds=[0,0]"], "lists a seed twice"),
])
def test_bad_settings_fail_from_the_config_alone(tmp_path, extra, message):
    from polymorph.pipeline import train

    with pytest.raises(PolymorphError, match=message):
        train(compose(overrides(tmp_path, *extra)))
    assert not (tmp_path / NAME).exists()  # nothing was created


def test_the_stage_command_trains_a_crosscoder(shared_runs, tmp_path):
    copy_experiment(shared_runs, tmp_path, shared=False)
    run("train.py", *overrides(tmp_path, "stage=shared", "shared=crosscoder",
                               "shared.rungs=[{k:4}]", "shared.min_rungs=1",
                               "trainer.enable_progress_bar=false"),
        env={"OMP_NUM_THREADS": "1"})
    (folder,) = SharedLayout.for_experiment(tmp_path / NAME).cohorts(SITE, "crosscoder")
    assert [p.name.split("-")[4] for p in folder.iterdir() if p.is_dir()] == ["k4"]


def test_seeds_without_finished_runs_are_named_with_the_command_that_trains_them(shared_runs):
    with pytest.raises(PolymorphError) as err:
        train_stage(shared_runs, CROSSCODER, "shared.seeds=[0,1,5,6]")
    message = str(err.value)
    assert "\n" not in message and "seeds [5, 6] have no finished run" in message
    assert f"python train.py -m name={NAME} seed=5,6" in message


def test_the_stage_runs_on_pretrained_checkpoints(lm_runs, tiny_lm, tmp_path):
    """The same stage through family=pretrained (tiny GPT-NeoX seeds 1 and 2): the fit batch is
    the preset's corpus slice, disjoint from the SAE windows."""
    from polymorph.pipeline import train
    from tests.helpers.config import tiny_lm_overrides

    root, _ = lm_runs
    shutil.copytree(root / tiny_lm["name"], tmp_path / tiny_lm["name"])
    common = ["stage=shared", "shared.min_rungs=1"]
    train(compose(tiny_lm_overrides(tiny_lm, tmp_path, *common, "shared=universal",
                                    "shared.fit_batch.seq_len=32", "shared.fit_batch.offset=64")))
    train(compose(tiny_lm_overrides(tiny_lm, tmp_path, *common, "shared=crosscoder",
                                    "shared.rungs=[{k:4}]")))
    layout = SharedLayout.for_experiment(tmp_path / tiny_lm["name"])
    for site in tiny_lm["sites"]:
        (universal,) = layout.cohorts(site, "universal")
        record = read_cohort(universal / "cohort.json")
        assert record["seeds"] == [1, 2] and record["consensus"]["is_pairwise"] is True
        assert record["fit_batch_spec"]["offset"] == 64 and record["activations_spec"]["offset"] == 0
        assert len(layout.dictionaries(universal, "universal")) == 1
        (crosscoder,) = layout.cohorts(site, "crosscoder")
        assert len(layout.dictionaries(crosscoder, "crosscoder")) == 1

