"""lm_function_match: do the language-model seeds compute the same function?

The PolyPythias counterpart of :mod:`polymorph.analysis.function_match`. Per pair (a, b), on the
analysis eval batch (``ctx.score_batch``: the fit batch only with ``analysis.score_on=fit``),
corpus windows, at the positions the analysis keeps (``ctx.masks``, i.e. all
but each window's attention-sink position):

* next-token top-1 agreement: the fraction of positions where both seeds' most likely next token
  is the same;
* mean KL(p_a || p_b) between the two next-token distributions (nats);

and, as context, each seed's own next-token loss (cross-entropy against the token that actually
follows) and top-1 accuracy, on the kept positions that have a next token inside the window.

Next-token distributions are 50k-wide, so nothing is held for the whole batch: forwards run
``ctx.batch_size`` windows at a time, at most two seeds' logits are alive at once, and the
float64 log-softmax runs over slices of rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import COLOURS, plt, save

FIGURE_FILE = "lm_function_match.png"
# Rows per float64 log-softmax slice: 512 x 50k vocabulary x 8 bytes ~ 200 MB per tensor.
ROW_SLICE = 512


@torch.no_grad()
def kept_logits(model, tokens: torch.Tensor, mask: torch.Tensor, fwd_hooks=()) -> torch.Tensor:
    """Next-token logits of ``model`` at the kept positions of one chunk: float32 [rows, vocab].

    Rows are ordered by sequence then position (the order of ``collect_activations``).
    ``fwd_hooks``: TransformerLens (hook name, function) pairs active during the forward.
    """
    device = next(model.parameters()).device
    # causal model: positions after the last kept one never change the kept ones
    width = int(mask.cumsum(1).argmax(1).max()) + 1
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        logits = model(tokens[:, :width].to(device))
    return logits[mask[:, :width].to(device)].float()


def next_token_targets(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The token that follows each kept position ([rows], -1 where the window ends)."""
    nxt = torch.full_like(tokens, -1)
    nxt[:, :-1] = tokens[:, 1:]
    return nxt[mask]


def _slices(n: int, size: int = ROW_SLICE):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


