"""benchmarks/sae_train.py: the --curve mode scores, at step s of one long run, exactly the SAE
that a run of s steps ends with (the claim the SAE-steps results rest on)."""

from __future__ import annotations

import sys

import pytest

from tests.helpers.benchmarks import load_benchmark

SMALL = ["--rows", "6000", "--expansions", "2", "--heldout", "0.25", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("sae_train")


def _rows(bench, argv, monkeypatch, capsys) -> dict[int, list[str]]:
    """Run the benchmark's main with ``argv``; its table rows by step (mse, evs, L0, dead)."""
    monkeypatch.setattr(sys, "argv", ["sae_train.py", *argv])
    bench.main()
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("relu_l1")]
    return {int(r[4]): r[8:] for r in rows}


def test_a_point_of_the_curve_is_the_sae_a_run_of_that_many_steps_ends_with(
    bench, monkeypatch, capsys
):
    curve = _rows(bench, [*SMALL, "--curve", "--steps", "4", "12"], monkeypatch, capsys)
    assert sorted(curve) == [4, 12]
    separate = _rows(bench, [*SMALL, "--steps", "4", "12"], monkeypatch, capsys)
    assert curve == separate  # every printed metric, to its printed digits
    assert curve[4] != curve[12]  # and the SAE did move in between


def test_a_curve_without_steps_is_refused_with_an_example(bench, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sae_train.py", "--curve"])
    with pytest.raises(SystemExit, match="--steps 1000 2000"):
        bench.main()
