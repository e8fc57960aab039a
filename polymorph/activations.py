"""Residual-stream activations at named sites, at the positions a mask keeps.

The Dyck task keeps every non-PAD position (the default mask); a language model's text
windows keep every position but the first few (see ``polymorph.token_batches``).
Rows are ordered by sequence, then position, so two models run on the same
tokens give row-aligned matrices: row i of seed A and row i of seed B are the
same token in the same context (what Procrustes needs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from polymorph.tasks.dyck import PAD, generate_training_tokens


class SiteError(ValueError):
    pass


def analysis_tokens(n_sequences: int, seed: int, min_len: int = 2, max_len: int = 48) -> torch.Tensor:
    """A fixed batch from the training generator (METHOD.md: lengths 2..48), same for every model."""
    return generate_training_tokens(
        n_sequences, torch.Generator().manual_seed(seed), min_len=min_len, max_len=max_len
    )


def residual_hook_names(model: HookedTransformer) -> list[str]:
    return [name for name in model.hook_dict if "hook_resid" in name]


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
    batch_size: int = 512,
    mask: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Activations [n_kept_positions, d] per site, fp32 on CPU.

    ``mask`` [n, seq] marks the positions kept (default: the Dyck task's non-PAD positions).
    Batches of ``batch_size`` sequences bound the memory of the forward pass.
    """
    check_sites(model, sites)
    model.eval()
    device = next(model.parameters()).device
    if mask is None:
        mask = tokens != PAD
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"activations": acts.contiguous()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_activations(path: Path) -> torch.Tensor:
    return load_file(str(path))["activations"]
