"""The cross-seed stage's building blocks on planted truth: seeds that are exact rotations of one
another give a universal SAE as good as each seed's own and a crosscoder whose latents every
seed uses alike; unrelated seeds show the gap. Plus the row-alignment guards and the chunked
evaluation."""

from __future__ import annotations

import pytest
import torch

from polymorph.align.consensus import fit_consensus
from polymorph.align.haar import haar_orthogonal
from polymorph.align.metrics import explained_variance
from polymorph.align.transfer import transfer_sae
from polymorph.errors import PolymorphError
from polymorph.families.base import TokenBatch
from polymorph.sae import SAETrainConfig, train_sae
from polymorph.sae.crosscoder_config import CrosscoderConfig
from polymorph.sae.crosscoder_train import train_crosscoder
from polymorph.sae.shared_eval import RunningEV, crosscoder_metrics
from polymorph.sae.shared_rows import (
    check_aligned_matrices,
    check_row_alignment,
    pool_into_frame,
)

N, D, N_TRUE, SEEDS = 10_000, 16, 64, (0, 1, 2)
FIT, TRAIN, EVAL = slice(0, 2000), slice(2000, 8000), slice(8000, 10_000)  # disjoint rows
STEPS = 150
TOPK = {"architecture": "topk", "expansion": 8, "l1_coefficient": None, "k": 4, "lr": 2e-3,
        "batch_size": 512, "steps": STEPS, "init_seed": "shared", "shared_init_seed": 0,
        "data_seed": 0}


def sparse_rows(seed: int) -> torch.Tensor:
    """Each row a sparse (about 3 of 64) positive mix of unit directions, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_TRUE, D, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    active = torch.rand(N, N_TRUE, generator=g) < 3 / N_TRUE
    magnitude = torch.rand(N, N_TRUE, generator=g) + 0.5
    return ((active * magnitude) @ directions + 0.01 * torch.randn(N, D, generator=g)).float()


def _trained(seeds: list[torch.Tensor]) -> dict:
    """What the stage trains (consensus maps on the fit rows, a universal SAE on the pooled
    training rows, a crosscoder on the raw ones) and each seed's own SAE, scored on EVAL."""
    cfg = SAETrainConfig.from_dict(TOPK)
    maps = list(fit_consensus([x[FIT] for x in seeds]).maps)
    pooled = pool_into_frame({s: x[TRAIN] for s, x in zip(SEEDS, seeds)}, maps, list(SEEDS))
    universal, _ = train_sae(pooled, cfg, init_seed=0, hook_name="h", model_name="universal",
                             progress_bar=False)
    own = [train_sae(x[TRAIN], cfg, init_seed=0, hook_name="h", model_name=f"seed{s}",
                     progress_bar=False)[0] for s, x in zip(SEEDS, seeds)]
    cc_cfg = CrosscoderConfig(architecture="topk", n_seeds=3, d_in=D, expansion=8,
                              l1_coefficient=None, k=4, lr=2e-3, batch_size=512, steps=STEPS,
                              init_seed=0, data_seed=0)
    crosscoder, _ = train_crosscoder([x[TRAIN] for x in seeds], cc_cfg, progress_bar=False)
    with torch.no_grad():
        ev_universal = [explained_variance(transfer_sae(universal, m)(x[EVAL]), x[EVAL])
                        ["ev_standard"] for m, x in zip(maps, seeds)]
        ev_own = [explained_variance(o(x[EVAL]), x[EVAL])["ev_standard"]
                  for o, x in zip(own, seeds)]
    return {"universal": ev_universal, "own": ev_own,
            "crosscoder": crosscoder_metrics(crosscoder, [x[EVAL] for x in seeds], list(SEEDS)),
            "crosscoder_model": crosscoder, "seeds": seeds}


@pytest.fixture(scope="module")
def rotated():
    """Three seeds seeing the same sparse rows in Haar-rotated frames (exactly)."""
    base = sparse_rows(1234)
    return _trained([base @ haar_orthogonal(D, seed=10 + s).float() for s in SEEDS])


@pytest.fixture(scope="module")
def unrelated():
    """Three seeds with independent dictionaries: no rotation maps one onto another."""
    return _trained([sparse_rows(1234 + 100 * s) for s in SEEDS])


def test_universal_sae_on_exact_rotations_reconstructs_every_seed_as_its_own_sae_does(rotated):
    ev = rotated["universal"]
    # the consensus maps undo the rotations, so every seed's rows are one matrix to the SAE
    assert max(ev) - min(ev) < 1e-4, ev
    for uni, own in zip(ev, rotated["own"]):
        assert abs(uni - own) < 0.01, (ev, rotated["own"])


def test_crosscoder_on_exact_rotations_spreads_every_latent_evenly(rotated):
    metrics = rotated["crosscoder"]
    assert metrics["decoder_evenness"] > 0.9, metrics
    evs = [m["ev_standard"] for m in metrics["per_seed"].values()]
    # it can represent each seed's own SAE exactly (W_enc[s] = Q_s^T W_enc / 3), so it is at
    # least as good, and the seeds are reconstructed alike
    assert max(evs) - min(evs) < 0.01 and min(evs) > max(rotated["own"]) - 0.01, metrics


