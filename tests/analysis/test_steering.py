"""steering: one callback for both families, on planted ground truth.

* Dyck: the smoke context plus a "seed" that is the anchor with its residual stream rotated by a
  Haar Q (same function, activations x Q). Steering that copy with the rotated vector must
  reproduce the anchor's own effect exactly; the raw vector must not.
* Language models: two tiny GPT-NeoX seeds; the planted cases make seed 2 the anchor itself, or
  the anchor in a rotated basis.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from polymorph.analysis.steering import REGIMES, Steering, classify_regime
from polymorph.analysis.steering_strategies import (
    HeadAccuracyDrop,
    LabelContrasts,
    NextTokenKL,
    PromptContrasts,
)
from polymorph.errors import PolymorphError
from tests.helpers.config import CONF_DIR
from tests.helpers.planted import (
    identity_rotations,
    ones_fixing_rotation,
    reading_along,
    rotate_lm_residual,
    with_rotated_anchor_copy,
)

SITE = "blocks.1.hook_resid_post"
ALPHAS = [0.0, 1.0, 4.0]
PLANTED = 99  # the seed id of the rotated copy of the anchor
N_SEQUENCES = 64  # steer the first 64 eval sequences: enough targets, a fast test


def dyck_steering(**kwargs) -> Steering:
    args = {"site": SITE, "alphas": ALPHAS, "n_sequences": N_SEQUENCES, "n_boot": 200}
    return Steering(LabelContrasts(), HeadAccuracyDrop(), **{**args, **kwargs})


@pytest.fixture(scope="module")
def planted_context(smoke_context):
    ctx, q = with_rotated_anchor_copy(smoke_context, PLANTED)
    # the planted model really is the anchor in another basis (a few sequences)
    few = ctx.batches["eval"].head(8)
    mine = ctx.collect(ctx.models[PLANTED], "eval", [SITE])[SITE][: few.n_rows]
    theirs = ctx.collect(ctx.models[ctx.anchor], "eval", [SITE])[SITE][: few.n_rows]
    assert torch.allclose(mine.double(), theirs.double() @ q, atol=1e-4)
    return ctx


@pytest.fixture(scope="module")
def result(planted_context):
    return dyck_steering().run(planted_context)


def test_site_must_be_an_analysis_site(smoke_context):
    with pytest.raises(PolymorphError, match="blocks.1.hook_resid_post"):
        dyck_steering(site="blocks.0.hook_resid_mid").run(smoke_context)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        dyck_steering(alphas=[])
    with pytest.raises(ValueError, match="reference_alpha"):
        dyck_steering(alphas=[1.0, 2.0], reference_alpha=3.0)
    with pytest.raises(ValueError, match="margin"):
        dyck_steering(margin=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        dyck_steering(n_boot=50)
    with pytest.raises(ValueError, match="fixed_n_boot"):
        dyck_steering(fixed_n_boot=1)
    with pytest.raises(ValueError, match="reads"):
        Steering(LabelContrasts(), NextTokenKL())
    assert dyck_steering(alphas=[0.5, 2.0, 4.0]).reference_alpha == 0.5


def test_every_vector_alpha_and_seed_has_its_numbers(result):
    json.dumps(result)  # JSON-serialisable as it is
    assert result["alphas"] == ALPHAS and result["reference_alpha"] == 1.0
    assert result["n_sequences"] == N_SEQUENCES and result["vectors_built_on"] == "fit"
    assert {"suppress_invalid", "closer"} <= set(result["vectors"]), result["skipped"]
    n = len(ALPHAS)
    for entry in result["vectors"].values():
        assert entry["norm"] > 0 and entry["n_plus"] > 0 and entry["n_targets"] > 0
        within = entry["within"]
        assert len(within["effect"]) == len(within["effect_ci"]) == n
        assert [row["seed"] for row in entry["cross"]] == [1, PLANTED]
        for row in entry["cross"]:
            for kind in ("raw", "rotated", "random"):
                assert len(row[f"{kind}_effect"]) == n
                for value, ci in zip(row[f"{kind}_effect"][1:], row[f"{kind}_effect_ci"][1:]):
                    assert ci["ci_low"] <= value + 1e-9 and value <= ci["ci_high"] + 1e-9
                    assert ci["mean"] == value and ci["n_boot"] == 200
            for kind in ("raw", "rotated"):
                assert row[f"regime_{kind}"] in REGIMES
                if row[f"regime_{kind}"] == "none":
                    assert row[f"{kind}_ratio"] == [None] * n
            assert -1.0 - 1e-9 <= row["cos_raw_rotated"] <= 1.0 + 1e-9
            assert 0.0 <= row["fixed_overlap"] <= 1.0
            assert row["fixed_overlap_random"] <= row["fixed_overlap_random_q"] <= 1.0
    for seed, fixed in result["fixed_subspaces"].items():  # Haar maps: nothing held in place
        assert fixed["dim_estimate"] == 0 and fixed["count"] <= 1, seed


def test_alpha_zero_changes_nothing(result):
    for entry in result["vectors"].values():
        assert entry["within"]["effect"][0] == 0.0 and entry["within"]["random_effect"][0] == 0.0
        for row in entry["cross"]:
            assert row["raw_effect"][0] == row["rotated_effect"][0] == 0.0
            assert row["raw_ratio"][0] is None  # 0 / 0 is no ratio


def test_planted_rotation_transfers_exactly_once_rotated(result):
    active = 0
    raw_gap = 0.0
    for name, entry in result["vectors"].items():
        within = entry["within"]
        row = next(r for r in entry["cross"] if r["seed"] == PLANTED)
        tol = 1.0 / entry["n_targets"] + 1e-12  # at most one near-tie argmax may flip
        for i, effect in enumerate(within["effect"]):
            assert row["rotated_effect"][i] == pytest.approx(effect, abs=tol), (name, i)
            raw_gap += abs(row["raw_effect"][i] - effect)
            if abs(effect) > 0.05:
                active += 1
                assert row["rotated_ratio"][i] == pytest.approx(1.0, abs=tol / abs(effect))
        if row["regime_rotated"] != "none" and entry["within"]["effect"][1] > 0.05:
            assert row["regime_rotated"] == "clean", name
    assert active > 0, "no vector moved the anchor: the planted test would be vacuous"
    assert raw_gap > 0.05, "the raw vector behaved like the rotated one under a Haar Q"


def test_a_vector_held_in_place_by_the_rotation_is_read_as_such(smoke_context):
    """A twin whose Q fixes the closer vector and 5 random directions (Haar on the rest): the
    near-fixed subspace of the fitted R is those 6 directions, found at the fit's own noise,
    and the closer vector lies in it, far above a random direction's overlap."""
    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.span import complement_basis

    vectors, _ = LabelContrasts().build(smoke_context, SITE, "fit")
    v = vectors["closer"].direction
    g = torch.Generator().manual_seed(0)
    f = torch.linalg.qr(torch.cat([v[:, None], torch.randn(v.shape[0], 5, generator=g,
                                                           dtype=torch.float64)], 1))[0]
    c = complement_basis(f)
    q = f @ f.T + c @ haar_orthogonal(c.shape[1], "SO", seed=1) @ c.T
    ctx, _ = with_rotated_anchor_copy(dataclasses.replace(smoke_context, pairs=[]), PLANTED, q=q)
    result = dyck_steering(alphas=[1.0], n_sequences=16, n_boot=100).run(ctx)
    fixed = result["fixed_subspaces"][str(PLANTED)]
    assert fixed["count"] == 6 and fixed["dim_estimate"] == 6, fixed
    row = next(r for r in result["vectors"]["closer"]["cross"] if r["seed"] == PLANTED)
    assert row["fixed_overlap"] == pytest.approx(1.0, abs=1e-6)
    assert row["fixed_overlap_random"] == pytest.approx(6 / 64)
    assert row["fixed_overlap"] > row["fixed_overlap_random_q"]
    assert result["vectors"]["closer"]["summary"]["fixed_overlap_above_random"] == 1
    text = dyck_steering().report(ctx, result, [])
    assert "closer" in text and "leans on directions both frames share" in text


