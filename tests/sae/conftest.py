"""Shared fixtures: planted sparse data and two SAEs trained once per session."""

from __future__ import annotations

import logging

import pytest
import torch

N_ROWS, D_IN, N_TRUE = 20_000, 16, 64

# Quick settings for tests (the METHOD.md values are lr 5e-4, batch 4096, conf/sae/*.yaml).
BASE = {
    "architecture": "relu_l1",
    "expansion": 8,
    "l1_coefficient": 1.0e-2,
    "k": None,
    "lr": 2.0e-3,
    "batch_size": 1024,
    "steps": 300,
    "init_seed": "shared",
    "shared_init_seed": 0,
    "data_seed": 0,
}
TOPK = {**BASE, "architecture": "topk", "l1_coefficient": None, "k": 4}


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread():
    """One torch thread while these tests run (restored after each module): on a shared
    2-core machine OpenMP spinning makes two threads far slower than one for these sizes."""
    threads = torch.get_num_threads()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    torch.set_num_threads(1)
    lightning_log.setLevel(logging.WARNING)
    yield
    torch.set_num_threads(threads)
    lightning_log.setLevel(level)


@pytest.fixture(scope="session")
def planted() -> torch.Tensor:
    """20k rows of d=16: each row a sparse (about 3 of 64) positive mix of unit directions."""
    g = torch.Generator().manual_seed(1234)
    directions = torch.randn(N_TRUE, D_IN, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    active = torch.rand(N_ROWS, N_TRUE, generator=g) < 3 / N_TRUE
    magnitude = torch.rand(N_ROWS, N_TRUE, generator=g) + 0.5
    noise = 0.01 * torch.randn(N_ROWS, D_IN, generator=g)
    return ((active * magnitude) @ directions + noise).float()


def _train(acts: torch.Tensor, overrides: dict):
    from polymorph.sae import SAETrainConfig, train_sae

    cfg = SAETrainConfig.from_dict(overrides)
    sae, info = train_sae(
        acts,
        cfg,
        init_seed=0,
        hook_name="blocks.0.hook_resid_post",
        model_name="toy-seed0",
        progress_bar=False,
    )
    return sae, info, cfg


@pytest.fixture(scope="session")
def relu_trained(planted):
    return _train(planted, BASE)


@pytest.fixture(scope="session")
def topk_trained(planted):
    return _train(planted, TOPK)
