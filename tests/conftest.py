"""Session fixtures: tests stay offline and share a few tiny experiments built once.

Helpers (config composition, planted rotations, tiny language models, the CLI runner) live in
``tests/helpers``; this file only holds fixtures.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The test models are tiny: one intra-op thread is as fast and never oversubscribes a busy CPU
# (two threads per process on a loaded 2-core machine were measured 10-30x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tests.helpers.config import compose, smoke_overrides, tiny_lm_overrides
from tests.helpers.xdist_groups import check_costly_files, costly_files, make_scheduler


def pytest_xdist_make_scheduler(config, log):
    """One unit of work per test file; the files that need a costly session fixture share one
    (tests/helpers/xdist_groups.py says why xdist's own grouping cannot be used)."""
    if config.getvalue("dist") != "loadfile":  # another --dist on the command line wins
        return None
    return make_scheduler(config, log, costly_files(config.rootpath))


def pytest_collection_modifyitems(config, items):
    check_costly_files(items, costly_files(config.rootpath))


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Seeds 0 and 1 of the smoke preset, transformer and SAEs, trained once per session."""
    from polymorph.pipeline import train

    root = tmp_path_factory.mktemp("smoke_outputs")
    results = {seed: train(compose(smoke_overrides(root, f"seed={seed}"))) for seed in (0, 1)}
    return root, results


@pytest.fixture(scope="session")
def smoke_context(smoke_runs, tmp_path_factory):
    """The analysis context over the smoke runs (seeds 0 and 1)."""
    from polymorph.analysis.context import build_context

    root, _ = smoke_runs
    out = tmp_path_factory.mktemp("analysis_out")
    cfg = compose(smoke_overrides(root), config_name="analyze")
    return build_context(cfg, root, out, show_progress=False)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """Tiny GPT-NeoX seeds 1 and 2 (two revisions each besides the analysed one), tokenizer and
    corpus: the PolyPythias' stand-in."""
    from tests.helpers.tiny_lm import build_tiny_lms

    return build_tiny_lms(tmp_path_factory.mktemp("tiny_gpt_neox"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """The same for GPT-2: a second architecture through the same family."""
    from tests.helpers.tiny_lm import build_tiny_lms

    return build_tiny_lms(tmp_path_factory.mktemp("tiny_gpt2"), architecture="gpt2")


@pytest.fixture(scope="session")
def lm_runs(tiny_lm, tmp_path_factory):
    """train.py's job for seeds 1 and 2 of family=pretrained on the tiny GPT-NeoX models."""
    from polymorph.pipeline import train

    root = tmp_path_factory.mktemp("lm_outputs")
    results = {seed: train(compose(tiny_lm_overrides(tiny_lm, root, f"seed={seed}")))
               for seed in tiny_lm["seeds"]}
    return root, results


@pytest.fixture(scope="session")
def lm_context(lm_runs, tiny_lm, tmp_path_factory):
    """The analysis context over the tiny GPT-NeoX runs."""
    from polymorph.analysis.context import build_context

    root, _ = lm_runs
    cfg = compose(tiny_lm_overrides(tiny_lm, root, analysis=True), config_name="analyze")
    return build_context(cfg, root, tmp_path_factory.mktemp("lm_analysis"), show_progress=False)


@pytest.fixture(scope="session")
def smoke_analysis(smoke_runs):
    """analyze() with every default callback over the smoke runs: (results, output folder)."""
    from polymorph.analysis.runner import analyze

    root, _ = smoke_runs
    results, objects = analyze(compose(smoke_overrides(root), config_name="analyze"),
                               show_progress=False)
    return results, objects["out_dir"]


@pytest.fixture(scope="session")
def lm_analysis(lm_runs, tiny_lm, tmp_path_factory):
    """analyze() with every callback over the tiny GPT-NeoX runs (convergence switched back
    on: both seeds have the same revisions): (results, output folder)."""
    from polymorph.analysis.runner import analyze

    root, _ = lm_runs
    out = tmp_path_factory.mktemp("lm_analysis_out")
    cfg = compose(tiny_lm_overrides(
        tiny_lm, root, f"analysis.output_dir={out}",
        "analysis.callbacks.convergence={_target_:polymorph.analysis.convergence.Convergence}",
        analysis=True), config_name="analyze")
    results, _ = analyze(cfg, show_progress=False)
    return results, out


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Three smoke seeds with a TopK ladder at one site, and a universal SAE and a crosscoder
    ladder over them (``stage=shared``; tests/helpers/shared.py): the output root."""
    from tests.helpers.shared import build_experiment

    root = tmp_path_factory.mktemp("shared_outputs")
    build_experiment(root)
    return root