def test_vectors_come_from_the_fit_batch_not_the_scored_one(planted_context):
    vectors, _ = LabelContrasts().build(planted_context, SITE, "fit")
    on_eval, _ = LabelContrasts().build(planted_context, SITE, "eval")
    for name in vectors:
        assert not torch.equal(vectors[name].direction, on_eval[name].direction)


def test_regime_rule_on_planted_dose_responses():
    alphas = [0.5, 1.0, 2.0, 4.0]
    within = [0.1, 0.3, 0.6, 0.8]
    quiet = [0.0, 0.01, 0.02, 0.05]

    def regime(cross, random_within=quiet, w=within, random_cross=quiet):
        return classify_regime(alphas, w, cross, random_within, random_cross, 1.0,
                               (0.67, 1.5), 0.01)

    assert regime([0.1, 0.28, 0.6, 0.8]) == "clean"
    assert regime([0.0, 0.05, 0.1, 0.35]) == "partial"  # reaches 0.3 only at alpha 4
    assert regime([0.0, 0.05, 0.1, 0.2]) == "no_transfer"
    assert regime([0.5, 0.9, 0.9, 0.9]) == "inverted"
    assert regime([0.1, 0.28, 0.6, 0.8], random_within=[0.1, 0.3, 0.5, 0.7]) == "none"
    assert regime([0.0] * 4, w=[0.0, 0.005, 0.01, 0.02]) == "none"
    # a cross effect no larger than the other seed's own random control is no transfer,
    # however close its ratio to 1 looks
    assert regime([0.1, 0.28, 0.6, 0.8], random_cross=[0.1, 0.3, 0.6, 0.8]) == "no_transfer"


