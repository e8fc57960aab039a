"""sae_transfer: the transferred SAE named plainly, scored two ways, against a shuffled null.

* Unrelated seeds (the anchor's activations with every row scrambled, in another frame): the
  fitted rotation only matches the two distributions as sets, so the transferred EV must read
  "at" the shuffled-pairing null, which does the same on purpose.
* A planted rotated twin: the transferred SAE equals self on both scores where R is determined,
  and the rotation predicts the anchor exactly, which the null rotation does not.
"""

from __future__ import annotations

import dataclasses

import pytest

from polymorph.analysis.sae_transfer import KINDS, SAETransfer
from tests.helpers.planted import with_rotated_anchor_copy, with_unrelated_copy

FULL_RANK = ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")
DEFS = ("ev_standard", "ev_published")


def run(ctx, **kw):
    return SAETransfer(save_transferred=False, n_boot=200, **kw).run(ctx)


@pytest.fixture(scope="module")
def smoke_result(smoke_context):
    return run(smoke_context)


def test_every_ev_has_its_interval_and_the_old_names_stay(smoke_result):
    for row in smoke_result["rows"]:
        for kind in KINDS:
            for d in DEFS:
                ci = row[f"{kind}_{d}_ci"]
                assert ci["mean"] == pytest.approx(row[f"{kind}_{d}"])
                assert ci["ci_low"] <= ci["ci_high"] and ci["resampled"] == "sequences"
        for d in DEFS:  # kept for existing readers
            assert row[f"rotated_{d}"] == row[f"transferred_on_b_{d}"]
            assert row[f"ceiling_{d}"] == row[f"self_{d}"]
            assert len(row[f"shuffled_null_on_b_{d}_fits"]) == 3
        assert abs(row["floor_ev_standard"]) < 1e-9
    for s in smoke_result["per_site"].values():
        assert s["transferred_on_b_ev_standard_ci"]["resampled"] == "pairs+sequences"
        assert s["shuffled_null_on_b_ev_standard_band"][0] < s["shuffled_null_on_b_ev_standard"]
        assert set(s["relations"].values()) <= {"above", "at", "below"}


def test_unrelated_seeds_transfer_at_the_shuffled_null(smoke_context):
    planted = dataclasses.replace(smoke_context, pairs=[])
    own = {s: smoke_context.saes[smoke_context.anchor][s] for s in smoke_context.sites}
    for k, seed in enumerate((50, 51)):
        planted, _ = with_unrelated_copy(planted, seed, own, q_seed=5 + k, perm_seed=k)
    result = run(planted)
    cb = SAETransfer()
    for site, s in result["per_site"].items():
        assert s["relations"]["transferred_on_b_vs_shuffled_null_ev_standard"] == "at", site
        assert s["relations"]["transferred_against_a_vs_shuffled_null_ev_standard"] == "at"
        assert "at the shuffled-pairing null" in cb.reading(site, s, 3)
        # nothing corresponds point by point: the rotation predicts the anchor worse than its mean
        assert s["rotation_ev_standard"] < 0


def test_a_rotated_twin_transfers_exactly_and_beats_the_null_point_by_point(smoke_context):
    planted, _ = with_rotated_anchor_copy(dataclasses.replace(smoke_context, pairs=[]), 99)
    result = run(planted)
    for row in result["rows"]:
        if row["site"] not in FULL_RANK:
            continue
        for d in DEFS:
            assert row[f"transferred_on_b_{d}"] == pytest.approx(row[f"self_{d}"], abs=1e-4)
            assert row[f"transferred_against_a_{d}"] == pytest.approx(row[f"self_{d}"], abs=1e-4)
        assert row["rotation_ev_standard"] == pytest.approx(1.0, abs=1e-5)
        assert row["shuffled_null_rotation_ev_standard"] < row["rotation_ev_standard"] - 0.05
        assert row["firing_overlap_rotated"]["mean_pearson"] > 0.999
    for site in FULL_RANK:
        rel = result["per_site"][site]["relations"]
        assert rel["transferred_on_b_vs_self_ev_standard"] == "at"
        assert rel["transferred_against_a_vs_self_ev_standard"] == "at"


def test_report_names_every_quantity(smoke_context, smoke_result, tmp_path):
    cb = SAETransfer()
    text = cb.report(smoke_context, smoke_result, cb.figures(smoke_context, smoke_result, tmp_path))
    for words in ("transferred on b", "null on b", "transferred vs a", "shuffled-pairing null",
                  "figures/sae_transfer_ev.png"):
        assert words in text


def test_without_a_null_there_is_no_null(smoke_context):
    result = run(smoke_context, null_shuffles=0)
    row = result["rows"][0]
    assert "shuffled_null_on_b_ev_standard" not in row
    assert not any("shuffled_null" in k for k in result["per_site"][row["site"]]["relations"])


def test_bad_arguments_are_refused():
    for kw, match in (({"n_boot": 99}, "n_boot"), ({"margin": -0.5}, "margin"),
                      ({"null_shuffles": -1}, "null_shuffles")):
        with pytest.raises(ValueError, match=match):
            SAETransfer(**kw)
