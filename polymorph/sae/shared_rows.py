"""The seeds' rows side by side: checking that they correspond, and pooling them in one frame.

A shared dictionary is trained on every seed's activations on the same inputs: row i of every
seed's matrix must be the same token in the same context. The token batches are compared
directly (a family whose seeds tokenise differently, or specs that differ, would give rows that
do not correspond even at equal counts), then the matrices' shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout


def check_row_alignment(batches: dict[int, Any], what: str) -> None:
    """Refuse seeds whose token batches differ: their activation rows would not correspond.

    ``batches``: seed -> TokenBatch, all built from one spec. Names the first seed that differs
    from the first one and how (number or length of sequences, kept positions, tokens).
    """
    items = list(batches.items())
    ref_seed, ref = items[0]
    for seed, batch in items[1:]:
        if tuple(batch.tokens.shape) != tuple(ref.tokens.shape):
            raise PolymorphError(
                f"{what}: seed {seed} has {batch.tokens.shape[0]} sequences x "
                f"{batch.tokens.shape[1]} positions, seed {ref_seed} has "
                f"{ref.tokens.shape[0]} x {ref.tokens.shape[1]}: different token batches, so "
                "their activation rows do not correspond; give every seed the same batch spec")
        if not torch.equal(batch.mask, ref.mask):
            diff = int((batch.mask != ref.mask).sum())
            raise PolymorphError(
                f"{what}: seed {seed} keeps different positions from seed {ref_seed} ({diff} of "
                f"{ref.mask.numel()} differ): rows do not correspond")
        if not torch.equal(batch.tokens, ref.tokens):
            diff = int((batch.tokens != ref.tokens).sum())
            raise PolymorphError(
                f"{what}: seed {seed}'s tokens differ from seed {ref_seed}'s at {diff} of "
                f"{ref.tokens.numel()} positions (e.g. different tokenizers): rows do not "
                "correspond; use one tokenizer for every seed (family.tokenizer=...)")


def check_aligned_matrices(acts: dict[int, torch.Tensor], where: str) -> None:
    """Refuse activation matrices of the seeds that do not have the same rows and width."""
    items = list(acts.items())
    ref_seed, ref = items[0]
    for seed, x in items[1:]:
        if tuple(x.shape) != tuple(ref.shape):
            raise PolymorphError(
                f"{where}: seed {seed}'s activations are {tuple(x.shape)}, seed {ref_seed}'s "
                f"{tuple(ref.shape)}: their rows do not correspond (different token batches or "
                "lengths); recompute them from one batch spec (delete the seeds' activations/ "
                "folders and rerun)")



def pool_into_frame(acts: dict[int, torch.Tensor], maps: list, seeds: list[int]) -> torch.Tensor:
    """The seeds' rows mapped into the consensus frame, stacked seed after seed [S n, d].

    ``acts`` is emptied as it goes (each seed's matrix is released once mapped), so the peak is
    the pool plus one seed's matrix, not twice the pool.
    """
    first = acts[seeds[0]]
    n, d = first.shape
    pooled = torch.empty(len(seeds) * n, d, dtype=torch.float32)
    for i, (seed, rotation) in enumerate(zip(seeds, maps, strict=True)):
        x = acts.pop(seed)
        pooled[i * n:(i + 1) * n] = rotation.apply(x.float())
        del x
    return pooled



def cache_matches(run: RunLayout, site: str, identity: dict[str, str]) -> bool:
    """Whether ``site``'s activation cache exists with this record (as sae.cache reads it)."""
    from safetensors import safe_open

    path = run.activation_file(site)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable cache is recomputed by sae.cache
        return False
    return all(stored.get(k) == v for k, v in identity.items())