def test_label_contrasts_are_differences_of_means_and_skip_empty_groups():
    from polymorph.analysis.steering_strategies import diff_of_means

    # rows: depth 4 valid, depth 4 valid, depth 5 valid, depth 4 invalid; tokens ( ( ( )
    labels = {"tok": torch.tensor([3, 3, 3, 4]), "depth": torch.tensor([4, 4, 5, 4]),
              "valid": torch.tensor([0, 0, 0, 1])}
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0], [0.0, -1.0]])
    groups = LabelContrasts().groups(labels)
    # depth 5 minus depth 4: (2, 5) - mean((1,0), (3,0), (0,-1)) = (2, 5) - (4/3, -1/3)
    assert torch.allclose(diff_of_means(acts, *groups["depth_4_to_5"]),
                          torch.tensor([2 - 4 / 3, 5 + 1 / 3], dtype=torch.float64))
    # invalid & depth 4 minus valid & depth 4: (0, -1) - (2, 0)
    assert torch.allclose(diff_of_means(acts, *groups["suppress_invalid"]),
                          torch.tensor([-2.0, -1.0], dtype=torch.float64))
    assert torch.allclose(diff_of_means(acts, *groups["closer"]),
                          torch.tensor([0.0 - 2.0, -1.0 - 5 / 3], dtype=torch.float64))
    head, rows = LabelContrasts().target("suppress_invalid", labels)
    assert head == "valid" and rows.tolist() == [False, False, False, True]


def test_figures_report_scalars_tables(result, planted_context, tmp_path):
    cb = dyck_steering()
    figures = cb.figures(planted_context, result, tmp_path)
    assert figures and all(p.is_file() and p.stat().st_size > 1000 for p in figures)
    text = cb.report(planted_context, result, figures)
    assert text.startswith("## ") and f"(figures/{figures[0].name})" in text
    for name in result["vectors"]:
        assert name in text
    scalars = cb.scalars(result)
    assert scalars and all(isinstance(v, float) for v in scalars.values())
    for name, (cols, rows) in cb.tables(result).items():
        assert rows and all(len(row) == len(cols) for row in rows), name


# -- language models ------------------------------------------------------------------------

LM_SITE = "blocks.1.hook_resid_post"
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


def lm_steering(sets=None, **kwargs) -> Steering:
    args = {"site": LM_SITE, "n_sequences": 16, "n_boot": 200}
    return Steering(PromptContrasts(sets or TINY_SETS), NextTokenKL(), **{**args, **kwargs})


def mood_vector(ctx) -> torch.Tensor:
    vectors, _ = PromptContrasts(TINY_SETS).build(ctx, LM_SITE)
    return vectors["mood"].direction


@pytest.fixture(scope="module")
def rotated_twin(lm_context):
    """Seed 1 = the anchor made sensitive along the mood vector, seed 2 = the same model with
    its residual stream rotated by Q, and the rotation between them fitted on the fit batch."""
    from polymorph.align.procrustes import fit_rotation

    ctx = lm_context
    for block in ctx.models[ctx.anchor].blocks:  # the planted rotation needs LayerNorms at init
        assert torch.all(block.ln1.w == 1) and torch.all(block.ln1.b == 0)
    base = reading_along(ctx.models[ctx.anchor], mood_vector(ctx))
    q = ones_fixing_rotation(base.cfg.d_model)
    twin = rotate_lm_residual(base, q)
    fitted = fit_rotation(ctx.collect(twin, "fit", [LM_SITE])[LM_SITE],
                          ctx.collect(base, "fit", [LM_SITE])[LM_SITE])
    planted = dataclasses.replace(ctx, models={1: base, 2: twin},
                                  rotations={**ctx.rotations, (1, 2, LM_SITE): fitted})
    return planted, q


