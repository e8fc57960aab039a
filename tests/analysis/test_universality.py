"""universality: read between matched chance and the SAE-seed ceiling, on planted truth.

* A planted rotated twin whose SAE is the anchor's *ceiling* SAE (same model, another init
  seed) moved into the twin's frame: rotated universality must equal the SAE-seed ceiling.
* Seeds unrelated to the anchor point by point (its activations with every row scrambled, in
  another frame, with an SAE of the anchor's features moved there): rotated universality must
  read "at matched chance", where the isotropic "chance" sits far below.
* One SAE per site: the ceiling is missing, the results are partial and say what to train.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from omegaconf import open_dict

from polymorph.analysis.runner import analyze
from polymorph.analysis.universality import Universality, find_ceiling_folder
from polymorph.layout import RunLayout
from polymorph.pipeline import train
from polymorph.sae.io import load_sae
from tests.helpers.config import compose, smoke_overrides
from tests.helpers.planted import moved_sae, with_rotated_anchor_copy, with_unrelated_copy

SITES = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")
FULL_RANK = SITES[1:]  # resid_pre spans 12 of 64 directions: R is arbitrary off that span
TWIN, UNRELATED = 99, (50, 51, 52, 53)


@pytest.fixture(scope="module")
def ceiling_root(smoke_runs, tmp_path_factory):
    """Copies of smoke seeds 0 and 1 plus a ceiling SAE per site, trained by train.py's SAE
    stage with conf/sae_ladder/ceiling.yaml."""
    root, _ = smoke_runs
    new_root = tmp_path_factory.mktemp("ceiling")
    for seed in (0, 1):
        shutil.copytree(RunLayout.for_seed(root, "smoke", seed).root,
                        RunLayout.for_seed(new_root, "smoke", seed).root)
        train(compose(smoke_overrides(new_root, f"seed={seed}", "stage=sae",
                                      "sae_ladder=ceiling")))
    return new_root


@pytest.fixture(scope="module")
def ctx(smoke_context, ceiling_root):
    """The smoke context reading its runs (and their ceiling SAEs) from the copies."""
    return dataclasses.replace(smoke_context, runs={
        s: RunLayout.for_seed(ceiling_root, "smoke", s) for s in smoke_context.seeds})


def ceiling_saes(ctx) -> dict:
    a = ctx.anchor
    return {site: load_sae(find_ceiling_folder(ctx.runs[a], site,
                                               ctx.saes[a][site].metadata["sae_config"]))
            for site in ctx.sites}


def test_the_ceiling_rung_is_found_on_disk(ctx):
    a, site = ctx.anchor, SITES[1]
    analysed = ctx.saes[a][site].metadata["sae_config"]
    folder = find_ceiling_folder(ctx.runs[a], site, analysed)
    assert folder is not None and folder.name != ctx.sae_config_id
    other = load_sae(folder).metadata["sae_config"]
    assert other["shared_init_seed"] == 1 and {**other, "shared_init_seed": 0} == analysed
    assert find_ceiling_folder(ctx.runs[a], site, analysed, shared_init_seed=1) == folder
    assert find_ceiling_folder(ctx.runs[a], site, analysed, shared_init_seed=7) is None
    assert find_ceiling_folder(ctx.runs[a], site, {**analysed, "steps": 21}) is None


def test_real_runs_read_between_chance_and_ceiling(ctx):
    result = Universality(chance_trials=2).run(ctx)
    assert result["missing"] == []
    for row in result["rows"]:
        assert row["ceiling"]["config_id"] != ctx.sae_config_id
        for metric in ("mean_max_cos", "hungarian_mean_cos"):
            # matched chance sits above the isotropic lower bound (rows live in the span)
            assert row["matched_chance_rotated"][metric] > row["isotropic_chance"][metric]
    for s in result["per_site"].values():
        assert s["n_pairs"] == 1 and s["rotated_mean_max_cos_ci"] is None  # one pair
        assert s["relation_to_ceiling"]["mean_max_cos"] in ("above", "at", "below")
    text = Universality().report(ctx, result, [])
    assert "SAE-seed ceiling" in text and "matched chance" in text and "isotropic" in text


def test_a_twin_with_a_reseeded_sae_sits_at_the_sae_seed_ceiling(ctx):
    planted, q = with_rotated_anchor_copy(dataclasses.replace(ctx, pairs=[]), TWIN)
    planted.saes[TWIN] = {s: moved_sae(v, q) for s, v in ceiling_saes(ctx).items()}
    result = Universality(chance_trials=1).run(planted)
    for row in result["rows"]:
        if row["site"] in FULL_RANK:
            for metric in ("mean_max_cos", "hungarian_mean_cos", "frac_above_0_5"):
                assert row["rotated"][metric] == pytest.approx(row["ceiling"][metric], abs=1e-5)
            assert row["position"]["mean_max_cos"] == pytest.approx(1.0, abs=1e-3)
    for site in FULL_RANK:
        s = result["per_site"][site]
        assert s["relation_to_ceiling"] == {"mean_max_cos": "at", "hungarian_mean_cos": "at",
                                            "frac_above_0_5": "at"}
        assert "at the SAE-seed ceiling" in Universality().reading(site, s)


def test_unrelated_seeds_read_at_matched_chance_not_above_isotropic_chance(ctx):
    """Four seeds whose activations match the anchor's as a set but not point by point."""
    planted = dataclasses.replace(ctx, pairs=[])
    features = ceiling_saes(ctx)  # the anchor's features, another init: an SAE of that set
    for k, seed in enumerate(UNRELATED):
        planted, _ = with_unrelated_copy(planted, seed, features, q_seed=100 + k,
                                         perm_seed=200 + k)
    result = Universality(chance_trials=2).run(planted)
    for site, s in result["per_site"].items():
        assert s["n_pairs"] == len(UNRELATED)
        assert s["excess_over_matched_chance_mean_max_cos_ci"]["resampled"] == "pairs"
        assert s["relation_to_matched_chance"]["mean_max_cos"] == "at", (site, s)
        assert "max-cosine" in (text := Universality().reading(site, s))
        assert "at matched chance" in text.split(";")[0]
        # chance is well above the isotropic value: the rows live in the activation span
        assert s["matched_chance_rotated_mean_max_cos"] > s["isotropic_chance_mean_max_cos"] + 0.01


