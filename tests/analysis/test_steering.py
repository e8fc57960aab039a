"""steering: result structure on the smoke runs, and a planted rotation as ground truth.

One steering run covers the structural and the planted tests: the smoke context (anchor 0,
seed 1) plus a third "seed" that is the anchor with its residual stream rotated by a Haar Q
(same function, activations x Q). Steering that copy with the rotated vector must reproduce the
anchor's own effect exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch

SITE = "blocks.1.hook_resid_post"
ALPHAS = [0.0, 1.0, 4.0]
PLANTED = 99  # the seed id of the rotated copy of the anchor
N_SEQUENCES = 64  # steer the first 64 eval sequences: enough targets, a fast test


def _small_null_cfg(cfg):
    """A copy of the analysis config with a small Haar null (the test needs no precise p-values)."""
    cfg = copy.deepcopy(cfg)
    cfg.analysis.haar_null_samples = 64
    return cfg


@pytest.fixture(scope="module")
def planted_context(smoke_context):
    from polymorph.activations import collect_activations
    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.procrustes import fit_rotation
    from polymorph.models.rotation import rotate_residual_stream

    ctx, anchor = smoke_context, smoke_context.anchor
    d = ctx.acts["fit"][anchor][SITE].shape[1]
    q = haar_orthogonal(d, "O", seed=7)
    model = rotate_residual_stream(ctx.models[anchor], q).eval()
    # The planted model really is the anchor in another basis (checked on a few sequences).
    few = ctx.tokens["eval"][:8]
    mine = collect_activations(model, few, [SITE])[SITE]
    theirs = collect_activations(ctx.models[anchor], few, [SITE])[SITE]
    assert torch.allclose(mine.double(), theirs.double() @ q, atol=1e-4)

    acts = {
        batch: {**per_seed, PLANTED: {s: (per_seed[anchor][s].double() @ q).float()
                                      for s in ctx.sites}}
        for batch, per_seed in ctx.acts.items()
    }
    rotations = dict(ctx.rotations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank-deficient resid_pre: expected
        for site in ctx.sites:
            rotations[(anchor, PLANTED, site)] = fit_rotation(
                acts["fit"][PLANTED][site], acts["fit"][anchor][site], group=ctx.group)
    return dataclasses.replace(
        ctx, cfg=_small_null_cfg(ctx.cfg), seeds=[*ctx.seeds, PLANTED],
        models={**ctx.models, PLANTED: model}, acts=acts, rotations=rotations,
        pairs=[*ctx.pairs, (anchor, PLANTED)], saes={**ctx.saes, PLANTED: {}})


@pytest.fixture(scope="module")
def result(planted_context):
    from polymorph.analysis.steering import Steering

    cb = Steering(site=SITE, alphas=ALPHAS, random_seed=0, n_sequences=N_SEQUENCES)
    return cb.run(planted_context)


def _built(result):
    return {n: e for n, e in result["vectors"].items() if not e["skipped"]}


def test_site_must_be_an_analysis_site(smoke_context):
    from polymorph.analysis.steering import Steering
    from polymorph.errors import PolymorphError

    with pytest.raises(PolymorphError, match="blocks.1.hook_resid_post"):
        Steering(site="blocks.0.hook_resid_mid").run(smoke_context)


def test_bad_arguments_are_rejected():
    from polymorph.analysis.steering import Steering

    with pytest.raises(ValueError, match="non-empty"):
        Steering(alphas=[])
    with pytest.raises(ValueError, match="reference_alpha"):
        Steering(alphas=[1.0, 2.0], reference_alpha=3.0)
    assert Steering(alphas=[0.5, 2.0, 4.0]).reference_alpha == 0.5


def test_every_documented_key_for_every_vector_alpha_and_seed(result, planted_context):
    from polymorph.analysis.steering import REGIMES, VECTORS

    json.dumps(result)  # JSON-serialisable as it is
    assert set(result["vectors"]) == set(VECTORS)
    assert result["alphas"] == ALPHAS and result["reference_alpha"] == 1.0
    assert result["n_sequences"] == N_SEQUENCES
    built = _built(result)
    assert {"suppress_invalid", "closer"} <= set(built), result["skipped"]
    n = len(ALPHAS)
    for name, entry in built.items():
        assert entry["norm"] > 0 and entry["n_plus"] > 0 and entry["n_minus"] > 0
        assert entry["n_targets"] > 0
        within = entry["within"]
        for key in ("accuracy", "effect", "random_accuracy", "random_effect"):
            assert len(within[key]) == n, (name, key)
        assert [row["seed"] for row in entry["cross"]] == [1, PLANTED]
        for row in entry["cross"]:
            for kind in ("raw", "rotated", "random"):
                assert len(row[f"{kind}_accuracy"]) == n and len(row[f"{kind}_effect"]) == n
            for kind in ("raw", "rotated"):
                assert len(row[f"{kind}_ratio"]) == n
                assert row[f"regime_{kind}"] in REGIMES
            assert 0.0 <= row["fixed_overlap"] <= 1.0 + 1e-9
            assert -1.0 - 1e-9 <= row["cos_raw_rotated"] <= 1.0 + 1e-9
            assert isinstance(row["fixed_dim_estimate"], int)
        for key in ("within_effect", "mean_raw_ratio", "mean_rotated_ratio",
                    "regime_raw_counts", "regime_rotated_counts"):
            assert key in entry["summary"]
    for key in ("vectors", "effect", "raw_effect", "rotated_effect", "random_effect", "regime",
                "fixed_overlap", "cos_raw_rotated"):
        assert key in result["definitions"]
    for name in VECTORS:
        assert result["vectors"][name]["head"] in result["definitions"]["vectors"][name]


def test_alpha_zero_changes_nothing(result):
    for entry in _built(result).values():
        assert entry["within"]["effect"][0] == 0.0
        assert entry["within"]["random_effect"][0] == 0.0
        for row in entry["cross"]:
            assert row["raw_effect"][0] == row["rotated_effect"][0] == 0.0
            assert row["raw_ratio"][0] is None  # 0 / 0 is no ratio


def test_planted_rotation_transfers_exactly_once_rotated(result):
    active = 0
    raw_gap = 0.0
    for name, entry in _built(result).items():
        within = entry["within"]
        row = next(r for r in entry["cross"] if r["seed"] == PLANTED)
        tol = 1.0 / entry["n_targets"] + 1e-12  # at most one near-tie argmax may flip
        assert row["baseline_accuracy"] == pytest.approx(within["baseline_accuracy"], abs=tol)
        for i, effect in enumerate(within["effect"]):
            assert row["rotated_effect"][i] == pytest.approx(effect, abs=tol), (name, i)
            raw_gap += abs(row["raw_effect"][i] - effect)
            if abs(effect) > 0.05:
                active += 1
                assert row["rotated_ratio"][i] == pytest.approx(1.0, abs=tol / abs(effect))
        if entry["summary"]["regime_raw_counts"].get("none") is None:
            assert row["regime_rotated"] == "clean", name
    assert active > 0, "no vector moved the anchor: the planted test would be vacuous"
    assert raw_gap > 0.05, "the raw vector behaved like the rotated one under a Haar Q"


def test_regime_rule_on_planted_dose_responses():
    from polymorph.analysis.steering import classify_regime

    alphas = [0.5, 1.0, 2.0, 4.0]
    within = [0.1, 0.3, 0.6, 0.8]
    quiet = [0.0, 0.01, 0.02, 0.05]

    def regime(cross, random_within=quiet, w=within):
        return classify_regime(alphas, w, cross, random_within, reference_alpha=1.0)

    assert regime([0.1, 0.28, 0.6, 0.8]) == "clean"
    assert regime([0.0, 0.05, 0.1, 0.35]) == "partial"  # reaches 0.3 only at alpha 4
    assert regime([0.0, 0.05, 0.1, 0.2]) == "no_transfer"
    assert regime([0.5, 0.9, 0.9, 0.9]) == "inverted"
    assert regime([0.1, 0.28, 0.6, 0.8], random_within=[0.1, 0.3, 0.5, 0.7]) == "none"
    assert regime([0.0] * 4, w=[0.0, 0.005, 0.01, 0.02]) == "none"


def test_build_vectors_is_a_difference_of_means_and_skips_empty_groups():
    from polymorph.analysis.steering import build_vectors

    # rows: depth 4 valid, depth 4 valid, depth 5 valid, depth 4 invalid; tokens ( ( ( )
    labels = {"tok": torch.tensor([3, 3, 3, 4]), "depth": torch.tensor([4, 4, 5, 4]),
              "valid": torch.tensor([0, 0, 0, 1])}
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0], [0.0, -1.0]])
    vectors, skipped = build_vectors(acts, labels)
    # depth 5 minus depth 4: (2, 5) - mean((1,0), (3,0), (0,-1)) = (2, 5) - (4/3, -1/3)
    assert torch.allclose(vectors["depth_4_to_5"].direction,
                          torch.tensor([2 - 4 / 3, 5 + 1 / 3], dtype=torch.float64))
    assert vectors["depth_4_to_5"].sign == 1
    # invalid & depth 4 minus valid & depth 4: (0, -1) - (2, 0)
    assert torch.allclose(vectors["suppress_invalid"].direction,
                          torch.tensor([-2.0, -1.0], dtype=torch.float64))
    assert vectors["suppress_invalid"].sign == -1
    assert torch.allclose(vectors["closer"].direction,
                          torch.tensor([0.0 - 2.0, -1.0 - 5 / 3], dtype=torch.float64))
    _, skipped = build_vectors(acts[:2], {k: v[:2] for k, v in labels.items()})
    assert set(skipped) == {"depth_4_to_5", "suppress_invalid", "closer"}
    with pytest.raises(ValueError, match="same"):
        build_vectors(acts[:3], labels)


def test_overlap_and_cosine_on_a_planted_fixed_plane():
    from polymorph.align.procrustes import Rotation
    from polymorph.align.transfer import transfer_vector
    from polymorph.analysis.steering import cosine, fixed_overlap

    # R fixes e0, e1 and rotates the e2-e3 plane by 90 degrees.
    r = torch.eye(4, dtype=torch.float64)
    r[2:, 2:] = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    p = torch.zeros(4, 4, dtype=torch.float64)
    p[0, 0] = p[1, 1] = 1.0
    v = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert fixed_overlap(v, p) == pytest.approx(1 / math.sqrt(2))
    rot = Rotation(matrix=r, source_mean=torch.zeros(4), target_mean=torch.zeros(4))
    moved = transfer_vector(v, rot.inverse())  # v R^T = (1, 0, 0, 1)
    assert cosine(v, moved) == pytest.approx(0.5)


def test_figures_report_scalars_tables(result, planted_context, tmp_path):
    from polymorph.analysis.steering import Steering

    cb = Steering(site=SITE, alphas=ALPHAS)
    figures = cb.figures(planted_context, result, tmp_path)
    assert figures and all(p.is_file() and p.stat().st_size > 1000 for p in figures)
    text = cb.report(planted_context, result, figures)
    assert text.startswith("## ")
    assert f"(figures/{figures[0].name})" in text
    for name in _built(result):
        assert name in text
    scalars = cb.scalars(result)
    assert scalars and all(isinstance(v, float) for v in scalars.values())
    for name, (cols, rows) in cb.tables(result).items():
        assert rows, name
        assert all(len(row) == len(cols) for row in rows)
