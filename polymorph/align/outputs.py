"""Comparing two models' output distributions row by row (pure functions).

Every output-level measure polymorph reports (do two seeds predict the same class, how far a
steering vector or a spliced-in SAE moves a model) is a per-row quantity summed over rows:

* argmax agreement of two logit matrices;
* ``KL(p || q)`` of their softmaxes, in nats;
* cross-entropy of logits against target classes (rows without a target are skipped).

Rows are returned one value each, so callers can sum them per sequence and resample whole
sequences for intervals. Vocabulary-sized logits (50k classes) are processed in row slices,
so a float64 copy of the whole matrix never exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per float64 slice: 512 x 50k classes x 8 bytes ~ 200 MB per temporary.
ROW_SLICE = 512


def _slices(n: int, size: int = ROW_SLICE):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


class KLReference:
    """The softmax p of reference logits z, kept for many ``KL(p || softmax(y))``.

    ``KL(p || q) = sum_v p_v (z_v - y_v) - lse(z) + lse(y)``: caching p and ``lse(z)`` (float64)
    leaves one logsumexp and one weighted sum per comparison, half the work of two full
    log-softmaxes. ``z - y`` is taken in float32 before the cast, exact up to one rounding of
    the difference itself.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        if logits.ndim != 2:
            raise ValueError(f"logits must be [rows, classes], got {tuple(logits.shape)}")
        self.logits = logits
        self.p, self.lse = [], []
        for sl in _slices(logits.shape[0]):
            z = logits[sl].double()
            lse = torch.logsumexp(z, dim=-1)
            self.lse.append(lse)
            self.p.append((z - lse[:, None]).exp_())

    def kl_rows(self, other: torch.Tensor) -> torch.Tensor:
        """float64 [rows]: ``KL(p_row || softmax(other_row))`` in nats."""
        if other.shape != self.logits.shape:
            raise ValueError(f"logits of shape {tuple(other.shape)} vs the reference's "
                             f"{tuple(self.logits.shape)}")
        out = []
        for i, sl in enumerate(_slices(other.shape[0])):
            y = other[sl].to(self.logits.device)
            cross = (self.p[i] * (self.logits[sl] - y).double()).sum(-1)
            out.append((cross - self.lse[i] + torch.logsumexp(y.double(), dim=-1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def argmax(self) -> torch.Tensor:
        return self.logits.argmax(-1).cpu()


def kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """float64 [rows]: ``KL(softmax(p) || softmax(q))`` per row, in nats."""
    return KLReference(logits_p).kl_rows(logits_q)


def agreement_rows(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """float64 [rows]: 1 where both argmax classes agree, else 0."""
    return (logits_a.argmax(-1).cpu() == logits_b.argmax(-1).cpu()).double()


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore: int = -100
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (cross-entropy in nats, 1 if the argmax is the target, 1 if the row has a
    target); all float64 [rows], 0 where ``targets == ignore``."""
    has = targets != ignore
    ce = torch.zeros(targets.shape[0], dtype=torch.float64)
    correct = torch.zeros_like(ce)
    for sl in _slices(logits.shape[0]):
        t = targets[sl].to(logits.device)
        ok = has[sl].to(logits.device)
        lp = F.log_softmax(logits[sl].double(), dim=-1)
        safe = torch.where(ok, t, torch.zeros_like(t))
        nll = -lp.gather(1, safe[:, None])[:, 0]
        ce[sl] = torch.where(ok, nll, torch.zeros_like(nll)).cpu()
        correct[sl] = ((lp.argmax(-1) == t) & ok).double().cpu()
    return ce, correct, has.double()


def per_sequence(values: torch.Tensor, row_sequences: torch.Tensor, n_sequences: int
                 ) -> torch.Tensor:
    """float64 [n_sequences]: ``values`` [rows] summed over the rows of each sequence."""
    out = torch.zeros(n_sequences, dtype=torch.float64)
    return out.index_add_(0, row_sequences, values.double())