def test_a_missing_ceiling_makes_the_results_partial_and_says_what_to_train(smoke_runs,
                                                                           tmp_path):
    root, _ = smoke_runs
    cfg = compose(smoke_overrides(root), config_name="analyze")
    with open_dict(cfg):
        cfg.analysis.callbacks = {"universality": cfg.analysis.callbacks.universality}
        cfg.analysis.output_dir = str(tmp_path)
    results, objects = analyze(cfg, show_progress=False)
    assert results["meta"]["partial"] is True
    (missing,) = results["meta"]["missing"]
    assert "seed(s) 0" in missing and "stage=sae sae_ladder=ceiling" in missing
    assert results["universality"]["rows"]  # everything else is there
    report = (objects["out_dir"] / "report.md").read_text()
    assert "Partial results" in report and "sae_ladder=ceiling" in report
    assert "no SAE-seed ceiling to compare with" in report


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="margin"):
        Universality(margin=2)
    with pytest.raises(ValueError, match="n_boot"):
        Universality(n_boot=10)
    with pytest.raises(ValueError, match="chance_trials"):
        Universality(chance_trials=-1)


def test_the_ceiling_config_is_not_a_sparsity_rung(ctx):
    from polymorph.analysis.sparsity import Sparsity

    result = Sparsity().run(ctx)
    assert result["configs"] == [] and result["missing"] == []
    assert all(any("SAE-seed ceiling" in n for n in result["notes"] if n.startswith(site))
               for site in ctx.sites)
