"""lm_function_match and lm_steering on tiny local PolyPythias, through the real pipeline.

Two tiny GPT-NeoX seeds (tests/pythia_tiny.py) are recorded with ``train()`` and analysed with
``build_context`` once per module; the planted cases swap in the anchor's own model (and an
identity rotation) for the other seed, where every cross-seed number must equal its within one.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch

from polymorph.align.procrustes import Rotation, fit_rotation
from polymorph.analysis.lm_function_match import LMFunctionMatch, kl_sum
from polymorph.analysis.lm_steering import LMSteering
from polymorph.errors import PolymorphError
from tests.conftest import CONF_DIR, compose, pythia_overrides

SITE = "blocks.1.hook_resid_post"
# Prompts over the tiny tokenizer's words (any word it does not know would become <unk>).
TINY_SETS = {
    "mood": {
        "description": "happy vs sad words",
        "positive": ["alice is happy and good", "the cat is great", "bob was happy",
                     "eve is very happy"],
        "negative": ["alice is sad and bad", "the cat is terrible", "bob was sad",
                     "eve is very sad"],
    },
    "size": {
        "description": "big vs small",
        "positive": ["the big old house", "a big city", "ten big trees"],
        "negative": ["the small new house", "a small city", "two small trees"],
    },
}


@pytest.fixture(scope="module")
def lm_context(pythia_runs, tiny_pythia, tmp_path_factory):
    """(analysis config, context) over the session's tiny PolyPythia seeds 1 and 2."""
    from polymorph.analysis.context import build_context

    root, _ = pythia_runs
    cfg = compose(pythia_overrides(tiny_pythia, root, analysis=True), config_name="analyze")
    out = tmp_path_factory.mktemp("pythia_lm_analysis")
    return cfg, build_context(cfg, root, out, show_progress=False)


def planted_same_model(ctx, model=None):
    """The context with seed 2 replaced by the anchor's model (or ``model`` for both) and every
    rotation the identity: seed 2 *is* the anchor, in the anchor's frame."""
    model = ctx.models[ctx.anchor] if model is None else model
    eye = {}
    for key, rot in ctx.rotations.items():
        d = rot.d
        eye[key] = Rotation(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                            torch.zeros(d, dtype=torch.float64))
    return dataclasses.replace(ctx, models={s: model for s in ctx.seeds}, rotations=eye)


