"""function_match: one callback for both families' readouts, on planted ground truth."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from polymorph.align.outputs import kl_rows
from polymorph.analysis.function_match import FunctionMatch
from tests.helpers.planted import identity_rotations, ones_fixing_rotation, rotate_lm_residual


def test_dyck_heads_on_every_batch(smoke_context, tmp_path):
    cb = FunctionMatch(heldout_sequences=64)
    result = cb.run(smoke_context)
    assert result["heads"] == ["tok", "depth", "valid"]
    assert result["batches"] == ["eval", "compositional", "long"]
    (pair,) = result["pairs"]
    for name in result["batches"]:
        for head in result["heads"]:
            v = pair[name][head]
            assert 0.0 <= v["argmax_agreement"] <= 1.0 and v["mean_kl"] >= 0.0
            assert v["n_positions"] > 0
            for key in ("argmax_agreement", "mean_kl"):
                ci = v[f"{key}_ci"]
                assert ci["ci_low"] <= v[key] <= ci["ci_high"] and ci["resampled"] == "sequences"
    assert result["summary"]["eval/tok/mean_argmax_agreement_ci"]["resampled"] == \
        "pairs+sequences"
    assert pair["eval"]["tok"]["n_positions"] == smoke_context.batches["eval"].n_rows
    for seed in ("0", "1"):
        assert 0.0 <= result["seeds"][seed]["long"]["depth"]["accuracy"] <= 1.0


def test_same_model_agrees_everywhere_with_zero_kl(smoke_context):
    ctx = smoke_context
    same = dataclasses.replace(ctx, models={s: ctx.models[ctx.anchor] for s in ctx.seeds},
                               rotations=identity_rotations(ctx))
    result = FunctionMatch(heldout_sequences=32).run(same)
    for name in result["batches"]:
        for head in result["heads"]:
            assert result["pairs"][0][name][head]["argmax_agreement"] == 1.0
            assert result["pairs"][0][name][head]["mean_kl"] == pytest.approx(0.0, abs=1e-12)


def test_kl_rows_match_two_log_softmaxes():
    """The cached-reference KL formula against the textbook one, past one row slice."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(700, 90, generator=g) * 4, torch.randn(700, 90, generator=g) * 4
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    direct = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(kl_rows(p, q), direct, rtol=1e-6)
    assert kl_rows(p, p).abs().max() == 0.0


def test_lm_two_seeds_and_their_own_loss(lm_context):
    ctx = lm_context
    result = FunctionMatch().run(ctx)
    assert result["heads"] == ["next_token"] and result["batches"] == ["eval"]
    (pair,) = result["pairs"]
    v = pair["eval"]["next_token"]
    assert 0.0 <= v["argmax_agreement"] < 1.0 and v["mean_kl"] > 0  # independent random seeds
    assert v["n_positions"] == ctx.batches["eval"].n_rows
    vocab = ctx.models[1].cfg.d_vocab
    own = result["seeds"]["1"]["eval"]["next_token"]
    assert abs(own["loss"] - math.log(vocab)) < 1.0  # untrained: about the uniform's loss
    # each window's last position has no next token
    assert own["n_positions"] == v["n_positions"] - ctx.batches["eval"].n_sequences
    tokens, mask = ctx.batches["eval"].tokens, ctx.batches["eval"].mask
    with torch.no_grad():
        logp = torch.log_softmax(ctx.models[1](tokens).double(), -1)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert own["loss"] == pytest.approx(float(nll[mask[:, :-1]].mean()), rel=1e-5)


def test_lm_rotated_twin_computes_the_same_function(lm_context):
    ctx = lm_context
    base = ctx.models[ctx.anchor]
    twin = rotate_lm_residual(base, ones_fixing_rotation(base.cfg.d_model))
    planted = dataclasses.replace(ctx, models={1: base, 2: twin})
    v = FunctionMatch().run(planted)["pairs"][0]["eval"]["next_token"]
    assert v["argmax_agreement"] > 0.999 and v["mean_kl"] < 1e-8
