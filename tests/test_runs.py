"""Run identity from the overrides: which folder a job's runs and analysis go to."""

from __future__ import annotations

import pytest

from polymorph.ablations import Ablation, chain, derive, folder_value
from polymorph.errors import PolymorphError
from polymorph.families import build_family
from polymorph.runs import check_matches_saved, finished_runs, run_layout
from tests.helpers.config import compose


def layout_of(overrides):
    cfg = compose(overrides)
    return run_layout(cfg, build_family(cfg))


def ablation(*overrides: str, analysis: bool = False, preset: str = "smoke") -> Ablation:
    cfg = compose([f"experiment={preset}", *overrides],
                  config_name="analyze" if analysis else "train")
    return derive(cfg, build_family(cfg), for_analysis=analysis)


def test_the_plain_preset_has_no_keys_and_keeps_the_classic_folder(tmp_path):
    a = ablation()
    assert a.label == "" and a.display == "smoke preset"
    cfg = compose(["experiment=smoke", f"paths.root={tmp_path}", "seed=3"])
    layout = run_layout(cfg, build_family(cfg))
    assert layout.root == tmp_path / "smoke" / "seed=3"


@pytest.mark.parametrize("overrides, run, sub", [
    (["io=shared"], "io=shared", ""),
    (["io.mode=shared"], "io=shared", ""),  # the same artefact: the same folder
    (["io=shared", "io.anchor_seed=3"], "io=shared,io.anchor_seed=3", ""),
    (["model.d_model=128"], "model.d_model=128", ""),
    # a value that follows an interpolation is named by the key it follows
    (["training.max_steps=2"], "training.max_steps=2", ""),
    (["training.betas=[0.9,0.99]"], "training.betas=0.9-0.99", ""),
    (["sae.expansion=32"], "", "sae.expansion=32"),
    (["sae.init_seed=per_model"], "", "sae.init_seed=per_model"),
    (["sae=topk"], "", "sae=topk"),
    (["sae=topk", "sae.k=8"], "", "sae=topk,sae.k=8"),
    (["sae_ladder=sparsity"], "", "sae_ladder=sparsity"),
    (["io=shared", "sae.expansion=32"], "io=shared", "sae.expansion=32"),
])
def test_ablation_keys_name_the_folders(overrides, run, sub):
    a = ablation(*overrides)
    assert (a.run_label, a.sub_label) == (run, sub)


@pytest.mark.parametrize("overrides", [
    ["seed=4"], ["logger=none"], ["logger=csv"], ["trainer.enable_progress_bar=false"],
    ["stage=sae"], ["retrain_saes=true"], ["trainer=gpu"], ["hydra/launcher=basic"],
    ["sae_trainer.accelerator=cpu"], ["parallel.jobs=4", "parallel.threads_per_job=2"],
    ["training.collapse_evals=5", "training.collapse_drop=0.3"],
])
def test_keys_that_change_no_artefact_never_enter_a_name(overrides):
    assert ablation(*overrides).label == ""


@pytest.mark.parametrize("overrides, sub", [
    (["analysis.group=SO"], "analysis.group=SO"),
    (["analysis.fit_batch.seed=5"], "analysis.fit_batch.seed=5"),
    (["analysis.callbacks.steering.alphas=[1,2]"], "analysis.callbacks.steering.alphas=1-2"),
    (["~analysis.callbacks.steering"], ""),  # a callback switched off changes no other number
    (["analysis.callbacks.steering=null"], ""),
    (["analysis.output_dir=/tmp/x", "analysis.batch_size=8"], ""),
    (["io=shared", "analysis.group=SO", "sae.expansion=32"],
     "analysis.group=SO,sae.expansion=32"),
])
def test_analysis_keys_name_the_analysis_folder_only(overrides, sub):
    a = ablation(*overrides, analysis=True)
    assert a.sub_label == sub
    assert a.run_label == ("io=shared" if "io=shared" in overrides else "")


def test_folders_nest_run_keys_then_sae_and_analysis_keys(tmp_path):
    a = ablation("io=shared", "sae.expansion=32", "analysis.group=SO", analysis=True)
    assert a.runs_dir(tmp_path) == tmp_path / "smoke" / "io=shared"
    assert a.folder(tmp_path) == tmp_path / "smoke" / "io=shared" / \
        "analysis.group=SO,sae.expansion=32"
    assert a.label == "analysis.group=SO,io=shared,sae.expansion=32"
    sae_only = ablation("sae.expansion=32", analysis=True)
    assert sae_only.runs_dir(tmp_path) == tmp_path / "smoke"  # the preset's transformers


def test_a_name_that_differs_from_the_presets_wins():
    a = ablation("name=mine", "io=shared", "sae.expansion=32")
    assert a.preset is None and a.label == "" and a.experiment == "mine"
    # a suite override renames the experiment itself (its name interpolates the suite)
    poly = ablation("polypythia.suite=pythia-160m", preset="polypythia")
    assert poly.experiment == "polypythia-160m" and poly.label == ""


def test_another_family_is_named_by_the_family():
    a = ablation("family=pretrained", "family.model_id='/data/run/seed{seed}'", preset="default")
    assert a.run["family"] == "pretrained"
    assert a.run["family.model_id"].endswith(folder_value("/data/run/seed{seed}")[-7:])


def test_folder_values_are_readable_and_never_collide():
    assert folder_value(32) == "32" and folder_value(True) == "true"
    assert folder_value(None) == "null"
    assert folder_value([0.9, 0.95]) == "0.9-0.95"
    long_a, long_b = "/data/a/b/c/seed{seed}", "/data/a_b/c/seed{seed}"
    assert "/" not in folder_value(long_a) and folder_value(long_a) != folder_value(long_b)
    assert folder_value("x" * 40) != folder_value("x" * 41)
    assert len(folder_value("y" * 200)) <= 24


