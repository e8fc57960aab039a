"""function_match: do the seeds compute the same function?

Per head and per pair, on the eval batch and on both held-out distributions:
argmax agreement (fraction of non-PAD positions where the two seeds predict the
same class) and mean KL(p_a || p_b) between their output distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymorph.analysis.base import AnalysisCallback
from polymorph.models.dyck import split_logits
from polymorph.tasks.dyck import HEADS, PAD, make_batch

HELDOUT_SEED = 3003


@torch.no_grad()
def head_log_probs(model, tokens: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Log-probabilities per head at non-PAD positions: head -> [n_positions, n_classes]."""
    out: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start : start + batch_size]
        mask = chunk != PAD
        width = int(mask.sum(1).max())
        logits = split_logits(model(chunk[:, :width]))
        for head in HEADS:
            out[head].append(F.log_softmax(logits[head][mask[:, :width]].double(), dim=-1))
    return {h: torch.cat(v) for h, v in out.items()}


def compare_heads(lp_a: dict[str, torch.Tensor], lp_b: dict[str, torch.Tensor]) -> dict:
    res = {}
    for head in HEADS:
        a, b = lp_a[head], lp_b[head]
        agree = (a.argmax(-1) == b.argmax(-1)).double().mean()
        kl = (a.exp() * (a - b)).sum(-1).mean()
        res[head] = {"argmax_agreement": float(agree), "mean_kl": float(kl)}
    return res


class FunctionMatch(AnalysisCallback):
    name = "function_match"

    def __init__(self, heldout_sequences: int | None = None) -> None:
        self.heldout_sequences = heldout_sequences

    def run(self, ctx) -> dict:
        n_held = int(self.heldout_sequences or ctx.cfg.analysis.heldout_sequences)
        batches = {
            "eval": ctx.tokens["eval"],
            "compositional": make_batch("compositional", n_held, HELDOUT_SEED).tokens,
            "long": make_batch("long", n_held, HELDOUT_SEED + 1).tokens,
        }
        log_probs = {
            seed: {name: head_log_probs(ctx.models[seed], toks) for name, toks in batches.items()}
            for seed in ctx.progress(ctx.seeds, desc="function_match")
        }
        pairs = []
        for a, b in ctx.pairs:
            pairs.append(
                {
                    "pair": [a, b],
                    **{name: compare_heads(log_probs[a][name], log_probs[b][name]) for name in batches},
                }
            )
        summary = {}
        for name in batches:
            for head in HEADS:
                vals = [p[name][head]["argmax_agreement"] for p in pairs]
                summary[f"{name}/{head}/min_argmax_agreement"] = min(vals)
                kls = [p[name][head]["mean_kl"] for p in pairs]
                summary[f"{name}/{head}/max_mean_kl"] = max(kls)
        return {
            "definitions": {
                "argmax_agreement": "fraction of non-PAD positions where both seeds' argmax class agree",
                "mean_kl": "mean over non-PAD positions of KL(p_a || p_b) in nats, p = softmax of a head",
                "batches": "eval: the analysis eval batch; compositional / long: held-out generators, "
                f"{n_held} sequences each",
            },
            "pairs": pairs,
            "summary": summary,
        }

    def scalars(self, result: dict) -> dict[str, float]:
        return dict(result["summary"])

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Do the seeds compute the same function? (`function_match`)",
            "",
            "Argmax agreement (fraction of non-PAD positions with the same predicted class) and mean "
            "KL(p_a || p_b) per head, worst pair shown.",
            "",
            "| batch | head | min argmax agreement | max mean KL (nats) |",
            "|---|---|---|---|",
        ]
        s = result["summary"]
        for name in ("eval", "compositional", "long"):
            for head in HEADS:
                lines.append(
                    f"| {name} | {head} | {s[f'{name}/{head}/min_argmax_agreement']:.4f} | "
                    f"{s[f'{name}/{head}/max_mean_kl']:.2e} |"
                )
        return "\n".join(lines)
