"""The 104,448-parameter Dyck-3 transformer, as a TransformerLens HookedTransformer.

Two pre-norm blocks (d_model 64, 4 heads of 16, ReLU MLP of 256), RMSNorm gains
only, no biases, untied embedding, and one 51-way unembedding whose columns are
split 40/9/2 into the ``tok``, ``depth`` and ``valid`` heads. TransformerLens
always creates bias tensors; they stay zero and frozen. The positional code is
a fixed 6-feature function of the position (below), frozen too, so every seed
shares it by construction.
"""

from __future__ import annotations

import math

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from polymorph.tasks.dyck import CONTEXT, HEAD_SIZES, HEADS, VOCAB_SIZE

N_OUTPUTS = sum(HEAD_SIZES.values())  # 51
PUBLISHED_TRAINABLE_PARAMETERS = 104_448
# Weights that map the model's input and output: shared (and frozen) in the
# io=shared cohort.
IO_PARAMETERS = ("embed.W_E", "unembed.W_U")
# Residual coordinates the fixed positional code writes (0..5); every other one is zero there.
N_POSITIONAL_FEATURES = 6


def positional_code(n_ctx: int, d_model: int) -> torch.Tensor:
    """The fixed positional code: only dims 0..5 are non-zero.

    pos/64, 1/(pos+1), log(pos+1)/log(64), is-BOS, cos(2 pi pos/64), sin(2 pi pos/64).
    """
    if d_model < N_POSITIONAL_FEATURES:
        raise ValueError(f"the positional code needs d_model >= {N_POSITIONAL_FEATURES}, got {d_model}")
    pos = torch.arange(n_ctx, dtype=torch.float64)
    code = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    code[:, 0] = pos / 64
    code[:, 1] = 1.0 / (pos + 1)
    code[:, 2] = torch.log(pos + 1) / math.log(64)
    code[:, 3] = (pos == 0).double()
    code[:, 4] = torch.cos(2 * math.pi * pos / 64)
    code[:, 5] = torch.sin(2 * math.pi * pos / 64)
    return code.float()


def build_dyck_transformer(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int = 16,
    d_mlp: int = 256,
    act_fn: str = "relu",
    init_std: float = 0.02,
) -> HookedTransformer:
    """Build the toy model with fresh N(0, init_std^2) weights from torch's global RNG.

    Seed once, centrally (``lightning.seed_everything``) before calling: the
    TransformerLens config ``seed`` is left unset because it reseeds Python,
    NumPy and torch globally.
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        d_vocab=VOCAB_SIZE,
        d_vocab_out=N_OUTPUTS,
        n_ctx=CONTEXT,
        act_fn=act_fn,
        normalization_type="RMS",
        positional_embedding_type="standard",
        init_mode="gpt2",
        initializer_range=init_std,
        eps=1e-5,
        default_prepend_bos=False,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.pos_embed.W_pos.copy_(positional_code(CONTEXT, d_model))
        for name, param in model.named_parameters():
            if _is_bias(name):
                param.zero_()
    freeze_fixed_parameters(model)
    return model


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("b_")


def freeze_fixed_parameters(model: HookedTransformer) -> None:
    """Freeze what the method fixes: every bias (kept at zero) and the positional code."""
    for name, param in model.named_parameters():
        if _is_bias(name) or name == "pos_embed.W_pos":
            param.requires_grad_(False)


def freeze_io_parameters(model: HookedTransformer) -> None:
    """Freeze the embedding and unembedding (the io=shared cohort's non-anchor seeds)."""
    params = dict(model.named_parameters())
    for name in IO_PARAMETERS:
        params[name].requires_grad_(False)


def count_trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split the 51-way output into the three heads' logits (40 / 9 / 2), in HEADS order."""
    if logits.shape[-1] != N_OUTPUTS:
        raise ValueError(f"expected {N_OUTPUTS} output logits, got {logits.shape[-1]}")
    parts = torch.split(logits, [HEAD_SIZES[h] for h in HEADS], dim=-1)
    return dict(zip(HEADS, parts))


def residual_sites(n_layers: int) -> list[str]:
    """The distinct residual-stream tensors: resid_pre of block 0, then resid_mid and
    resid_post of every block (resid_pre of block l+1 is resid_post of block l)."""
    sites = ["blocks.0.hook_resid_pre"]
    for layer in range(n_layers):
        sites += [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_resid_post"]
    return sites