def reading_along(model, direction: torch.Tensor, scale: float = 2.0):
    """A copy of ``model`` whose unembedding also reads ``direction`` (after the final LayerNorm
    centres it): a model that is sensitive along that direction, as a trained one is along the
    directions its data vary in. Random-init tiny models read every direction alike."""
    planted = copy.deepcopy(model)
    u = direction.double() - direction.double().mean()
    u = (u / u.norm()).float()
    w = torch.randn(planted.W_U.shape[1], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        planted.unembed.W_U += scale * torch.outer(u, w)
    return planted


def ones_fixing_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal Q [d, d] (float64) with Q 1 = 1: it commutes with LayerNorm's
    centring, and the tiny models' LayerNorms are still at their init (weight 1, bias 0), so
    rotating the residual stream by Q leaves every LayerNorm equivariant."""
    g = torch.Generator().manual_seed(seed)
    one = torch.ones(d, 1, dtype=torch.float64) / d**0.5
    start = torch.cat([one, torch.randn(d, d - 1, generator=g, dtype=torch.float64)], dim=1)
    basis = torch.linalg.qr(start)[0][:, 1:]  # orthonormal basis of 1's complement
    m = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=g, dtype=torch.float64))[0]
    return one @ one.T + basis @ m @ basis.T


def rotate_residual(model, q: torch.Tensor):
    """METHOD.md's planted rotation: writers into the residual stream times Q on the right,
    readers times Q^T on the left. Same function, residual activations x Q."""
    new, q = copy.deepcopy(model), q.float()
    with torch.no_grad():
        new.embed.W_E.copy_(new.embed.W_E @ q)
        for block in new.blocks:
            for name in ("W_Q", "W_K", "W_V"):
                w = getattr(block.attn, name)
                w.copy_(torch.einsum("ed,hdk->hek", q.T, w))
            block.attn.W_O.copy_(block.attn.W_O @ q)
            block.attn.b_O.copy_(block.attn.b_O @ q)
            block.mlp.W_in.copy_(q.T @ block.mlp.W_in)
            block.mlp.W_out.copy_(block.mlp.W_out @ q)
            block.mlp.b_out.copy_(block.mlp.b_out @ q)
        new.unembed.W_U.copy_(q.T @ new.unembed.W_U)
    return new


@pytest.fixture(scope="module")
def rotated_twin(lm_context):
    """(context, Q): seed 1 = the anchor made sensitive along the mood vector, seed 2 = the same
    model with its residual stream rotated by Q, and the rotation between them fitted on the fit
    batch as build_context does."""
    _, ctx = lm_context
    for block in ctx.models[ctx.anchor].blocks:  # the planted rotation needs LayerNorms at init
        assert torch.all(block.ln1.w == 1) and torch.all(block.ln1.b == 0)
    vec = LMSteering(site=SITE, prompt_sets=TINY_SETS).build_vectors(ctx)["mood"].direction
    base = reading_along(ctx.models[ctx.anchor], vec)
    q = ones_fixing_rotation(base.cfg.d_model)
    twin = rotate_residual(base, q)
    fitted = fit_rotation(ctx.collect(twin, "fit", [SITE])[SITE],
                          ctx.collect(base, "fit", [SITE])[SITE])
    planted = dataclasses.replace(ctx, models={1: base, 2: twin},
                                  rotations={**ctx.rotations, (1, 2, SITE): fitted})
    return planted, q


# -- lm_function_match ------------------------------------------------------------------------


def test_pythia_lm_kl_matches_two_log_softmaxes():
    """The cached-reference KL formula against the textbook one, past one row slice."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(700, 90, generator=g) * 4, torch.randn(700, 90, generator=g) * 4
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    direct = float((lp.exp() * (lp - lq)).sum())
    assert kl_sum(p, q) == pytest.approx(direct, rel=1e-6)
    assert kl_sum(p, p) == 0.0


def test_pythia_lm_function_match_self_is_zero_kl_full_agreement(lm_context):
    _, ctx = lm_context
    result = LMFunctionMatch().run(planted_same_model(ctx))
    (pair,) = result["pairs"]
    assert pair["pair"] == [1, 2]
    assert pair["top1_agreement"] == 1.0
    assert pair["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert pair["loss_a"] == pair["loss_b"]
    # every kept position compared; the loss skips each window's last position (no next token)
    n_windows = ctx.tokens["eval"].shape[0]
    assert pair["n_positions"] == int(ctx.masks["eval"].sum())
    assert result["seeds"]["1"]["n_loss_positions"] == pair["n_positions"] - n_windows


def test_pythia_lm_function_match_two_seeds(lm_context, tmp_path):
    _, ctx = lm_context
    cb = LMFunctionMatch()
    result = cb.run(ctx)
    (pair,) = result["pairs"]
    assert 0.0 <= pair["top1_agreement"] < 1.0  # independent random seeds
    assert pair["mean_kl"] > 0
    vocab = ctx.models[1].cfg.d_vocab
    for seed in ("1", "2"):  # untrained models: about the uniform distribution's loss
        assert abs(result["seeds"][seed]["loss"] - math.log(vocab)) < 1.0
    for key in ("top1_agreement", "mean_kl", "loss", "positions"):
        assert key in result["definitions"]
    # loss agrees with a direct, unbatched computation on the anchor
    tokens, mask = ctx.tokens["eval"], ctx.masks["eval"]
    with torch.no_grad():
        logp = torch.log_softmax(ctx.models[1](tokens).double(), -1)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert result["seeds"]["1"]["loss"] == pytest.approx(float(nll[mask[:, :-1]].mean()), rel=1e-5)
    scalars = cb.scalars(result)
    assert scalars["min_top1_agreement"] == pair["top1_agreement"]
    assert "seed2/loss" in scalars
    assert len(cb.tables(result)["lm_function_match_pairs"][1]) == 1
    (fig,) = cb.figures(ctx, result, tmp_path)
    assert fig.is_file()
    assert "lm_function_match" in cb.report(ctx, result, [fig])


def test_pythia_lm_function_match_rotated_twin_computes_the_same_function(rotated_twin):
    ctx, q = rotated_twin
    assert ctx.rotation(1, 2, SITE).matrix == pytest.approx(q.T, abs=1e-4)  # recovered
    (pair,) = LMFunctionMatch().run(ctx)["pairs"]
    assert pair["top1_agreement"] > 0.999
    assert pair["mean_kl"] < 1e-8
    assert pair["loss_a"] == pytest.approx(pair["loss_b"], rel=1e-6)


# -- lm_steering ------------------------------------------------------------------------------


def test_pythia_lm_steering_planted_same_model_transfers_cleanly(lm_context):
    """Seed 2 is the anchor, made sensitive along the mood vector: cross == rotated == within,
    ratio 1, the within effect grows with alpha and beats the random control."""
    _, ctx = lm_context
    cb = LMSteering(site=SITE, prompt_sets=TINY_SETS, n_sequences=16)
    vec = cb.build_vectors(ctx)["mood"].direction
    planted = planted_same_model(ctx, reading_along(ctx.models[ctx.anchor], vec))
    result = cb.run(planted)
    mood = result["sets"]["mood"]
    within = mood["within"]["effect"]
    assert all(b > a for a, b in itertools.pairwise(within)), within
    assert all(w > r for w, r in zip(within, mood["within"]["random_effect"]))
    (row,) = mood["cross"]
    assert row["cross_effect"] == within  # the same model with the same vector
    assert row["rotated_effect"] == pytest.approx(within, rel=1e-9)  # identity rotation
    assert row["random_effect"] == mood["within"]["random_effect"]
    assert row["cross_ratio"] == pytest.approx([1.0] * 4)
    assert row["rotated_ratio"] == pytest.approx([1.0] * 4)
    assert row["cos_raw_rotated"] == pytest.approx(1.0)
    assert row["regime_cross"] == row["regime_rotated"] == "clean"
    assert mood["summary"]["regime_cross_counts"] == {"clean": 1}


def test_pythia_lm_steering_rotated_twin_needs_the_rotation(rotated_twin):
    """The paper's claim on planted ground truth: the same function in a rotated basis. The raw
    vector misses on the twin; moved by the fitted rotation it does what it does on the anchor."""
    ctx, _ = rotated_twin
    cb = LMSteering(site=SITE, prompt_sets={"mood": TINY_SETS["mood"]}, n_sequences=16)
    mood = cb.run(ctx)["sets"]["mood"]
    within = mood["within"]["effect"]
    (row,) = mood["cross"]
    assert row["rotated_effect"] == pytest.approx(within, rel=1e-3)
    assert row["rotated_ratio"] == pytest.approx([1.0] * 4, rel=1e-3)
    assert all(c < 0.5 * w for c, w in zip(row["cross_effect"], within))
    assert row["regime_rotated"] == "clean" and row["regime_cross"] != "clean"
    assert abs(row["cos_raw_rotated"]) < 0.5


def test_pythia_lm_steering_two_seeds_outputs(lm_context, tmp_path):
    """Two independent seeds, the tiny-vocabulary sets: effects grow with the dose everywhere."""
    _, ctx = lm_context
    cb = LMSteering(site=SITE, prompt_sets=TINY_SETS, n_sequences=8)
    result = cb.run(ctx)
    assert result["site"] == SITE and result["seeds"] == [2]
    assert result["n_positions"] == int(ctx.masks["eval"][:8].sum())
    mean_norm = float(ctx.acts["eval"][1][SITE].double().norm(dim=1).mean())
    for entry in result["sets"].values():
        assert entry["norm"] > 0
        assert entry["relative_norm"] == pytest.approx(entry["norm"] / mean_norm)
        within = entry["within"]["effect"]
        assert all(b > a > 0 for a, b in itertools.pairwise(within)), within
        (row,) = entry["cross"]
        for kind in ("cross", "rotated", "random"):
            effect = row[f"{kind}_effect"]
            assert all(b > a > 0 for a, b in itertools.pairwise(effect)), (kind, effect)
        assert row["cross_ratio"][1] == pytest.approx(row["cross_effect"][1] / within[1])
        assert row["regime_cross"] in ("clean", "partial", "inverted", "no_transfer", "none")
    for key in ("vector", "steering", "effect", "rotated_effect", "random_effect", "regime",
                "relative_norm"):
        assert key in result["definitions"]
    scalars = cb.scalars(result)
    assert "mood/relative_norm" in scalars and "size/mean_rotated_ratio" in scalars
    tables = cb.tables(result)
    assert len(tables["lm_steering_effects"][1]) == 2 * 4 * (2 + 3)
    (fig,) = cb.figures(ctx, result, tmp_path)
    assert fig.is_file()
    text = cb.report(ctx, result, [fig])
    assert "lm_steering" in text and "big vs small" in text


def test_pythia_lm_steering_preset_node_with_english_prompts(lm_context):
    """The polypythia preset's callback node, prompts from conf/steering_prompts/english.yaml.

    Most English words are <unk> to the tiny tokenizer, so a minimal pair can give v = 0: that
    must come out as zero effects, no ratio and regime 'none', not as an error or a NaN.
    """
    from hydra.utils import instantiate

    cfg, ctx = lm_context
    cb = instantiate(cfg.analysis.callbacks.lm_steering, n_sequences=4, alphas=[1.0])
    assert set(cb.prompt_sets) == {"sentiment", "names", "magnitudes"}
    result = cb.run(ctx)
    for entry in result["sets"].values():
        (row,) = entry["cross"]
        if entry["norm"] == 0:
            assert entry["within"]["effect"] == [0.0] and row["cross_ratio"] == [None]
            assert row["regime_cross"] == "none"
        else:
            assert entry["within"]["effect"][0] > 0


def test_pythia_lm_steering_errors(lm_context):
    _, ctx = lm_context
    with pytest.raises(PolymorphError, match="not an analysis site"):
        LMSteering(site="blocks.1.hook_resid_mid", prompt_sets=TINY_SETS).run(ctx)
    with pytest.raises(PolymorphError, match="no negative prompts"):
        LMSteering(site=SITE, prompt_sets={"x": {"positive": ["a cat"], "negative": []}})
    with pytest.raises(PolymorphError, match="empty"):
        LMSteering(site=SITE, prompt_sets={})
    for bad in ("", "cat"):  # nothing at all / nothing after the skipped first position
        sets = {"x": {"positive": ["the cat", bad], "negative": ["the dog"]}}
        with pytest.raises(PolymorphError, match="tokenises to"):
            LMSteering(site=SITE, prompt_sets=sets).run(ctx)


def test_pythia_steering_prompts_english_sets_are_balanced():
    from omegaconf import OmegaConf

    sets = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "steering_prompts" / "english.yaml"))
    assert set(sets) == {"sentiment", "names", "magnitudes"}
    for name, spec in sets.items():
        assert spec["description"].strip(), name
        pos, neg = spec["positive"], spec["negative"]
        assert 12 <= len(pos) <= 20 and len(pos) == len(neg), name
        assert len(set(pos)) == len(pos) and not set(pos) & set(neg), name
        words = [sum(len(p.split()) for p in side) / len(side) for side in (pos, neg)]
        assert abs(words[0] - words[1]) <= 0.15 * max(words), (name, words)
