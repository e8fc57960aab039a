"""family=pretrained on tiny local checkpoints of two architectures: no network anywhere."""

from __future__ import annotations

import pytest
import torch

from polymorph.errors import PolymorphError
from polymorph.families import build_family
from polymorph.files import read_json
from polymorph.layout import RunLayout
from polymorph.pipeline import train
from tests.helpers.config import compose, tiny_lm_overrides


def test_train_records_the_model_its_activations_and_saes(lm_runs, tiny_lm):
    from safetensors import safe_open

    from polymorph.sae.io import load_sae

    root, _ = lm_runs
    cfg = compose(tiny_lm_overrides(tiny_lm, root))
    for seed in tiny_lm["seeds"]:
        layout = RunLayout.for_seed(root, tiny_lm["name"], seed)
        info = read_json(layout.run_info)
        assert info["model"]["model_id"] == tiny_lm["model_id_template"].format(seed=seed)
        assert info["model"]["revision"] == "step143000"
        assert info["family"] == "pretrained" and info["versions"]["transformer-lens"]
        assert info["architecture"]["original_architecture"] == "GPTNeoXForCausalLM"
        assert read_json(layout.final_metrics)["pretrained"] is True
        assert not layout.checkpoints.exists()  # nothing was trained
        for site in cfg.sites:
            with safe_open(str(layout.activation_file(site)), framework="pt") as f:
                acts = f.get_tensor("activations")
                assert f.metadata()["checkpoint"] == "revision step143000"
            assert acts.dtype == torch.float16
            assert acts.shape == (64 * 31, 32)  # 64 windows of 32 tokens, first position skipped
            saes = list((layout.saes / site).iterdir())
            assert len(saes) == 1 and "l1mean_1e-05" in saes[0].name
            assert load_sae(saes[0]).sae.cfg.d_in == 32
    # the identical token batch for every seed: one corpus cache file for the SAE batch
    assert len(list((root / tiny_lm["name"] / "corpus").glob("*offset0-n64.safetensors"))) == 1


def test_finished_run_is_reused_and_guarded(lm_runs, tiny_lm):
    root, _ = lm_runs
    layout = RunLayout.for_seed(root, tiny_lm["name"], 1)
    before = {p: p.stat().st_mtime_ns for p in layout.saes.rglob("*.safetensors")}
    train(compose(tiny_lm_overrides(tiny_lm, root, "seed=1")))
    assert before == {p: p.stat().st_mtime_ns for p in layout.saes.rglob("*.safetensors")}
    with pytest.raises(PolymorphError, match="family.revision"):
        train(compose(tiny_lm_overrides(tiny_lm, root, "seed=1", "family.revision=step1000")))


def test_checkpoints_are_the_listed_revisions_and_load(lm_runs, tiny_lm):
    root, _ = lm_runs
    cfg = compose(tiny_lm_overrides(tiny_lm, root))
    family = build_family(cfg)
    checkpoints = family.checkpoints(RunLayout.for_seed(root, tiny_lm["name"], 2))
    assert [c.label for c in checkpoints] == tiny_lm["drift_revisions"]
    assert [c.step for c in checkpoints] == [0, 1000]
    model = checkpoints[1].load()
    assert model.polymorph_source.revision == "step1000"
    assert model.polymorph_source.model_id.endswith("seed2")


def test_readout_is_the_next_token(lm_runs, tiny_lm):
    from polymorph.families.base import NO_TARGET

    root, _ = lm_runs
    family = build_family(compose(tiny_lm_overrides(tiny_lm, root)))
    tokens = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[False, True, True, True]])
    targets = family.readout.targets(tokens, mask)["next_token"]
    assert targets.tolist() == [7, 8, NO_TARGET]
    model = family.load(RunLayout.for_seed(root, tiny_lm["name"], 1))
    logits = family.readout.logits(model, tokens, mask)["next_token"]
    with torch.no_grad():
        assert torch.allclose(logits, model(tokens)[0, 1:], atol=1e-6)


def test_shared_io_is_refused(tmp_path, tiny_lm):
    with pytest.raises(PolymorphError, match="io=independent"):
        train(compose(tiny_lm_overrides(tiny_lm, tmp_path, "seed=1", "io=shared")))


def test_a_model_id_without_seed_is_refused_for_several_seeds(lm_runs, tiny_lm, tmp_path):
    from polymorph.analysis.runner import analyze

    root, _ = lm_runs
    fixed = tiny_lm["model_id_template"].format(seed=1)
    cfg = compose(tiny_lm_overrides(tiny_lm, root, f"family.model_id={fixed}",
                                    f"analysis.output_dir={tmp_path}", analysis=True),
                  config_name="analyze")
    with pytest.raises(PolymorphError, match=r"no \{seed\}.*the same model"):
        analyze(cfg, show_progress=False)