class KLReference:
    """The next-token distributions p of some reference logits, kept for many KL(p || q).

    ``KL(p || q) = sum_v p_v (log p_v - log q_v) = sum_v p_v (z_v - y_v) - lse(z) + lse(y)`` for
    logits z (reference) and y: caching p and lse(z) (float64) leaves one float64 logsumexp and
    one weighted sum per comparison, half the work of two full log-softmaxes. ``z - y`` is taken
    in float32 before the cast, exact up to one rounding of the difference itself.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.p, self.lse = [], []
        for sl in _slices(logits.shape[0]):
            z = logits[sl].double()
            lse = torch.logsumexp(z, dim=-1)
            self.lse.append(lse)
            self.p.append((z - lse[:, None]).exp_())

    def kl_sum(self, other: torch.Tensor) -> float:
        """sum over rows of KL(p || softmax(other)) in nats (float64)."""
        if other.shape != self.logits.shape:
            raise ValueError(f"logits of shape {tuple(other.shape)} vs the reference's "
                             f"{tuple(self.logits.shape)}")
        total = 0.0
        for i, sl in enumerate(_slices(other.shape[0])):
            y = other[sl].to(self.logits.device)
            cross = (self.p[i] * (self.logits[sl] - y).double()).sum(-1)
            total += float((cross - self.lse[i] + torch.logsumexp(y.double(), dim=-1)).sum())
        return total


def kl_sum(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """sum over rows of KL(softmax(p) || softmax(q)) in nats, float64."""
    return KLReference(logits_p).kl_sum(logits_q)


def agreement_count(logits_a: torch.Tensor, logits_b: torch.Tensor) -> int:
    """Rows where both argmax tokens agree."""
    return int((logits_a.argmax(-1) == logits_b.argmax(-1).to(logits_a.device)).sum())


def loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, int]:
    """(sum of cross-entropies, correct top-1 count, rows scored) over rows with a target."""
    has = targets >= 0
    logits, targets = logits[has.to(logits.device)], targets[has].to(logits.device)
    ce, correct = 0.0, 0
    for sl in _slices(logits.shape[0]):
        lp = F.log_softmax(logits[sl].double(), dim=-1)
        ce += float(F.nll_loss(lp, targets[sl], reduction="sum"))
        correct += int((lp.argmax(-1) == targets[sl]).sum())
    return ce, correct, int(has.sum())


def compare_models(models: dict, pairs: list[tuple[int, int]], tokens: torch.Tensor,
                   mask: torch.Tensor, batch_size: int, progress=lambda it, **kw: it) -> dict:
    """Streaming comparison of next-token predictions.

    Returns {"pairs": {(a, b): {top1_agreement, mean_kl, n_positions}},
    "seeds": {seed: {loss, top1_accuracy, n_loss_positions}}}.
    Per chunk every pair's ``a`` is run once and each of its partners once (a seed is run again
    for another ``a`` only with ``analysis.pairs=all``): at most two seeds' logits are alive.
    """
    by_a: dict[int, list[int]] = {}
    for a, b in pairs:
        by_a.setdefault(a, []).append(b)
    pair_acc = {p: [0, 0.0, 0] for p in pairs}  # agree, kl sum, rows
    seed_acc = {s: [0.0, 0, 0] for p in pairs for s in p}  # ce sum, correct, rows
    starts = list(range(0, tokens.shape[0], batch_size))
    for start in progress(starts, desc="lm_function_match (chunks)"):
        chunk, keep = tokens[start : start + batch_size], mask[start : start + batch_size]
        targets = next_token_targets(chunk, keep)
        done: set[int] = set()

        def run(seed, chunk=chunk, keep=keep, targets=targets, done=done):
            logits = kept_logits(models[seed], chunk, keep)
            if seed not in done:  # each seed's own loss once per chunk
                ce, correct, n = loss_sums(logits, targets)
                acc = seed_acc[seed]
                acc[0] += ce
                acc[1] += correct
                acc[2] += n
                done.add(seed)
            return logits

        for a, partners in by_a.items():
            la = run(a)
            ref = KLReference(la)  # reused for every partner of a
            for b in partners:
                lb = run(b)
                acc = pair_acc[(a, b)]
                acc[0] += agreement_count(la, lb)
                acc[1] += ref.kl_sum(lb)
                acc[2] += la.shape[0]
                del lb
            del la, ref
    return {
        "pairs": {p: {"top1_agreement": agree / n, "mean_kl": kl / n, "n_positions": n}
                  for p, (agree, kl, n) in pair_acc.items()},
        "seeds": {s: {"loss": ce / n if n else float("nan"),
                      "top1_accuracy": correct / n if n else float("nan"),
                      "n_loss_positions": n}
                  for s, (ce, correct, n) in seed_acc.items()},
    }


class LMFunctionMatch(AnalysisCallback):
    """Next-token agreement and KL between seeds, with each seed's own loss.

    Args:
        n_sequences: compare on the first n windows of the scored batch only (None: all).
    """

    name = "lm_function_match"

    def __init__(self, n_sequences: int | None = None) -> None:
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        self.n_sequences = None if n_sequences is None else int(n_sequences)

    def run(self, ctx) -> dict:
        batch = ctx.score_batch
        tokens, mask = ctx.tokens[batch], ctx.masks[batch]
        if self.n_sequences is not None:
            tokens, mask = tokens[: self.n_sequences], mask[: self.n_sequences]
        found = compare_models(ctx.models, list(ctx.pairs), tokens, mask, ctx.batch_size,
                               progress=ctx.progress)
        pairs = []
        for (a, b), stats in found["pairs"].items():
            sa, sb = found["seeds"][a], found["seeds"][b]
            pairs.append({"pair": [a, b], **stats, "loss_a": sa["loss"], "loss_b": sb["loss"]})
        seeds = {str(s): v for s, v in sorted(found["seeds"].items())}
        summary = {
            "min_top1_agreement": min(p["top1_agreement"] for p in pairs),
            "mean_top1_agreement": sum(p["top1_agreement"] for p in pairs) / len(pairs),
            "max_mean_kl": max(p["mean_kl"] for p in pairs),
            "mean_mean_kl": sum(p["mean_kl"] for p in pairs) / len(pairs),
            "mean_loss": sum(v["loss"] for v in seeds.values()) / len(seeds),
        }
        return {
            "definitions": {
                "positions": "the kept positions of the scored batch (ctx.masks[batch]: every "
                "position but the first skip_positions of each corpus window)",
                "top1_agreement": "fraction of positions where argmax_v p_a(v) == argmax_v p_b(v), "
                "p = softmax of the next-token logits",
                "mean_kl": "mean over positions of KL(p_a || p_b) = sum_v p_a(v) (log p_a(v) - "
                "log p_b(v)) in nats, float64 log-softmax; 0 iff the distributions agree",
                "loss": "each seed's own mean next-token cross-entropy -log p(x_{t+1}) in nats "
                "over the kept positions t that have a next token in the window (the last "
                "position of a window has none)",
                "top1_accuracy": "fraction of those positions where argmax p == x_{t+1}",
                "pair": "(a, b) as in ctx.pairs (a: the anchor with analysis.pairs=anchor)",
            },
            "batch": batch,
            "n_sequences": int(tokens.shape[0]),
            "pairs": pairs,
            "seeds": seeds,
            "summary": summary,
        }

    def scalars(self, result: dict) -> dict[str, float]:
        out = dict(result["summary"])
        for seed, v in result["seeds"].items():
            out[f"seed{seed}/loss"] = v["loss"]
            out[f"seed{seed}/top1_accuracy"] = v["top1_accuracy"]
        return out

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        rows = [[p["pair"][0], p["pair"][1], p["top1_agreement"], p["mean_kl"], p["loss_a"],
                 p["loss_b"], p["n_positions"]] for p in result["pairs"]]
        cols = ["seed_a", "seed_b", "top1_agreement", "mean_kl", "loss_a", "loss_b", "n_positions"]
        return {"lm_function_match_pairs": (cols, rows)}

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        pairs = result["pairs"]
        labels = [f"{a}-{b}" for a, b in (p["pair"] for p in pairs)]
        fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.9 * len(pairs) + 3), 3.4))
        axes[0].bar(labels, [p["top1_agreement"] for p in pairs], color=COLOURS["rotated"])
        axes[0].set_ylim(0, 1.02)
        axes[0].set_ylabel("next-token top-1 agreement")
        axes[1].bar(labels, [p["mean_kl"] for p in pairs], color=COLOURS["naive"])
        axes[1].set_ylabel("mean KL(p_a || p_b) (nats)")
        for ax in axes:
            ax.set_xlabel("pair (a-b)")
            ax.tick_params(axis="x", labelsize=7, rotation=45 if len(pairs) > 6 else 0)
        fig.suptitle(f"do the seeds predict the same next token? ({result['n_sequences']} "
                     f"{result['batch']} windows)", fontsize=9)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def report(self, ctx, result: dict, figures) -> str:
        s = result["summary"]
        lines = [
            "## Do the seeds compute the same function? (`lm_function_match`)",
            "",
            (
                "Next-token predictions of each pair on the kept positions of the "
                f"{result['batch']} batch ({result['n_sequences']} corpus windows): top-1 "
                "agreement, mean KL(p_a || p_b) in nats, and each seed's own next-token loss for "
                f"context. Across pairs: top-1 agreement {s['min_top1_agreement']:.4f} at worst "
                f"({s['mean_top1_agreement']:.4f} on average), mean KL {s['max_mean_kl']:.4f} "
                f"at worst; mean loss {s['mean_loss']:.4f}."
            ),
            "",
            "| pair | top-1 agreement | mean KL (nats) | loss a | loss b |",
            "|---|---|---|---|---|",
        ]
        for p in result["pairs"]:
            a, b = p["pair"]
            lines.append(f"| {a}-{b} | {p['top1_agreement']:.4f} | {p['mean_kl']:.4f} | "
                         f"{p['loss_a']:.4f} | {p['loss_b']:.4f} |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
