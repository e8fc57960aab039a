"""The SAE-training activations of one run, cached in its run folder.

Activations are recomputable from the run's model and its token batch, so the cache is only a
speed-up: each site's file records what determines it (the batch settings and the checkpoint),
and a file whose record differs from the current one, or that cannot be read, is recomputed.
"""

from __future__ import annotations

import logging

import torch
from safetensors import safe_open

from polymorph.activations import collect_activations, load_activations, save_activations
from polymorph.files import parse_dtype
from polymorph.layout import RunLayout

log = logging.getLogger(__name__)


def cached_activations(layout: RunLayout, model, tokens: torch.Tensor, mask: torch.Tensor,
                       sites: list[str], identity: dict[str, str], *, dtype: str = "float32",
                       batch_size: int = 512, progress: bool = False) -> dict[str, torch.Tensor]:
    """float32 activations [n_rows, d] per site, from the cache where its record matches
    ``identity``, else collected from ``model`` on ``tokens`` / ``mask`` and stored at
    ``dtype`` (float16 halves the disk at d=512; the values used are the stored ones)."""
    store = parse_dtype(dtype, "activations.dtype")
    out, missing = {}, []
    for site in sites:
        path = layout.activation_file(site)
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    stored = f.metadata() or {}
                if all(stored.get(k) == v for k, v in identity.items()):
                    out[site] = load_activations(path).float()
                    continue
            except Exception as err:  # noqa: BLE001 - an unreadable cache is recomputed
                log.warning("activation cache %s unreadable (%s): recomputing it", path, err)
        missing.append(site)
    if missing:
        fresh = collect_activations(model, tokens, missing, mask=mask, batch_size=batch_size,
                                    progress=progress)
        for site, acts in fresh.items():
            stored = acts.to(store)
            save_activations(layout.activation_file(site), stored, {**identity, "site": site})
            out[site] = stored.float()
    return {s: out[s] for s in sites}
