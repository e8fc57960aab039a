"""Shared fixtures: tests stay offline and share one tiny trained experiment."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The test models are tiny: one intra-op thread is as fast and never oversubscribes a busy CPU
# (two threads per process on a loaded 2-core machine were measured 10-30x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def compose(overrides: list[str], config_name: str = "train", return_hydra: bool = False):
    """Compose a config the way the entry point would, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name=config_name, overrides=overrides, return_hydra_config=return_hydra
        )


def smoke_overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "logger=none", f"paths.root={root}", *extra]


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Seeds 0 and 1 of the smoke preset, transformer and SAEs, trained once per session."""
    from polymorph.pipeline import train

    root = tmp_path_factory.mktemp("smoke_outputs")
    results = {}
    for seed in (0, 1):
        cfg = compose(smoke_overrides(root, f"seed={seed}"))
        results[seed] = train(cfg)
    return root, results


# -- PolyPythias stand-ins ------------------------------------------------------------


def pythia_overrides(tiny: dict, root: Path, *extra: str, analysis: bool = False) -> list[str]:
    """experiment=polypythia pointed at the tiny local GPT-NeoX models and corpus.

    ``analysis=True`` adds the analyze.py settings (compose with config_name="analyze").
    """
    base = [
        "experiment=polypythia",
        "logger=none",
        f"paths.root={root}",
        f"model.model_id={tiny['model_id_template'].replace('{seed}', '${seed}')}",
        "corpus.path=json",
        f"corpus.data_files={tiny['corpus']}",
        "corpus.shuffle_buffer=100",
        "sites=[blocks.0.hook_resid_pre,blocks.0.hook_resid_post,blocks.1.hook_resid_post]",
        "activations.n_sequences=64",
        "activations.seq_len=32",
        "sae.steps=20",
        "sae.batch_size=256",
        "trainer.enable_progress_bar=false",
    ]
    if not analysis:
        return base + list(extra)
    return base + [
        "analysis.fit_batch.seq_len=32",
        "analysis.eval_batch.seq_len=32",
        "analysis.fit_batch.offset=64",
        "analysis.eval_batch.offset=128",
        "analysis.haar_null_samples=50",
        "analysis.callbacks.lm_steering.site=blocks.1.hook_resid_post",
        f"analysis.callbacks.checkpoint_drift.revisions=[{','.join(tiny['drift_revisions'])}]",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_pythia(tmp_path_factory):
    """Tiny GPT-NeoX seeds 1 and 2 (+ two extra revisions of seed 1), tokenizer and corpus."""
    from pythia_tiny import build_tiny_polypythias

    return build_tiny_polypythias(tmp_path_factory.mktemp("tiny_pythia"))


@pytest.fixture(scope="session")
def pythia_runs(tiny_pythia, tmp_path_factory):
    """train.py's job for seeds 1 and 2 of experiment=polypythia on the tiny models."""
    from polymorph.pipeline import train

    root = tmp_path_factory.mktemp("pythia_outputs")
    results = {seed: train(compose(pythia_overrides(tiny_pythia, root, f"seed={seed}")))
               for seed in tiny_pythia["seeds"]}
    return root, results
