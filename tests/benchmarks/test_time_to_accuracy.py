"""benchmarks/time_to_accuracy.py: its smoke mode runs two recipes side by side end to end, and
its crossing / ratio logic is exact on a synthetic curve."""

from __future__ import annotations

import json

import pytest

from tests.helpers.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def tta():
    return load_benchmark("time_to_accuracy")


def _row(step, min_acc):
    return {"step": step, "tokens": 100 * step, "seconds": step / 10, "cpu_seconds": step / 20,
            "lr_fraction": 1.0, "min_acc": min_acc}


def test_crossings_are_the_first_evaluation_at_or_above_each_threshold(tta):
    rows = [_row(100, 0.5), _row(200, 0.99), _row(300, 0.995), _row(400, 0.9991), _row(500, 0.998)]
    c = tta.crossings(rows)
    assert c["0.99"]["step"] == 200 and c["0.999"]["step"] == 400 and c["0.9999"] is None
    assert c["0.999"]["tokens"] == 40_000 and c["0.999"]["cpu_seconds"] == 20.0


def test_ratios_are_against_the_first_recipe(tta):
    ref = {"name": "ref", "crossings": tta.crossings([_row(200, 0.99)])}
    fast = {"name": "fast", "crossings": tta.crossings([_row(100, 0.99)])}
    ratio = tta.ratios([ref, fast])["fast / ref"]["0.99"]
    assert ratio == {"seconds": 0.5, "cpu_seconds": 0.5, "steps": 0.5, "tokens": 0.5}
    assert tta.ratios([ref, fast])["fast / ref"]["0.999"] is None


def test_smoke_mode_runs_two_recipes_side_by_side(tta, tmp_path):
    summary = tta.main(["--smoke", "--out", str(tmp_path), "--budget-minutes", "2"])
    assert [r["name"] for r in summary["recipes"]] == ["reference", "lr_x2"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    for recipe in saved["recipes"]:
        rows = recipe["rows"]
        assert [r["step"] for r in rows] == [10, 20, 30]
        assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 and 0 < r["lr"] for r in rows)
        assert {"train/acc_depth", "long/acc_depth", "compositional/acc_valid"} <= set(rows[0]["acc"])
        assert recipe["threads"] == 1 and recipe["precision"]["precision"] == "32-true"
        assert 0.0 <= recipe["best_min_acc_fp32"] <= 1.0
    assert "lr_x2 / reference" in saved["ratios"]


def test_small_evaluation_sets_are_refused_outside_smoke_mode(tta, tmp_path):
    with pytest.raises(SystemExit, match="4096"):
        tta.run_recipe("small", ["experiment=smoke"], tmp_path, 1, 10.0, None, smoke=False)
