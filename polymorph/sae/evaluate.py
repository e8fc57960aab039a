"""Quality metrics of one SAE on one activation matrix (no I/O, no training state)."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import SAE

from polymorph.align.metrics import EV_DEFINITIONS, explained_variance

METRIC_DEFINITIONS: dict[str, str] = {
    **EV_DEFINITIONS,
    "mse": "mean over all rows and dimensions of (x_hat - x)^2",
    "l0": "mean over rows of the number of features with a non-zero activation",
    "dead_fraction": "fraction of features that are zero on every row of the evaluated activations",
    "firing_frequency": "per feature: fraction of rows on which its activation is non-zero",
    "n_rows": "number of activation rows evaluated",
}

DEFAULT_EVAL_BATCH_SIZE = 8192


@torch.no_grad()
def evaluate_sae(
    sae: SAE, activations: torch.Tensor, *, batch_size: int = DEFAULT_EVAL_BATCH_SIZE
) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on ``activations`` [n, d_in].

    Returns ``ev_published``, ``ev_standard`` (both from :mod:`polymorph.align.metrics`),
    ``mse``, ``l0``, ``dead_fraction``, ``firing_frequency`` (a list of d_sae floats),
    ``n_rows`` and ``definitions`` (metric name -> exact definition, METRIC_DEFINITIONS).
    "Fires" means a non-zero activation ``sae.encode(x) != 0`` (ReLU and TopK outputs are
    >= 0). Rows are encoded in batches of ``batch_size`` to bound memory; only the
    reconstruction (same size as ``activations``) is kept whole, for the EV definitions.
    The computation is deterministic for a fixed ``batch_size``, so an SAE reloaded from
    disk reproduces these numbers exactly.
    """
    if not isinstance(activations, torch.Tensor) or activations.ndim != 2:
        raise ValueError("activations must be a torch.Tensor matrix [n_rows, d_in]")
    n, d = activations.shape
    if n < 1:
        raise ValueError("activations have no rows: nothing to evaluate")
    if d != sae.cfg.d_in:
        raise ValueError(f"activations have width {d}, the SAE expects d_in={sae.cfg.d_in}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    was_training = sae.training
    sae.eval()
    x_hat = torch.empty(n, d, dtype=torch.float32)
    fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    active_total = 0
    try:
        for start in range(0, n, batch_size):
            x = activations[start : start + batch_size].to(device=sae.device, dtype=sae.dtype)
            feats = sae.encode(x)
            x_hat[start : start + batch_size] = sae.decode(feats).float().cpu()
            active = (feats != 0).cpu()
            fire_counts += active.sum(dim=0, dtype=torch.float64)
            active_total += int(active.sum())
    finally:
        sae.train(was_training)

    x_cpu = activations.detach().float().cpu()
    mse = float((x_hat.double() - x_cpu.double()).pow(2).mean())
    frequency = fire_counts / n
    return {
        **explained_variance(x_hat, x_cpu),
        "mse": mse,
        "l0": active_total / n,
        "dead_fraction": float((fire_counts == 0).double().mean()),
        "firing_frequency": frequency.tolist(),
        "n_rows": int(n),
        "definitions": dict(METRIC_DEFINITIONS),
    }