def test_two_different_ablations_never_share_a_folder(tmp_path):
    root = [f"paths.root={tmp_path}", "experiment=smoke"]
    configs = [[], ["io=shared"], ["model.d_mlp=128"], ["io=shared", "model.d_mlp=128"],
               ["training.lr=0.01"], ["training.lr=0.02"], ["data.batch_size=16"]]
    folders = [layout_of(root + c).root for c in configs]
    assert len(set(folders)) == len(folders)
    # and the same ablation spelt another way, or rerun, reuses its folder
    assert layout_of(root + ["io.mode=shared"]).root == folders[1]


def test_other_sae_activations_get_runs_of_their_own():
    # SAE folders are named by SAE config alone: SAEs of other activations need another folder
    assert ablation("activations.n_sequences=100").run_label == "activations.n_sequences=100"
    assert ablation("activations.n_sequences=100", "model.d_mlp=128").run_label == \
        "activations.n_sequences=100,model.d_mlp=128"
    assert ablation("activations.batch_size=7").label == ""  # throughput only


def test_a_very_long_chain_still_makes_one_distinct_folder_name(tmp_path):
    from polymorph.ablations import folder_name

    many = [f"training.{k}={v}" for k, v in (("lr", 0.01), ("warmup_steps", 7),
                                             ("weight_decay", 0.5), ("grad_clip", 0.3),
                                             ("final_lr_fraction", 0.1), ("eval_every", 5),
                                             ("converge_threshold", 0.5))]
    a = ablation(*many, "data.batch_size=16", "data.eval_size=32", "data.p_valid=0.3")
    name = a.runs_dir(tmp_path).name
    assert len(name.encode()) <= 160 and name.startswith("data.batch_size=16")
    assert folder_name(a.run_label + "x") != name


def test_chain_is_sorted_and_marks_dropped_keys():
    assert chain({"b": "1", "a": "2", "~c": ""}) == "a=2,b=1,~c"


def test_the_saved_config_guard_names_the_differing_keys(tmp_path):
    from omegaconf import OmegaConf

    from polymorph.families.dyck import DyckFamily
    from polymorph.files import atomic_write_text

    cfg = compose(["experiment=smoke", f"paths.root={tmp_path}", "name=mine"])
    layout = run_layout(cfg, build_family(cfg))
    layout.root.mkdir(parents=True)
    atomic_write_text(layout.config, OmegaConf.to_yaml(cfg, resolve=True))
    check_matches_saved(DyckFamily().identity, cfg, layout)  # its own config: fine
    other = compose(["experiment=smoke", f"paths.root={tmp_path}", "name=mine", "io=shared"])
    with pytest.raises(PolymorphError, match=r"io.mode: saved 'independent', now 'shared'.*"
                                             r"drop name="):
        check_matches_saved(DyckFamily().identity, other, layout)


def test_a_run_saved_before_a_divergence_setting_existed_is_still_its_configs_run(tmp_path):
    """Settings that change no finished artefact (when a diverging run gives up, its progress
    bar) may be added or changed without orphaning the runs saved before."""
    from omegaconf import OmegaConf

    from polymorph.families.dyck import DyckFamily
    from polymorph.files import atomic_write_text

    cfg = compose(["experiment=smoke", f"paths.root={tmp_path}", "name=mine"])
    layout = run_layout(cfg, build_family(cfg))
    layout.root.mkdir(parents=True)
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["training"]["collapse_evals"], saved["training"]["callbacks"]["divergence"]
    atomic_write_text(layout.config, OmegaConf.to_yaml(OmegaConf.create(saved)))
    check_matches_saved(DyckFamily().identity, cfg, layout)
    check_matches_saved(DyckFamily().identity,
                        compose(["experiment=smoke", f"paths.root={tmp_path}", "name=mine",
                                 "training.collapse_drop=0.2"]), layout)


def test_finished_runs_names_the_command_that_trains_the_missing_seeds(tmp_path):
    with pytest.raises(PolymorphError, match=r"no finished seeds in .*io=shared.*"
                                             r"python train.py -m io=shared seed=0..8"):
        finished_runs(tmp_path / "smoke" / "io=shared",
                      train_command="python train.py -m io=shared")


def test_an_option_added_since_the_run_was_saved_counts_only_when_switched_on(tmp_path):
    """A run saved before training.callbacks.ema existed is the run of today's config with the
    EMA off (null), and not of a config that switches it on."""
    from omegaconf import OmegaConf

    from polymorph.families.dyck import DyckFamily
    from polymorph.files import atomic_write_text

    cfg = compose(["experiment=smoke", f"paths.root={tmp_path}", "name=mine"])
    layout = run_layout(cfg, build_family(cfg))
    layout.root.mkdir(parents=True)
    saved = OmegaConf.to_container(cfg, resolve=True)
    assert saved["training"]["callbacks"].pop("ema") is None
    atomic_write_text(layout.config, OmegaConf.to_yaml(OmegaConf.create(saved)))
    check_matches_saved(DyckFamily().identity, cfg, layout)
    on = compose(["experiment=smoke", f"paths.root={tmp_path}", "name=mine",
                  "training.callbacks.ema={_target_:polymorph.training.callbacks.WeightEMA}"])
    with pytest.raises(PolymorphError, match=r"training.callbacks.ema: saved '<missing>'"):
        check_matches_saved(DyckFamily().identity, on, layout)
