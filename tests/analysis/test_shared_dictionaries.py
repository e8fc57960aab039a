"""shared_dictionaries end to end: four methods at matched L0 on held-out rows, planted
rotations (rotate-and-transfer equals own-seed, the universal SAE reconstructs every seed alike,
crosscoder latents spread evenly), unrelated seeds (the gap shows), partial and absent
dictionaries."""

from __future__ import annotations

import shutil

import pytest
import torch

from polymorph.align.metrics import explained_variance
from polymorph.analysis.shared_dictionaries import CONTRASTS, SharedDictionaries
from polymorph.analysis.shared_ladders import METHODS, find_ladders
from polymorph.sae.shared_layout import SharedLayout
from tests.analysis.test_contract import _check
from tests.helpers.shared import (
    CROSSCODER,
    NAME,
    SITE,
    UNIVERSAL,
    analyze_shared,
    copy_experiment,
    plant_rotated_copies,
    train_stage,
)


@pytest.fixture(scope="module")
def unrelated(shared_runs):
    """The analysis of three independently trained smoke seeds."""
    return analyze_shared(shared_runs)


@pytest.fixture(scope="module")
def planted(shared_runs, tmp_path_factory):
    """Seeds 0, 7, 8: seed 0 and two exact rotations of it, with both shared stages."""
    root = tmp_path_factory.mktemp("planted_shared")
    plant_rotated_copies(shared_runs, root)
    train_stage(root, UNIVERSAL)
    train_stage(root, CROSSCODER)
    return analyze_shared(root)


def _site(analysis):
    return analysis[0]["shared_dictionaries"]["sites"][SITE]


def test_every_method_at_matched_l0_with_a_definition_for_every_number(unrelated):
    results, out, _ = unrelated
    _check(results, out, "shared_dictionaries")
    entry = results["shared_dictionaries"]
    assert entry["trained"] and not entry["partial"] and not results["meta"]["partial"]
    site = entry["sites"][SITE]
    assert site["status"] == "compared" and list(site["methods"]) == list(METHODS)
    assert site["methods"]["rotated"]["seeds"] == [1, 2]  # the anchor is its own SAE there
    for method in METHODS:
        assert len(site["methods"][method]["rungs"]) == 3
    assert site["l0_targets"] == pytest.approx([4.0, 8.0, 16.0], rel=0.02)  # TopK: L0 = k
    for point in site["matched"]:
        assert set(point["methods"]) == set(METHODS)
        for value in point["methods"].values():
            ev = value["ev_standard"]
            assert ev["ci_low"] <= ev["point"] <= ev["ci_high"] and ev["n_boot"] == 200
            assert {"ev_published", "dead_fraction"} <= set(value)
        assert set(point["differences"]) == {f"{a}_minus_{b}" for a, b in CONTRASTS}
        assert point["best"]
    assert "decoder_evenness" in site["matched"][0]["methods"]["crosscoder"]
    assert "firing_overlap" in site["matched"][0]["methods"]["universal"]
    report = (out / "report.md").read_text()
    assert "figures/shared_dictionaries_1.post.png" in report
    assert site["reading"] in report and "Best (within the margin)" in site["reading"]


def test_unrelated_seeds_rotate_and_transfer_falls_behind_their_own_saes(unrelated):
    site = _site(unrelated)
    for point in site["matched"]:
        diff = point["differences"]["rotated_minus_own"]["ev_standard"]
        assert diff["point"] < -0.05 and diff["ci_high"] < 0, point["l0"]
        assert point["methods"]["rotated"]["firing_overlap"] < 0.95
    assert "anchor's SAE rotated" in site["reading"] and "behind at 3 of 3" in site["reading"]


def test_planted_rotations_transfer_exactly_and_every_seed_is_reconstructed_alike(planted):
    site = _site(planted)
    own = {r["config_id"]: r["per_seed"] for r in site["methods"]["own"]["rungs"]}
    for rung in site["methods"]["rotated"]["rungs"]:
        for seed, value in rung["per_seed"].items():  # R recovered: the anchor's SAE is theirs
            assert value["ev_standard"] == pytest.approx(own[rung["config_id"]][seed]
                                                         ["ev_standard"], abs=1e-4)
            assert value["firing_overlap"] > 0.999
            # the rotated copy computes the same function: the spliced-in loss agrees too
            assert value["loss_recovered"] == pytest.approx(
                own[rung["config_id"]][seed]["loss_recovered"], abs=1e-3)
    for rung in site["methods"]["universal"]["rungs"]:
        evs = [v["ev_standard"] for v in rung["per_seed"].values()]
        assert max(evs) - min(evs) < 1e-4, rung  # the consensus maps undo the rotations
        assert rung["firing_overlap"] > 0.999
    for point in site["matched"]:
        uni = point["differences"]["universal_minus_own"]["ev_standard"]["point"]
        assert abs(uni) < 0.05, point["l0"]  # as well as the anchor's own SAE, up to training
        assert point["differences"]["rotated_minus_own"]["ev_standard"]["point"] == \
            pytest.approx(0.0, abs=1e-4)
    assert "anchor's SAE rotated +0.000 to +0.000 (tied at 3 of 3)" in site["reading"]
    assert "not the transfer's" in site["reading"] or "matches them" in site["reading"]


