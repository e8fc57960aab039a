"""Planted ground truth: a seed that is another seed with its residual stream rotated."""

from __future__ import annotations

import shutil


def plant_rotated_seed(src_root, src_name: str, dst_root, dst_name: str, sites, seed: int = 7,
                       q_seed: int = 11):
    """Experiment ``dst_name``: seed 0 of ``src_name`` plus seed ``seed`` = seed 0 with its
    residual stream rotated by a known Haar Q (function-preserving), every SAE moved along.

    Returns Q. Ground truth for every rotated metric: it must equal its within-seed value.
    """
    import torch

    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.procrustes import Rotation
    from polymorph.align.transfer import transfer_sae
    from polymorph.checkpoints import save_weights
    from polymorph.families.dyck import DyckFamily
    from polymorph.layout import RunLayout
    from polymorph.models.rotation import rotate_residual_stream
    from polymorph.sae.io import load_sae, save_sae

    src = RunLayout.for_seed(src_root, src_name, 0)
    shutil.copytree(src.root, RunLayout.for_seed(dst_root, dst_name, 0).root)
    rotated = RunLayout.for_seed(dst_root, dst_name, seed)
    shutil.copytree(src.root, rotated.root)
    model = DyckFamily().load(src)
    d = model.cfg.d_model
    q = haar_orthogonal(d, "O", seed=q_seed).double()
    save_weights(rotate_residual_stream(model, q), rotated.best)
    # the rotated seed's SAEs: seed 0's, rewritten to read its frame (x_rot = x_0 Q)
    to_anchor = Rotation(matrix=q.T, source_mean=torch.zeros(d), target_mean=torch.zeros(d))
    for site in sites:
        for folder in (src.saes / site).iterdir():
            saved = load_sae(folder)
            save_sae(transfer_sae(saved.sae, to_anchor), rotated.saes / site / folder.name,
                     metadata=saved.metadata, metrics=saved.metrics)
    return q


def identity_rotations(ctx):
    """Every rotation of ``ctx`` replaced by the identity (for a seed that *is* the anchor)."""
    import torch

    from polymorph.align.procrustes import Rotation

    out = {}
    for key, rot in ctx.rotations.items():
        d = rot.d
        out[key] = Rotation(torch.eye(d, dtype=torch.float64),
                            torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))
    return out


def reading_along(model, direction, scale: float = 2.0):
    """A copy of a language ``model`` whose unembedding also reads ``direction`` (after the
    final LayerNorm centres it): a model that is sensitive along that direction, as a trained
    one is along the directions its data vary in. Random-init tiny models read every direction
    alike."""
    import copy

    import torch

    planted = copy.deepcopy(model)
    u = direction.double() - direction.double().mean()
    u = (u / u.norm()).float()
    w = torch.randn(planted.W_U.shape[1], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        planted.unembed.W_U += scale * torch.outer(u, w)
    return planted


def ones_fixing_rotation(d: int, seed: int = 0):
    """A random orthogonal Q [d, d] (float64) with Q 1 = 1: it commutes with LayerNorm's
    centring, and the tiny models' LayerNorms are still at their init (weight 1, bias 0), so
    rotating the residual stream by Q leaves every LayerNorm equivariant."""
    import torch

    g = torch.Generator().manual_seed(seed)
    one = torch.ones(d, 1, dtype=torch.float64) / d**0.5
    start = torch.cat([one, torch.randn(d, d - 1, generator=g, dtype=torch.float64)], dim=1)
    basis = torch.linalg.qr(start)[0][:, 1:]  # orthonormal basis of 1's complement
    m = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=g, dtype=torch.float64))[0]
    return one @ one.T + basis @ m @ basis.T


def rotate_lm_residual(model, q):
    """The planted rotation for a LayerNorm language model at init: writers into the residual
    stream times Q on the right, readers times Q^T on the left. Same function, residual
    activations x Q (docs/method.md, "A planted rotation")."""
    import copy

    import torch

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


