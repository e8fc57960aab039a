"""spliced_loss: the model's loss with an SAE spliced in, on planted ground truth.

* The identity replacement changes nothing (loss = clean, KL = 0); mean ablation costs loss.
* A planted rotated twin of the anchor: the anchor's SAE transferred by the fitted rotation and
  spliced into the twin gives exactly the anchor's own spliced loss where R is determined.
* The fraction recovered is (L_abl - L_sae) / (L_abl - L_clean), recomputed from the losses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polymorph.analysis.downstream import (
    TOTAL,
    SplicedLoss,
    mean_replacement,
    spliced_loss_sums,
)
from polymorph.errors import PolymorphError
from tests.helpers.planted import with_rotated_anchor_copy

SITE = "blocks.1.hook_resid_mid"
FULL_RANK = ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")
TWIN = 99


def loss(sums: dict, key: str = "ce") -> float:
    return sum(float(s[key].sum() / s["n"].sum()) for s in sums.values())


def test_identity_changes_nothing_and_mean_ablation_costs(smoke_context):
    ctx = smoke_context
    batch = ctx.batches["eval"].head(32)
    model = ctx.models[ctx.anchor]
    same = spliced_loss_sums(ctx, model, SITE, lambda x: x, batch)
    assert set(same) == set(ctx.readout.heads)
    for s in same.values():
        assert torch.allclose(s["ce"], s["ce_clean"], atol=1e-9)
        assert float(s["kl"].abs().max()) < 1e-9 and float(s["n"].sum()) == batch.n_rows
    clean = spliced_loss_sums(ctx, model, SITE, None, batch)
    assert loss(clean) == pytest.approx(loss(same, "ce_clean"))
    mu = ctx.acts["fit"][ctx.anchor][SITE].double().mean(0)
    ablated = spliced_loss_sums(ctx, model, SITE, mean_replacement(mu), batch)
    assert loss(ablated) > loss(ablated, "ce_clean") + 0.05
    assert all(float(s["kl"].sum()) > 0 for s in ablated.values())


@pytest.fixture(scope="module")
def twin_result(smoke_context):
    planted, _ = with_rotated_anchor_copy(dataclasses.replace(smoke_context, pairs=[]), TWIN)
    planted = dataclasses.replace(planted, seeds=[planted.anchor, TWIN])
    return SplicedLoss(n_sequences=64, n_boot=200).run(planted)


def test_the_transferred_sae_in_a_rotated_twin_costs_what_the_anchors_own_does(twin_result):
    rows = {(r["seed"], r["site"], r["head"]): r for r in twin_result["rows"]}
    for site in FULL_RANK:
        for head in ("tok", "depth", "valid", TOTAL):
            own = rows[(0, site, head)]
            twin = rows[(TWIN, site, head)]
            assert twin["clean_loss"] == pytest.approx(own["clean_loss"], rel=1e-5)
            assert twin["transferred_loss"] == pytest.approx(own["own_loss"], rel=1e-5)
            assert twin["transferred_kl"] == pytest.approx(own["own_kl"], rel=1e-3, abs=1e-6)
        e = twin_result["per_site"][site][TOTAL]
        assert e["transferred_recovered"] == pytest.approx(e["anchor_own_recovered"], abs=1e-4)
        assert e["transferred_vs_anchor_own"] == "at"
        assert e["naive_recovered"] < e["transferred_recovered"] - 0.05  # the raw frame is wrong
        assert "at the anchor's own on the anchor" in SplicedLoss().reading(site, e)


def test_recovered_is_the_saelens_fraction_with_paired_intervals(twin_result):
    for r in twin_result["rows"]:
        if r["own_loss" if r["seed"] == 0 else "transferred_loss"] is None:
            continue
        v = "own" if r["seed"] == 0 else "transferred"
        expected = (r["ablated_loss"] - r[f"{v}_loss"]) / (r["ablated_loss"] - r["clean_loss"])
        assert r[f"{v}_recovered"] == pytest.approx(expected)
        ci = r[f"{v}_recovered_ci"]
        assert ci["resampled"] == "sequences" and ci["ci_low"] <= ci["ci_high"]
        assert r[f"{v}_delta_loss"] == pytest.approx(r[f"{v}_loss"] - r["clean_loss"])
        assert r["ablation_gap_ci"]["ci_low"] > 0
    assert "own_loss" not in next(r for r in twin_result["rows"] if r["seed"] == TWIN)


def test_report_and_figure(smoke_context, twin_result, tmp_path):
    cb = SplicedLoss()
    figures = cb.figures(smoke_context, twin_result, tmp_path)
    assert figures and figures[0].stat().st_size > 1000
    text = cb.report(smoke_context, twin_result, figures)
    assert text.startswith("## Loss with the SAE spliced in (`spliced_loss`)")
    assert "(L_abl - L_sae) / (L_abl - L_clean)" in text


def test_bad_input(smoke_context):
    with pytest.raises(PolymorphError, match="not analysis sites"):
        SplicedLoss(sites=["blocks.0.hook_resid_mid"]).run(smoke_context)
    for kw, match in (({"n_boot": 20}, "n_boot"), ({"margin": 3}, "margin"),
                      ({"n_sequences": 0}, "n_sequences")):
        with pytest.raises(ValueError, match=match):
            SplicedLoss(**kw)


def test_language_models_get_next_token_loss_and_kl(lm_analysis):
    results, _ = lm_analysis
    res = results["spliced_loss"]
    assert res["heads"] == ["next_token"] and res["readout"] == "next_token"
    rows = [r for r in res["rows"] if r["head"] == TOTAL]
    assert rows and all(r["clean_loss"] > 0 for r in rows)
    assert all(r["transferred_kl"] >= 0 for r in rows if r["seed"] != res["anchor"])
