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