def test_lm_same_model_transfers_cleanly(lm_context):
    """Seed 2 is the anchor, made sensitive along the mood vector: raw == rotated == within,
    ratio 1, the within effect grows with alpha and beats the random control."""
    ctx = lm_context
    model = reading_along(ctx.models[ctx.anchor], mood_vector(ctx))
    planted = dataclasses.replace(ctx, models={s: model for s in ctx.seeds},
                                  rotations=identity_rotations(ctx))
    mood = lm_steering().run(planted)["vectors"]["mood"]
    within = mood["within"]["effect"]
    assert all(b > a for a, b in itertools.pairwise(within)), within
    assert all(w > r for w, r in zip(within, mood["within"]["random_effect"]))
    (row,) = mood["cross"]
    assert row["raw_effect"] == within  # the same model with the same vector
    assert row["rotated_effect"] == pytest.approx(within, rel=1e-9)  # identity rotation
    assert row["random_effect"] == mood["within"]["random_effect"]
    assert row["raw_ratio"] == pytest.approx([1.0] * 4)
    assert row["regime_raw"] == row["regime_rotated"] == "clean"


def test_lm_rotated_twin_needs_the_rotation(rotated_twin):
    """The paper's claim on planted ground truth: the same function in a rotated basis. The raw
    vector misses on the twin; moved by the fitted rotation it does what it does on the anchor."""
    ctx, _ = rotated_twin
    mood = lm_steering({"mood": TINY_SETS["mood"]}).run(ctx)["vectors"]["mood"]
    within = mood["within"]["effect"]
    (row,) = mood["cross"]
    assert row["rotated_effect"] == pytest.approx(within, rel=1e-3)
    assert row["rotated_ratio"] == pytest.approx([1.0] * 4, rel=1e-3)
    assert all(c < 0.5 * w for c, w in zip(row["raw_effect"], within))
    assert row["regime_rotated"] == "clean" and row["regime_raw"] != "clean"
    assert abs(row["cos_raw_rotated"]) < 0.5


def test_lm_family_config_steers_with_the_english_prompts(lm_context, lm_runs, tiny_lm):
    """The pretrained family's steering node, prompts from conf/steering_prompts/english.yaml.

    Most English words are <unk> to the tiny tokenizer, so a minimal pair can give v = 0: that
    must come out as zero effects, regime 'none' and no ratio, not as an error or a NaN."""
    from polymorph.instantiation import build
    from tests.helpers.config import compose, tiny_lm_overrides

    cfg = compose(tiny_lm_overrides(tiny_lm, lm_runs[0], analysis=True), config_name="analyze")
    cb = build(cfg.analysis.callbacks.steering, "steering", n_sequences=4, alphas=[1.0])
    assert set(cb.vectors.prompt_sets) == {"sentiment", "names", "magnitudes"}
    result = cb.run(lm_context)
    for entry in result["vectors"].values():
        (row,) = entry["cross"]
        if entry["norm"] == 0:
            assert entry["within"]["effect"] == [0.0] and row["raw_ratio"] == [None]
            assert row["regime_raw"] == "none"
        else:
            assert entry["within"]["effect"][0] > 0


def test_lm_prompt_errors(lm_context):
    with pytest.raises(PolymorphError, match="no negative prompts"):
        PromptContrasts({"x": {"positive": ["a cat"], "negative": []}})
    with pytest.raises(PolymorphError, match="empty"):
        PromptContrasts({})
    for bad in ("", "cat"):  # nothing at all / nothing after the skipped first position
        sets = {"x": {"positive": ["the cat", bad], "negative": ["the dog"]}}
        with pytest.raises(PolymorphError, match="tokenises to"):
            lm_steering(sets).run(lm_context)


def test_a_dyck_strategy_on_a_language_model_is_refused_before_loading(lm_context):
    with pytest.raises(PolymorphError, match="dyck_heads.*next_token.*~analysis"):
        dyck_steering().check(lm_context.family, "analysis.callbacks.steering")


def test_english_prompt_sets_are_balanced():
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
