"""Training on planted sparse data: loss, EV, sparsity, decoder norms, seeds, determinism."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE

from polymorph.sae import (
    SAETrainConfig,
    ShuffledMinibatches,
    build_training_sae,
    evaluate_sae,
    resolve_init_seed,
    train_sae,
)

from .conftest import BASE, TOPK


def _mean(values):
    return sum(values) / len(values)


def test_relu_loss_decreases(relu_trained):
    _, info, cfg = relu_trained
    history = info["loss_history"]
    assert len(history) == info["steps"] == cfg.steps
    assert _mean(history[-10:]) < 0.25 * _mean(history[:10])
    assert not info["stopped_early"]
    assert info["samples_seen"] == cfg.steps * cfg.batch_size
    assert info["fit_seconds"] > 0


@pytest.mark.parametrize(("fixture", "min_ev"), [("relu_trained", 0.9), ("topk_trained", 0.6)])
def test_reconstructs_planted_data(fixture, min_ev, planted, request):
    sae, _, _ = request.getfixturevalue(fixture)
    metrics = evaluate_sae(sae, planted)
    assert metrics["ev_published"] > min_ev
    assert metrics["ev_standard"] > min_ev


@pytest.mark.parametrize("fixture", ["relu_trained", "topk_trained"])
def test_returns_inference_sae_with_unit_norm_decoder_rows(fixture, request):
    sae, info, cfg = request.getfixturevalue(fixture)
    assert isinstance(sae, SAE) and not isinstance(sae, TrainingSAE)
    assert sae.cfg.architecture() == {"relu_l1": "standard", "topk": "topk"}[cfg.architecture]
    assert tuple(sae.W_dec.shape) == (info["d_sae"], info["d_in"]) == (8 * 16, 16)
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert sae.cfg.metadata.model_name == "toy-seed0"


def test_topk_l0_at_most_k(topk_trained, planted):
    sae, _, cfg = topk_trained
    with torch.no_grad():
        active = (sae.encode(planted) != 0).sum(dim=1)
    assert int(active.max()) <= cfg.k
    assert evaluate_sae(sae, planted)["l0"] <= cfg.k


def test_l1_coefficient_controls_sparsity(relu_trained, planted):
    weak, _, _ = relu_trained
    strong, _ = train_sae(
        planted,
        SAETrainConfig.from_dict({**BASE, "l1_coefficient": 0.3}),
        init_seed=0,
        hook_name="h",
        model_name="m",
        progress_bar=False,
    )
    assert evaluate_sae(strong, planted)["l0"] < 0.5 * evaluate_sae(weak, planted)["l0"]


def test_initial_weights_depend_only_on_the_init_seed():
    cfg = SAETrainConfig.from_dict(BASE)
    rng_before = torch.get_rng_state()
    a = build_training_sae(cfg, 16, init_seed=3, hook_name="h", model_name="m").state_dict()
    torch.manual_seed(999)  # the global RNG state must not matter
    b = build_training_sae(cfg, 16, init_seed=3, hook_name="h2", model_name="m2").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.set_rng_state(rng_before)
    build_training_sae(cfg, 16, init_seed=3, hook_name="h", model_name="m")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched


def test_per_model_init_differs_between_model_seeds_and_shared_does_not():
    per_model = SAETrainConfig.from_dict({**BASE, "init_seed": "per_model"})
    shared = SAETrainConfig.from_dict(BASE)

    def w_dec(cfg, model_seed):
        seed = resolve_init_seed(cfg, model_seed)
        return build_training_sae(cfg, 16, init_seed=seed, hook_name="h", model_name="m").W_dec

    assert not torch.equal(w_dec(per_model, 0), w_dec(per_model, 1))
    assert torch.equal(w_dec(shared, 0), w_dec(shared, 1))


def test_training_is_reproducible_and_seeded(planted):
    cfg = SAETrainConfig.from_dict({**BASE, "steps": 15})

    def run(cfg, init_seed=0):
        sae, _ = train_sae(
            planted, cfg, init_seed=init_seed, hook_name="h", model_name="m", progress_bar=False
        )
        return sae.W_dec.detach()

    first = run(cfg)
    assert torch.equal(first, run(cfg))
    other_data = SAETrainConfig.from_dict({**BASE, "steps": 15, "data_seed": 1})
    assert not torch.equal(first, run(other_data))
    assert not torch.equal(first, run(cfg, init_seed=1))


def test_minibatches_cover_each_epoch_once_and_follow_the_seed():
    rows = torch.arange(10, dtype=torch.float32)[:, None]
    order = torch.cat(list(ShuffledMinibatches(rows, batch_size=4, steps=5, seed=0)))[:, 0]
    assert order.shape == (20,)
    assert sorted(order[:10].tolist()) == list(range(10))
    assert sorted(order[10:].tolist()) == list(range(10))
    again = torch.cat(list(ShuffledMinibatches(rows, batch_size=4, steps=5, seed=0)))[:, 0]
    other = torch.cat(list(ShuffledMinibatches(rows, batch_size=4, steps=5, seed=1)))[:, 0]
    assert torch.equal(order, again) and not torch.equal(order, other)
    big = list(ShuffledMinibatches(rows, batch_size=25, steps=2, seed=0))  # batch > n rows
    assert [b.shape[0] for b in big] == [25, 25]


def test_trainer_does_not_litter_the_working_directory(planted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SAETrainConfig.from_dict({**TOPK, "steps": 2})
    train_sae(planted, cfg, init_seed=0, hook_name="h", model_name="m", progress_bar=False)
    assert list(tmp_path.iterdir()) == []


def test_max_time_stops_early(planted):
    cfg = SAETrainConfig.from_dict({**BASE, "steps": 100_000})
    sae, info = train_sae(
        planted,
        cfg,
        init_seed=0,
        hook_name="h",
        model_name="m",
        progress_bar=False,
        max_time={"seconds": 1},
    )
    assert info["stopped_early"] and 0 < info["steps"] < cfg.steps
    assert len(info["loss_history"]) == info["steps"]
    assert isinstance(sae, SAE)


@pytest.mark.parametrize(
    ("acts", "needle"),
    [
        (torch.zeros(10, 4, dtype=torch.float64), "float32"),
        (torch.zeros(10), "matrix"),
        (torch.zeros(0, 4), "matrix"),
        ([[0.0] * 4] * 10, "torch.Tensor"),
        (torch.full((10, 4), float("nan")), "NaN"),
    ],
)
def test_bad_activations(acts, needle):
    cfg = SAETrainConfig.from_dict(BASE)
    with pytest.raises(ValueError, match=needle):
        train_sae(acts, cfg, init_seed=0, hook_name="h", model_name="m")


def test_k_larger_than_dictionary():
    cfg = SAETrainConfig.from_dict({**TOPK, "k": 100, "expansion": 2})
    with pytest.raises(ValueError, match="d_sae=32"):
        train_sae(torch.zeros(10, 16), cfg, init_seed=0, hook_name="h", model_name="m")
