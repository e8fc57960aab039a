import torch

from polymorph.models.dyck import (
    N_OUTPUTS,
    PUBLISHED_TRAINABLE_PARAMETERS,
    build_dyck_transformer,
    count_trainable_parameters,
    positional_code,
    residual_sites,
    split_logits,
)
from polymorph.tasks.dyck import HEAD_SIZES, HEADS


def test_trainable_parameter_count_matches_the_published_model():
    model = build_dyck_transformer()
    assert count_trainable_parameters(model) == PUBLISHED_TRAINABLE_PARAMETERS
    # 2,560 + 2 x 49,280 + 64 + 3,264, as itemised in METHOD.md
    assert 2560 + 2 * 49280 + 64 + 3264 == PUBLISHED_TRAINABLE_PARAMETERS


def test_biases_are_zero_and_frozen_and_positional_code_is_fixed():
    model = build_dyck_transformer()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("b_"):
            assert not p.requires_grad and torch.count_nonzero(p) == 0, name
    w_pos = model.pos_embed.W_pos
    assert not w_pos.requires_grad
    assert torch.equal(w_pos, positional_code(64, 64))
    assert torch.count_nonzero(w_pos[:, 6:]) == 0
    assert w_pos[0, 3] == 1 and torch.count_nonzero(w_pos[1:, 3]) == 0  # is-BOS


def test_init_is_n_0_002():
    torch.manual_seed(0)
    model = build_dyck_transformer()
    assert abs(model.embed.W_E.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.W_in.std().item() - 0.02) < 0.001


def test_split_is_40_9_2_in_head_order():
    logits = torch.arange(N_OUTPUTS).float().expand(2, 3, N_OUTPUTS)
    parts = split_logits(logits)
    assert list(parts) == list(HEADS)
    assert [parts[h].shape[-1] for h in HEADS] == [40, 9, 2]
    assert [HEAD_SIZES[h] for h in HEADS] == [40, 9, 2]
    assert parts["depth"][0, 0, 0] == 40 and parts["valid"][0, 0, -1] == 50


def test_standard_hook_names_work():
    model = build_dyck_transformer()
    sites = residual_sites(2)
    assert len(sites) == 5
    tokens = torch.tensor([[1, 3, 4, 2]])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    for site in sites + ["blocks.1.hook_resid_pre"]:
        assert cache[site].shape == (1, 4, 64)
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