def with_rotated_anchor_copy(ctx, seed: int, q_seed: int = 7, q=None):
    """``ctx`` plus ``seed``: the Dyck anchor with its residual stream rotated by a Haar Q (or
    the orthogonal ``q`` given), same function, activations x Q, its activations and fitted
    rotations added. Returns (context, Q)."""
    import dataclasses
    import warnings

    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.procrustes import fit_rotation
    from polymorph.models.rotation import rotate_residual_stream

    anchor = ctx.anchor
    d = ctx.models[anchor].cfg.d_model
    q = haar_orthogonal(d, "O", seed=q_seed) if q is None else q.double()
    model = rotate_residual_stream(ctx.models[anchor], q).eval()
    acts = {batch: {**per_seed, seed: {s: (per_seed[anchor][s].double() @ q).float()
                                       for s in ctx.sites}}
            for batch, per_seed in ctx.acts.items()}
    rotations = dict(ctx.rotations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank-deficient resid_pre: expected
        for site in ctx.sites:
            rotations[(anchor, seed, site)] = fit_rotation(
                acts["fit"][seed][site], acts["fit"][anchor][site], group=ctx.group)
    planted = dataclasses.replace(
        ctx, seeds=[*ctx.seeds, seed], models={**ctx.models, seed: model}, acts=acts,
        rotations=rotations, pairs=[*ctx.pairs, (anchor, seed)], saes={**ctx.saes, seed: {}},
        runs={**ctx.runs, seed: ctx.runs[anchor]},
        run_configs={**ctx.run_configs, seed: ctx.run_configs[anchor]})
    return planted, q


def moved_sae(saved, q):
    """A SavedSAE read from the anchor's frame into the frame x Q (its features unchanged)."""
    import torch

    from polymorph.align.procrustes import Rotation
    from polymorph.align.transfer import transfer_sae
    from polymorph.sae.io import SavedSAE

    d = q.shape[0]
    to_anchor = Rotation(q.T.double(), torch.zeros(d), torch.zeros(d))  # x Q -> x
    return SavedSAE(saved.folder, transfer_sae(saved.sae, to_anchor), saved.metadata,
                    saved.metrics)


def with_unrelated_copy(ctx, seed: int, saes: dict, q_seed: int = 5, perm_seed: int = 0):
    """``ctx`` plus ``seed``: a seed *unrelated* to the anchor point by point. Its activations on
    every batch are the anchor's with the rows permuted at random (over all rows: content and
    position both scrambled) and rotated by a Haar Q, so as a set they are the anchor's
    distribution in another frame, but no row corresponds to the row of the same input. Its
    SAEs are ``saes`` (site -> SavedSAE in the anchor's frame), moved into that frame. Fitted
    rotations are added; its model is the anchor's (for callbacks that only need activations).
    Returns (context, Q)."""
    import dataclasses
    import warnings

    import torch

    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.procrustes import fit_rotation

    a = ctx.anchor
    d = ctx.acts["fit"][a][ctx.sites[0]].shape[1]
    q = haar_orthogonal(d, "O", seed=q_seed)
    g = torch.Generator().manual_seed(perm_seed)
    acts = {}
    for batch, per_seed in ctx.acts.items():
        perm = torch.randperm(per_seed[a][ctx.sites[0]].shape[0], generator=g)
        acts[batch] = {**per_seed, seed: {s: (per_seed[a][s][perm].double() @ q).float()
                                          for s in ctx.sites}}
    rotations = dict(ctx.rotations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for site in ctx.sites:
            rotations[(a, seed, site)] = fit_rotation(acts["fit"][seed][site],
                                                      acts["fit"][a][site], group=ctx.group)
    planted = dataclasses.replace(
        ctx, seeds=[*ctx.seeds, seed], models={**ctx.models, seed: ctx.models[a]}, acts=acts,
        rotations=rotations, pairs=[*ctx.pairs, (a, seed)],
        saes={**ctx.saes, seed: {s: moved_sae(v, q) for s, v in saes.items()}},
        runs={**ctx.runs, seed: ctx.runs[a]}, run_configs={**ctx.run_configs, seed: ctx.run_configs[a]})
    return planted, q