def test_crosscoder_latents_spread_more_evenly_over_rotated_copies(planted, unrelated):
    rotated = _site(planted)["methods"]["crosscoder"]["rungs"]
    null = _site(unrelated)["methods"]["crosscoder"]["rungs"]
    assert len(rotated) == len(null) == 3
    for a, b in zip(rotated, null):  # rung by rung (both sorted by L0: k = 4, 8, 16)
        # every seed writes each latent at a similar strength where the seeds are rotations;
        # independently trained seeds leave some seed's decoder row far weaker
        assert a["decoder_evenness"] > 0.85 and a["decoder_evenness"] > b["decoder_evenness"] + 0.1
        assert a["seed_specific_fraction"] == 0.0


def test_reconstruction_is_what_was_scored_for_a_downstream_splice(unrelated):
    results, _, ctx = unrelated
    layout = SharedLayout.for_experiment(ctx.experiment_dir)
    ladders, _, _ = find_ladders(ctx, SITE, layout, scored_spec=None, scored_name="eval",
                                 sae_architecture=None, crosscoder_architecture=None)
    callback = SharedDictionaries()
    site = results["shared_dictionaries"]["sites"][SITE]
    for method in METHODS:
        rung = ladders[method].rungs[0]
        x_hat = callback.reconstruction(ctx, SITE, ladders[method], rung, 2)
        x = ctx.scoring_acts(2, SITE)
        assert x_hat.shape == x.shape
        (scored,) = [r for r in site["methods"][method]["rungs"]
                     if r["config_id"] == rung.config_id]
        assert explained_variance(x_hat, x)["ev_standard"] == pytest.approx(
            scored["per_seed"]["2"]["ev_standard"], abs=1e-6)


def test_a_missing_method_is_named_with_its_command_and_marks_the_analysis_partial(
        shared_runs, tmp_path):
    copy_experiment(shared_runs, tmp_path)
    shutil.rmtree(tmp_path / NAME / "shared" / SITE / "crosscoder")
    results, _, _ = analyze_shared(tmp_path)
    entry = results["shared_dictionaries"]
    assert results["meta"]["partial"] is True and entry["sites"][SITE]["status"] == "partial"
    assert list(entry["sites"][SITE]["methods"]) == ["own", "rotated", "universal"]
    (missing,) = entry["missing"]
    assert "no crosscoder rung(s)" in missing and "stage=shared shared=crosscoder" in missing


def test_shared_rows_that_overlap_the_scored_batch_are_left_out(shared_runs):
    # score on the batch the consensus maps were fitted on (seed 1001): not held out
    results, _, _ = analyze_shared(shared_runs, "analysis.eval_batch.seed=1001",
                                   "analysis.fit_batch.seed=999",
                                   "analysis.output_dir=${paths.root}/overlap_analysis")
    entry = results["shared_dictionaries"]
    assert "universal" not in entry["sites"][SITE]["methods"]
    assert any("not held out from the scored batch" in m and "universal cohort" in m
               for m in entry["missing"])
    assert "crosscoder" in entry["sites"][SITE]["methods"]  # its rows (seed 12345) are


def test_absent_shared_dictionaries_never_fail_the_default_analysis(smoke_analysis):
    results, out = smoke_analysis
    entry = results["shared_dictionaries"]
    assert entry["trained"] is False and entry["partial"] is True and entry["sites"] == {}
    # nothing trained: noted, not missing (the smoke analysis is partial only for the SAE-seed
    # ceiling it does not train)
    assert not any(m.startswith("shared_dictionaries") for m in results["meta"]["missing"])
    assert "shared_dictionaries" not in results["meta"]["failed"]
    assert "python train.py stage=shared shared=universal" in entry["notes"][0]
    report = (out / "report.md").read_text()
    assert "**not computed**" in report and "stage=shared shared=crosscoder" in report


@pytest.mark.parametrize("kwargs, message", [
    ({"min_rungs": 0}, "min_rungs"), ({"l0_targets": [8, -1]}, "l0_targets"),
    ({"seed_specific_share": 1.5}, "seed_specific_share"),
])
def test_bad_settings_are_refused_when_the_callback_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharedDictionaries(**kwargs)


def test_matched_values_are_the_interpolated_per_seed_curves(unrelated):
    site = _site(unrelated)
    point = site["matched"][1]
    for method in ("own", "crosscoder"):
        (rung,) = [r for r in site["methods"][method]["rungs"]
                   if abs(r["l0"] - point["l0"]) / point["l0"] < 0.05]
        want = sum(v["ev_standard"] for v in rung["per_seed"].values()) / len(rung["per_seed"])
        assert point["methods"][method]["ev_standard"]["point"] == pytest.approx(want, abs=1e-6)
    assert torch.isfinite(torch.tensor(point["methods"]["own"]["ev_published"]["point"]))
