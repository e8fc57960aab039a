"""Residual-stream activations at named sites, at the positions a mask keeps.

Which positions give rows is the model family's choice (its token batches carry a mask: every
non-PAD position of a Dyck sequence; every position but the first few of a text window).
Rows are ordered by sequence, then position, so two models run on the same
tokens give row-aligned matrices: row i of seed A and row i of seed B are the
same token in the same context (what Procrustes needs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from polymorph.files import save_tensors


class SiteError(ValueError):
    pass


def residual_hook_names(model: HookedTransformer) -> list[str]:
    return [name for name in model.hook_dict if "hook_resid" in name]


def distinct_residual_sites(model: HookedTransformer) -> list[str]:
    """The distinct residual-stream tensors: resid_pre of block 0, then resid_mid (absent when
    attention and MLP run in parallel) and resid_post of every block (resid_pre of block l+1
    is resid_post of block l)."""
    sites = ["blocks.0.hook_resid_pre"]
    for layer in range(model.cfg.n_layers):
        if not getattr(model.cfg, "parallel_attn_mlp", False):
            sites.append(f"blocks.{layer}.hook_resid_mid")
        sites.append(f"blocks.{layer}.hook_resid_post")
    return [s for s in sites if s in model.hook_dict]


def check_sites(model: HookedTransformer, sites: list[str]) -> None:
    """Raise a SiteError listing the valid residual sites if any site is unknown."""
    unknown = [s for s in sites if s not in model.hook_dict]
    if unknown:
        raise SiteError(
            f"unknown site(s) {unknown}; this model's residual sites are: "
            f"{', '.join(residual_hook_names(model))} (any TransformerLens hook name of the model works)"
        )
    if not sites:
        raise SiteError("no sites configured; set sites=[blocks.0.hook_resid_pre,...]")


@torch.no_grad()
def collect_activations(
    model: HookedTransformer,
    tokens: torch.Tensor,
    sites: list[str],
    *,
    mask: torch.Tensor,
    batch_size: int = 512,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Activations [n_kept_positions, d] per site, fp32 on CPU.

    ``mask`` [n, seq] marks the positions kept (a family's ``TokenBatch.mask``). Batches of
    ``batch_size`` sequences bound the memory of the forward pass.
    """
    check_sites(model, sites)
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, desc="activations", unit="batch", disable=not progress, leave=False):
        batch = tokens[start : start + batch_size]
        keep = mask[start : start + batch_size]
        # causal model: positions after the last kept one never change the kept ones
        width = int(keep.cumsum(1).argmax(1).max()) + 1
        batch, keep = batch[:, :width], keep[:, :width]
        _, cache = model.run_with_cache(batch.to(device), names_filter=lambda n: n in chunks)
        for site in sites:
            chunks[site].append(cache[site][keep.to(device)].float().cpu())
    return {s: torch.cat(c) for s, c in chunks.items()}


def save_activations(path: Path, acts: torch.Tensor, metadata: dict[str, str]) -> None:
    save_tensors(path, {"activations": acts}, metadata)


def load_activations(path: Path) -> torch.Tensor:
    return load_file(str(path))["activations"]
