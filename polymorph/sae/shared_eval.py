"""Reading dictionaries over many rows in bounded memory: codes and reconstructions chunk by
chunk, and explained variance accumulated over the chunks.

At the PolyPythia shape a code matrix is 4,096 latents per row (~1 GB for 65k rows in
float32), so nothing here holds one whole: an SAE or a crosscoder is applied ``batch_size``
rows at a time and the caller keeps only what it needs (sums, counts, a reconstruction of the
width of the input).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from polymorph.align.ladders import decoder_evenness
from polymorph.align.statistics import EVSums, ev_from_sums

DEFAULT_BATCH_SIZE = 4096


@torch.no_grad()
def sae_chunks(sae, x: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, codes [b, d_sae], x_hat [b, d])`` of a sae-lens SAE over ``x``'s rows, float32
    on the CPU."""
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=sae.device, dtype=sae.dtype)
        codes = sae.encode(xb)
        yield start, codes.float().cpu(), sae.decode(codes).float().cpu()


@torch.no_grad()
def crosscoder_chunks(crosscoder, acts: list[torch.Tensor],
                      batch_size: int = DEFAULT_BATCH_SIZE
                      ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, codes [b, m], x_hat [b, S, d])`` of a crosscoder over the seeds' aligned rows
    (``acts``: S matrices [n, d]); only one [b, S, d] chunk is stacked at a time."""
    for start in range(0, acts[0].shape[0], batch_size):
        chunk = torch.stack([a[start:start + batch_size] for a in acts], dim=1)
        codes = crosscoder.encode(chunk.to(crosscoder.W_enc.dtype))
        yield start, codes.float(), crosscoder.decode_stacked(codes).float()


@dataclass
class RunningEV:
    """Sums for both explained variances of one reconstructed matrix, added chunk by chunk.

    Sums are float64 around a fixed shift (the first chunk's grand mean, which neither
    definition sees), so chunking changes the result only by rounding.
    """

    d: int
    n: float = 0.0
    shift: float | None = None
    sum_x: torch.Tensor = field(init=False)
    sum_sq: torch.Tensor = field(init=False)
    sse: float = 0.0

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.d, dtype=torch.float64)

    def update(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        x64, r64 = x.detach().double().cpu(), x_hat.detach().double().cpu()
        if self.shift is None:
            self.shift = float(x64.mean())
        xs = x64 - self.shift
        self.n += x64.shape[0]
        self.sum_x += xs.sum(0)
        self.sum_sq += (xs * xs).sum(0)
        self.sse += float((r64 - x64).pow(2).sum())

    def sums(self) -> EVSums:
        """The totals as one unit of :class:`~polymorph.align.statistics.EVSums`."""
        return EVSums(n=torch.tensor([self.n], dtype=torch.float64),
                      sum_x=self.sum_x[None].clone(), sum_sq=self.sum_sq[None].clone(),
                      sse=torch.tensor([self.sse], dtype=torch.float64))

    def values(self) -> dict[str, float]:
        """``ev_published`` and ``ev_standard`` over every row added."""
        return {k: float(v.reshape(())) for k, v in ev_from_sums(self.sums()).items()}


@torch.no_grad()
def crosscoder_metrics(crosscoder, acts: list[torch.Tensor], seeds: list[int],
                       batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """Per-seed EV (both definitions), L0 and dead fraction of the shared code, and how evenly
    each latent's decoder is spread over the seeds, on the rows given (encoded in batches)."""
    n = acts[0].shape[0]
    evs = [RunningEV(acts[0].shape[1]) for _ in acts]
    fires = torch.zeros(crosscoder.cfg.d_latent, dtype=torch.float64)
    active = 0.0
    for start, codes, x_hat in crosscoder_chunks(crosscoder, acts, batch_size):
        on = codes != 0
        fires += on.sum(0, dtype=torch.float64)
        active += float(on.sum())
        for i, a in enumerate(acts):
            evs[i].update(x_hat[:, i], a[start:start + codes.shape[0]])
    live = fires > 0
    evenness = decoder_evenness(crosscoder.decoder_norms())
    return {
        "per_seed": {str(s): evs[i].values() for i, s in enumerate(seeds)},
        "l0": active / n,
        "dead_fraction": float((~live).double().mean()),
        "decoder_evenness": float(evenness[live].mean()) if live.any() else float("nan"),
        "n_rows": int(n),
        "definitions": {
            "per_seed": "ev_published / ev_standard of each seed's reconstruction from the "
                        "shared code (polymorph.align.metrics)",
            "l0": "mean over rows of the number of non-zero latents of the shared code",
            "dead_fraction": "fraction of latents zero on every row",
            "decoder_evenness": "mean over live latents of min_s / max_s of the latent's decoder "
                                "norms over the seeds (1: even, 0: some seed lacks it)",
        },
        "evaluated_on": "the seeds' SAE-training activations (the rows it was trained on)",
    }
