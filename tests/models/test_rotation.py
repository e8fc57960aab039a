"""Issue test (d): a function-preserving rotation of a HookedTransformer's residual stream."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from polymorph.align.haar import haar_orthogonal
from polymorph.align.procrustes import fit_rotation
from polymorph.models.rotation import fold_norm_gains, rotate_residual_stream

SITES = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
         "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")  # 5 distinct tensors


def _toy(dtype: torch.dtype = torch.float64, **overrides) -> HookedTransformer:
    """The project's toy architecture with random non-unit gains and non-zero biases."""
    kwargs = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 16, "d_mlp": 256,
              "d_vocab": 40, "d_vocab_out": 51, "n_ctx": 64, "act_fn": "relu",
              "normalization_type": "RMS", "positional_embedding_type": "standard",
              "dtype": dtype}
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.copy_(0.25 + 1.5 * torch.rand_like(p))
            elif ".b_" in name:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def _run(model: HookedTransformer, tokens: torch.Tensor):
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_resid" in n)
    return logits, cache


@pytest.fixture(scope="module")
def pair():
    model = _toy()
    q = haar_orthogonal(64, "O", seed=3)
    rotated = rotate_residual_stream(model, q)
    tokens = torch.randint(0, 40, (6, 64), generator=torch.Generator().manual_seed(1))
    return model, rotated, q, tokens, _run(model, tokens), _run(rotated, tokens)


def test_logits_are_unchanged(pair):
    *_, (logits, _), (logits_rot, _) = pair
    torch.testing.assert_close(logits_rot, logits, atol=1e-10, rtol=0)


def test_residual_stream_is_rotated_at_every_site(pair):
    _, _, q, _, (_, cache), (_, cache_rot) = pair
    for site in SITES:
        torch.testing.assert_close(cache_rot[site], cache[site] @ q, atol=1e-10, rtol=0)
        assert not torch.allclose(cache_rot[site], cache[site], atol=1e-2)


def test_fit_recovers_the_planted_rotation(pair):
    _, _, q, _, (_, cache), (_, cache_rot) = pair
    for site in ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"):
        rot = fit_rotation(cache[site].reshape(-1, 64), cache_rot[site].reshape(-1, 64))
        assert torch.linalg.norm(rot.matrix - q) < 1e-8


def test_input_model_is_untouched_and_config_kept(pair):
    model, rotated, *_ = pair
    fresh = _toy()
    for (name, p), (_, p0) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, p0), name
    assert rotated.cfg.normalization_type == "RMS"
    assert all(torch.equal(p, torch.ones_like(p))
               for n, p in rotated.named_parameters() if n.endswith(".w"))


def test_float32_model_matches_to_float_precision():
    model = _toy(torch.float32)
    q = haar_orthogonal(64, "SO", seed=5)
    rotated = rotate_residual_stream(model, q.float())
    tokens = torch.randint(0, 40, (4, 64), generator=torch.Generator().manual_seed(2))
    (logits, cache), (logits_rot, cache_rot) = _run(model, tokens), _run(rotated, tokens)
    torch.testing.assert_close(logits_rot, logits, atol=1e-4, rtol=1e-4)
    site = "blocks.1.hook_resid_post"
    torch.testing.assert_close(cache_rot[site], (cache[site].double() @ q).float(), atol=1e-4,
                               rtol=1e-4)


def test_rotations_compose_and_gains_fold():
    model = _toy(n_layers=1)
    q1, q2 = haar_orthogonal(64, seed=1), haar_orthogonal(64, seed=2)
    twice = rotate_residual_stream(rotate_residual_stream(model, q1), q2)
    folded = fold_norm_gains(model)
    tokens = torch.randint(0, 40, (2, 64), generator=torch.Generator().manual_seed(3))
    (logits, cache), (logits2, cache2) = _run(model, tokens), _run(twice, tokens)
    torch.testing.assert_close(logits2, logits, atol=1e-10, rtol=0)
    site = "blocks.0.hook_resid_post"
    torch.testing.assert_close(cache2[site], cache[site] @ q1 @ q2, atol=1e-10, rtol=0)
    torch.testing.assert_close(folded(tokens), logits, atol=1e-10, rtol=0)


def test_rotary_attention_is_supported():
    model = _toy(n_layers=1, positional_embedding_type="rotary", rotary_dim=16)
    q = haar_orthogonal(64, seed=4)
    tokens = torch.randint(0, 40, (2, 64), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(rotate_residual_stream(model, q)(tokens), model(tokens),
                               atol=1e-10, rtol=0)


def test_bad_models_and_matrices_are_rejected():
    model = _toy(n_layers=1)
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate_residual_stream(model, torch.ones(64, 64))
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        rotate_residual_stream(model, torch.eye(32))
    with pytest.raises(ValueError, match="LN"):
        rotate_residual_stream(_toy(n_layers=1, normalization_type="LN"), torch.eye(64))
    with pytest.raises(TypeError, match="HookedTransformer"):
        rotate_residual_stream(torch.nn.Linear(64, 64), torch.eye(64))


def test_the_project_dyck_model_rotates_exactly():
    dyck = pytest.importorskip("polymorph.models.dyck")
    torch.manual_seed(0)
    model = dyck.build_dyck_transformer().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.copy_(0.5 + torch.rand_like(p))
    q = haar_orthogonal(64, "O", seed=8)
    rotated = rotate_residual_stream(model, q)
    tokens = torch.randint(0, 40, (4, 64), generator=torch.Generator().manual_seed(5))
    (logits, cache), (logits_rot, cache_rot) = _run(model, tokens), _run(rotated, tokens)
    torch.testing.assert_close(logits_rot, logits, atol=1e-4, rtol=1e-4)
    acts = cache["blocks.1.hook_resid_post"].reshape(-1, 64)
    acts_rot = cache_rot["blocks.1.hook_resid_post"].reshape(-1, 64)
    assert torch.linalg.norm(fit_rotation(acts, acts_rot).matrix - q) < 1e-3