def test_a_second_architecture_runs_through_the_same_family(tiny_gpt2, tmp_path):
    """GPT-2 (sequential blocks: it has resid_mid) end to end, no code of its own."""
    from polymorph.analysis.runner import analyze

    for seed in tiny_gpt2["seeds"]:
        train(compose(tiny_lm_overrides(tiny_gpt2, tmp_path, f"seed={seed}")))
    info = read_json(RunLayout.for_seed(tmp_path, tiny_gpt2["name"], 1).run_info)
    assert info["architecture"]["original_architecture"] == "GPT2LMHeadModel"
    cfg = compose(tiny_lm_overrides(tiny_gpt2, tmp_path, "~analysis.callbacks.sparsity",
                                    "analysis.callbacks.universality.ceiling=false",  # none trained
                                    analysis=True), config_name="analyze")
    results, _ = analyze(cfg, show_progress=False)
    assert not results["meta"]["failed"] and not results["meta"]["partial"], results["meta"]
    assert results["meta"]["context"]["sites"] == tiny_gpt2["sites"]
    assert "blocks.0.hook_resid_mid" in results["meta"]["context"]["sites"]
    assert results["function_match"]["heads"] == ["next_token"]


def test_sites_null_takes_every_residual_site(tiny_gpt2, tmp_path):
    train(compose(tiny_lm_overrides(tiny_gpt2, tmp_path, "seed=1", "sites=null",
                                    "stage=transformer")))
    family = build_family(compose(tiny_lm_overrides(tiny_gpt2, tmp_path, "seed=1",
                                                    "sites=null")))
    from polymorph.activations import distinct_residual_sites

    model = family.load(RunLayout.for_seed(tmp_path, tiny_gpt2["name"], 1))
    assert distinct_residual_sites(model) == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


def test_a_misspelt_site_of_a_local_model_fails_before_loading(tiny_lm, tmp_path):
    with pytest.raises(PolymorphError, match=r"unknown site.*blocks\.0\.hook_resid_mid"):
        train(compose(tiny_lm_overrides(tiny_lm, tmp_path, "seed=1",
                                        "sites=[blocks.0.hook_resid_mid]")))
    assert not (tmp_path / tiny_lm["name"] / "seed=1" / "run.json").exists()


def test_the_published_suites_compose_by_override(tmp_path):
    for suite, seed in (("pythia-70m", 3), ("pythia-410m", 9), ("pythia-160m-weight", 2),
                        ("pythia-160m-data", 1), ("pythia-14m", 5)):
        cfg = compose(["experiment=polypythia", f"polypythia.suite={suite}", f"seed={seed}",
                       f"paths.root={tmp_path}"])
        family = build_family(cfg)
        assert family.model_id_for(seed) == f"EleutherAI/{suite}-seed{seed}"
        assert cfg.name == f"poly{suite}" and cfg.get("model") is None
        assert family.revision == "step143000" and family.readout.name == "next_token"


def test_gpu_and_slurm_configs_compose(tmp_path):
    cfg = compose(["experiment=polypythia", "trainer=gpu", "hydra/launcher=submitit_slurm",
                   f"paths.root={tmp_path}", "seed=3"], return_hydra=True)
    assert cfg.trainer.accelerator == "gpu" and cfg.family.dtype == "auto"
    assert cfg.sae_trainer.accelerator == "gpu"
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.activations.dtype == "float16" and cfg.analysis.fit_precision == "float32"


def test_sae_stage_trains_on_the_configured_accelerator(lm_runs, tiny_lm, monkeypatch):
    """trainer=gpu must reach the SAE trainer (checked without a GPU: the call is intercepted)."""
    from polymorph.sae import stage

    seen = {}

    class Intercepted(Exception):
        pass

    def fake_train_sae(acts, cfg, **kwargs):
        seen.update(kwargs, rows=acts.shape[0], dtype=acts.dtype)
        raise Intercepted

    monkeypatch.setattr(stage, "train_sae", fake_train_sae)
    root, _ = lm_runs
    with pytest.raises(Intercepted):
        train(compose(tiny_lm_overrides(tiny_lm, root, "seed=1", "stage=sae", "trainer=gpu",
                                        "retrain_saes=true")))
    assert seen["trainer"].keywords["accelerator"] == "gpu"
    assert seen["dtype"] == torch.float32 and seen["rows"] == 64 * 31  # fp16 cache, fp32 use
    assert seen["model_name"].endswith("seed1@step143000")
