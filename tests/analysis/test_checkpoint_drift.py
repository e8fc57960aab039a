"""checkpoint_drift on the smoke runs (kept checkpoints at steps 10 and 20, best = 20)."""

from __future__ import annotations

import json

import pytest

STABLE_SITE = "blocks.1.hook_resid_post"  # full rank: R itself is determined


@pytest.fixture(scope="module")
def drift_context(smoke_context):
    return smoke_context


@pytest.fixture(scope="module")
def result(drift_context):
    from polymorph.analysis.checkpoint_drift import CheckpointDrift

    # a small Haar null: the test needs no precise p-values
    return CheckpointDrift(seed=None, sites=None, null_samples=64).run(drift_context)


def test_one_row_per_kept_checkpoint(result, drift_context):
    from polymorph.files import read_json
    from polymorph.training.transformer_module import MIN_ACC

    json.dumps(result)
    layout = drift_context.runs[drift_context.anchor]
    kept = sorted(layout.step_checkpoints())
    assert len(kept) >= 2
    index = read_json(layout.checkpoint_index)
    assert result["seed"] == drift_context.anchor
    assert [r["step"] for r in result["steps"]] == kept
    assert [r["val_min_acc"] for r in result["steps"]] == [index[str(s)][MIN_ACC] for s in kept]
    assert sum(r["is_best"] for r in result["steps"]) == 1
    assert set(result["per_site"]) == set(drift_context.sites)
    for site, entries in result["per_site"].items():
        assert [e["step"] for e in entries] == kept
        assert entries[0]["from_previous"] is None
        assert all(e["from_previous"] is not None for e in entries[1:])
        for e in entries:
            for key in ("frob_dist", "frob_ratio", "trace_z", "frob_dist_on_span", "span_rank",
                        "raw_ev_standard", "rotated_ev_standard", "rotated_ev_published"):
                assert key in e["to_final"], (site, key)
            assert set(e["sae"]) == {f"{k}_{d}" for k in ("naive", "rotated")
                                     for d in ("ev_published", "ev_standard")}
    for key in ("frob_dist", "frob_dist_on_span", "trace_z", "sae.rotated_ev_*", "val_min_acc"):
        assert key in result["definitions"]


def test_final_checkpoint_maps_to_itself_by_the_identity(result):
    best = next(r["step"] for r in result["steps"] if r["is_best"])
    for site, entries in result["per_site"].items():
        e = next(e for e in entries if e["step"] == best)
        t = e["to_final"]
        assert t["frob_dist_on_span"] < 1e-6, site
        assert t["rotated_ev_standard"] == pytest.approx(1.0, abs=1e-9)
        assert t["rotated_ev_published"] == pytest.approx(1.0, abs=1e-9)
        ceiling = result["sae_ceiling"][site]
        assert e["sae"]["naive_ev_standard"] == pytest.approx(ceiling["ev_standard"], abs=1e-6)
        assert e["sae"]["rotated_ev_standard"] == pytest.approx(ceiling["ev_standard"], abs=1e-4)
    full_rank = next(e for e in result["per_site"][STABLE_SITE] if e["step"] == best)
    assert full_rank["to_final"]["span_rank"] == 64
    assert full_rank["to_final"]["frob_dist"] < 1e-6


def test_earlier_checkpoint_has_moved_and_successive_fits_agree(result):
    entries = result["per_site"][STABLE_SITE]
    first, last = entries[0], entries[-1]
    assert first["to_final"]["frob_dist_on_span"] > 1e-3  # training moved the frame
    if len(entries) == 2 and last["is_best"]:
        # previous -> last is the same fit as first -> final
        assert last["from_previous"]["frob_dist"] == pytest.approx(
            first["to_final"]["frob_dist"], rel=1e-9)


def test_checkpoint_selection_keeps_ends_and_best():
    from polymorph.analysis.checkpoint_drift import CheckpointDrift

    steps = list(range(200, 4001, 200))
    picked = CheckpointDrift(max_checkpoints=3)._select(steps, best=1400)
    assert picked[0] == 200 and picked[-1] == 4000 and 1400 in picked
    assert len(picked) == 4
    assert CheckpointDrift()._select(steps, best=1400) == steps
    with pytest.raises(ValueError, match="max_checkpoints"):
        CheckpointDrift(max_checkpoints=1)


def test_bad_seed_or_site_is_a_clear_error(drift_context):
    from polymorph.analysis.checkpoint_drift import CheckpointDrift
    from polymorph.errors import PolymorphError

    with pytest.raises(PolymorphError, match="not an analysed seed"):
        CheckpointDrift(seed=42).run(drift_context)
    with pytest.raises(PolymorphError, match="analysis sites"):
        CheckpointDrift(sites=["blocks.0.hook_resid_mid"]).run(drift_context)


def test_figures_report_scalars_tables(result, drift_context, tmp_path):
    from polymorph.analysis.checkpoint_drift import CheckpointDrift

    cb = CheckpointDrift()
    figures = cb.figures(drift_context, result, tmp_path)
    assert figures and all(p.is_file() and p.stat().st_size > 1000 for p in figures)
    text = cb.report(drift_context, result, figures)
    assert text.startswith("## ") and f"(figures/{figures[0].name})" in text
    assert "(best)" in text
    scalars = cb.scalars(result)
    assert scalars["n_checkpoints"] == float(len(result["steps"]))
    assert all(isinstance(v, float) for v in scalars.values())
    cols, rows = cb.tables(result)["checkpoint_drift"]
    assert len(rows) == len(result["steps"]) * len(result["per_site"])
    assert all(len(r) == len(cols) for r in rows)