def test_unrelated_seeds_show_the_gap(rotated, unrelated):
    # one dictionary for three unrelated dictionaries' rows: worse than each seed's own SAE
    for uni, own in zip(unrelated["universal"], unrelated["own"]):
        assert uni < own - 0.03, (unrelated["universal"], unrelated["own"])
    # the crosscoder cannot share latents across seeds: it reconstructs far worse and its
    # latents are used unevenly by the seeds
    planted, null = rotated["crosscoder"], unrelated["crosscoder"]
    for s in map(str, SEEDS):
        assert null["per_seed"][s]["ev_standard"] < planted["per_seed"][s]["ev_standard"] - 0.2
    assert null["decoder_evenness"] < planted["decoder_evenness"] - 0.1, (planted, null)


def test_crosscoder_metrics_do_not_depend_on_the_evaluation_chunk(rotated):
    cc, seeds = rotated["crosscoder_model"], [x[EVAL] for x in rotated["seeds"]]
    whole = crosscoder_metrics(cc, seeds, list(SEEDS), batch_size=len(seeds[0]))
    chunked = crosscoder_metrics(cc, seeds, list(SEEDS), batch_size=333)
    with torch.no_grad():
        x_hat = cc(seeds)
    for i, s in enumerate(map(str, SEEDS)):
        direct = explained_variance(x_hat[i], seeds[i])
        for key in ("ev_standard", "ev_published"):
            assert chunked["per_seed"][s][key] == pytest.approx(direct[key], abs=1e-6)
            assert chunked["per_seed"][s][key] == pytest.approx(whole["per_seed"][s][key],
                                                                abs=1e-9)
    assert chunked["l0"] == pytest.approx(whole["l0"]) and chunked["l0"] <= 4


def test_running_ev_equals_the_whole_matrix_definitions():
    g = torch.Generator().manual_seed(3)
    x = 5.0 + torch.randn(1000, 7, generator=g)  # an offset the grand-mean shift absorbs
    x_hat = x + 0.3 * torch.randn(1000, 7, generator=g)
    running = RunningEV(7)
    for start in range(0, 1000, 128):
        running.update(x_hat[start:start + 128], x[start:start + 128])
    want = explained_variance(x_hat, x)
    for key, value in running.values().items():
        assert value == pytest.approx(want[key], abs=1e-9)


def test_pool_into_frame_stacks_the_mapped_seeds_and_releases_each_one():
    base = sparse_rows(7)
    seeds = [base @ haar_orthogonal(D, seed=20 + s).float() for s in SEEDS]
    maps = list(fit_consensus([x[FIT] for x in seeds]).maps)
    acts = {s: x[TRAIN] for s, x in zip(SEEDS, seeds)}
    pooled = pool_into_frame(acts, maps, list(SEEDS))
    assert acts == {}  # every raw matrix handed over
    n = TRAIN.stop - TRAIN.start
    assert pooled.shape == (3 * n, D)
    for i in range(3):  # exact rotations: every seed lands on the reference seed's rows
        torch.testing.assert_close(pooled[i * n:(i + 1) * n], seeds[0][TRAIN], atol=2e-5,
                                   rtol=0)


def _batch(tokens: torch.Tensor) -> TokenBatch:
    return TokenBatch(tokens, tokens != 0, "test")


def test_rows_that_do_not_correspond_are_refused_with_the_mismatch_named():
    tokens = torch.randint(1, 9, (4, 6), generator=torch.Generator().manual_seed(0))
    check_row_alignment({0: _batch(tokens), 1: _batch(tokens.clone())}, "x")  # the same: fine
    with pytest.raises(PolymorphError, match=r"seed 3 has 3 sequences x 6 positions, seed 0 "
                                             r"has 4 x 6"):
        check_row_alignment({0: _batch(tokens), 3: _batch(tokens[:3])}, "x")
    longer = torch.cat([tokens, torch.ones(4, 1, dtype=tokens.dtype)], dim=1)
    with pytest.raises(PolymorphError, match="different token batches"):
        check_row_alignment({0: _batch(tokens), 1: _batch(longer)}, "x")
    shifted = tokens.clone()
    shifted[0, 0] = 1 if shifted[0, 0] != 1 else 2
    with pytest.raises(PolymorphError, match=r"seed 2's tokens differ from seed 0's at 1 of 24"):
        check_row_alignment({0: _batch(tokens), 2: _batch(shifted)}, "x")
    padded = tokens.clone()
    padded[1, -1] = 0
    with pytest.raises(PolymorphError, match="keeps different positions"):
        check_row_alignment({0: _batch(tokens), 1: _batch(padded)}, "x")
    with pytest.raises(PolymorphError, match=r"seed 5's activations are \(9, 4\), seed 0's "
                                             r"\(10, 4\)"):
        check_aligned_matrices({0: torch.zeros(10, 4), 5: torch.zeros(9, 4)}, "site")
