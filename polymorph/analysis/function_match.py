"""function_match: do the seeds compute the same function?

Written once for every family, over the family's readout (its named output heads: the Dyck
toy's ``tok`` / ``depth`` / ``valid``; a language model's ``next_token``). Per pair (a, b) and
head, on the scored batch and on the family's held-out distributions (the Dyck task's
``compositional`` and ``long`` sets; none for a text corpus), at the kept positions:

* ``argmax_agreement``: the fraction of positions where both seeds predict the same class;
* ``mean_kl``: the mean over positions of KL(p_a || p_b) between their output distributions;

and per seed and head, for context, its own ``loss`` (cross-entropy against the correct class)
and ``accuracy``. Every number is a ratio of per-sequence sums, so its interval resamples
whole sequences; pair means also resample pairs (``polymorph.align.statistics``).

Outputs can be vocabulary-sized, so nothing is held for a whole batch: forwards run
``ctx.batch_size`` sequences at a time and at most two seeds' logits are alive at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymorph.align.outputs import KLReference, agreement_rows, cross_entropy_rows, per_sequence
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.intervals import INTERVAL_DEFINITION, SequenceBootstrap, check_n_boot
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.analysis.readings import fmt_ci
from polymorph.families.base import NO_TARGET, TokenBatch

FIGURE_FILE = "function_match.png"


def compare_outputs(models: dict, readout, pairs: list[tuple[int, int]], batch: TokenBatch,
                    batch_size: int, progress=lambda it, **kw: it) -> tuple[dict, dict]:
    """Per-sequence sums of the output comparisons on one batch.

    Returns ``(pair_sums, seed_sums)``: ``pair_sums[(a, b)][head]`` holds float64 [S] tensors
    ``agree``, ``kl`` and ``n`` (kept positions); ``seed_sums[seed][head]`` holds ``ce``,
    ``correct`` and ``n`` (positions with a target). Each pair's ``a`` is run once per chunk
    and each of its partners once.
    """
    n_seq = batch.n_sequences
    heads = readout.heads

    def zeros():
        return torch.zeros(n_seq, dtype=torch.float64)

    pair_sums = {p: {h: {"agree": zeros(), "kl": zeros(), "n": zeros()} for h in heads}
                 for p in pairs}
    seeds = sorted({s for p in pairs for s in p})
    seed_sums = {s: {h: {"ce": zeros(), "correct": zeros(), "n": zeros()} for h in heads}
                 for s in seeds}
    by_a: dict[int, list[int]] = {}
    for a, b in pairs:
        by_a.setdefault(a, []).append(b)
    chunks = list(batch.chunks(batch_size))
    for start, tokens, mask in progress(chunks, desc="function_match (chunks)"):
        rows = mask.nonzero()[:, 0] + start
        targets = readout.targets(tokens, mask)
        done: set[int] = set()

        def run(seed, tokens=tokens, mask=mask, targets=targets, rows=rows, done=done):
            logits = readout.logits(models[seed], tokens, mask)
            if seed not in done:  # each seed's own loss once per chunk
                for head in heads:
                    ce, correct, has = cross_entropy_rows(logits[head], targets[head], NO_TARGET)
                    acc = seed_sums[seed][head]
                    acc["ce"] += per_sequence(ce, rows, n_seq)
                    acc["correct"] += per_sequence(correct, rows, n_seq)
                    acc["n"] += per_sequence(has, rows, n_seq)
                done.add(seed)
            return logits

        for a, partners in by_a.items():
            la = run(a)
            refs = {head: KLReference(la[head]) for head in heads}  # reused for every partner
            for b in partners:
                lb = run(b)
                for head in heads:
                    acc = pair_sums[(a, b)][head]
                    acc["agree"] += per_sequence(agreement_rows(la[head], lb[head]), rows, n_seq)
                    acc["kl"] += per_sequence(refs[head].kl_rows(lb[head]), rows, n_seq)
                    acc["n"] += per_sequence(torch.ones(rows.shape[0]), rows, n_seq)
                del lb
            del la, refs
    return pair_sums, seed_sums


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den.sum())
    return float(num.sum()) / d if d > 0 else float("nan")


class FunctionMatch(AnalysisCallback):
    """Output agreement between seeds, per head of the family's readout.

    Args:
        n_sequences: compare on the first n sequences of the scored batch (None: all).
        heldout_sequences: sequences per held-out distribution of the family (if it has any).
        heldout_seed: generator seed of the first held-out distribution (+1 for the next);
            far from the analysis batches' seeds, so the sets are disjoint from them.
        n_boot, level, boot_seed: the sequence bootstrap of every interval (n_boot >= 100).
    """

    name = "function_match"

    def __init__(self, n_sequences: int | None = None, heldout_sequences: int = 512,
                 heldout_seed: int = 3003, n_boot: int = 1000, level: float = 0.95,
                 boot_seed: int = 0) -> None:
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        if int(heldout_sequences) < 0:
            raise ValueError(f"heldout_sequences must be >= 0, got {heldout_sequences}")
        self.n_sequences = None if n_sequences is None else int(n_sequences)
        self.heldout_sequences = int(heldout_sequences)
        self.heldout_seed = int(heldout_seed)
        self.n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
        self.level = float(level)
        self.boot_seed = int(boot_seed)

    def batches(self, ctx) -> dict[str, TokenBatch]:
        out = {ctx.score_batch: ctx.batches[ctx.score_batch].head(self.n_sequences)}
        if self.heldout_sequences:
            out.update(ctx.family.heldout_batches(self.heldout_sequences, self.heldout_seed))
        return out

    def run(self, ctx) -> dict:
        readout = ctx.readout
        batches = self.batches(ctx)
        pairs = [{"pair": [a, b]} for a, b in ctx.pairs]
        seeds: dict[str, dict] = {}
        summary = {}
        for name, batch in batches.items():
            pair_sums, seed_sums = compare_outputs(ctx.models, readout, list(ctx.pairs), batch,
                                                   ctx.batch_size, ctx.progress)
            boot = SequenceBootstrap(batch.n_sequences, self.n_boot, self.level, self.boot_seed)
            for entry, key in zip(pairs, ctx.pairs):
                entry[name] = {
                    head: {"argmax_agreement": _ratio(s["agree"], s["n"]),
                           "argmax_agreement_ci": boot.ratio_ci(s["agree"], s["n"]),
                           "mean_kl": _ratio(s["kl"], s["n"]),
                           "mean_kl_ci": boot.ratio_ci(s["kl"], s["n"]),
                           "n_positions": int(s["n"].sum())}
                    for head, s in pair_sums[key].items()}
            for seed, per_head in seed_sums.items():
                seeds.setdefault(str(seed), {})[name] = {
                    head: {"loss": _ratio(s["ce"], s["n"]),
                           "loss_ci": boot.ratio_ci(s["ce"], s["n"]),
                           "accuracy": _ratio(s["correct"], s["n"]),
                           "accuracy_ci": boot.ratio_ci(s["correct"], s["n"]),
                           "n_positions": int(s["n"].sum())}
                    for head, s in per_head.items()}
            for head in readout.heads:
                agree = [p[name][head]["argmax_agreement"] for p in pairs]
                kls = [p[name][head]["mean_kl"] for p in pairs]
                k = f"{name}/{head}"
                summary[f"{k}/min_argmax_agreement"] = min(agree)
                summary[f"{k}/mean_argmax_agreement"] = sum(agree) / len(agree)
                summary[f"{k}/max_mean_kl"] = max(kls)
                summary[f"{k}/mean_mean_kl"] = sum(kls) / len(kls)
                sums = [pair_sums[key][head] for key in ctx.pairs]
                summary[f"{k}/mean_argmax_agreement_ci"] = boot.over_pairs(
                    [boot.ratio(x["agree"], x["n"]) for x in sums], agree)
                summary[f"{k}/mean_mean_kl_ci"] = boot.over_pairs(
                    [boot.ratio(x["kl"], x["n"]) for x in sums], kls)
        return {
            "definitions": {
                "argmax_agreement": "fraction of the kept positions where both seeds' most "
                "likely class (argmax of the head's logits) is the same",
                "mean_kl": "mean over the kept positions of KL(p_a || p_b) = sum_c p_a(c) "
                "(log p_a(c) - log p_b(c)) in nats, p = softmax of the head's logits",
                "loss": f"each seed's own {readout.loss_definition}",
                "accuracy": "fraction of the positions with a target where the argmax is it",
                "heads": f"the {readout.name} readout: {', '.join(readout.heads)}",
                "batches": {name: b.description for name, b in batches.items()},
                "pair": "(a, b) as in the analysis pairs (a: the anchor with analysis.pairs=anchor)",
                "summary": "per batch and head: min and mean over pairs; mean_*_ci resample the "
                "pairs and the batch's sequences",
                **INTERVAL_DEFINITION,
            },
            "heads": list(readout.heads),
            "batches": list(batches),
            "pairs": pairs,
            "seeds": seeds,
            "summary": summary,
        }

    def scalars(self, result: dict) -> dict[str, float]:
        return {k: v for k, v in result["summary"].items() if not isinstance(v, dict)
                and v is not None}

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        rows = []
        for p in result["pairs"]:
            for name in result["batches"]:
                for head in result["heads"]:
                    v = p[name][head]
                    rows.append([p["pair"][0], p["pair"][1], name, head, v["argmax_agreement"],
                                 v["mean_kl"], v["n_positions"]])
        cols = ["seed_a", "seed_b", "batch", "head", "argmax_agreement", "mean_kl",
                "n_positions"]
        return {"function_match_pairs": (cols, rows)}

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        pairs, heads, names = result["pairs"], result["heads"], result["batches"]
        fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(heads) * len(names) + 3), 3.4))
        labels = [f"{n}\n{h}" for n in names for h in heads]
        xs = range(len(labels))
        for ax, key, colour, label in (
                (axes[0], "argmax_agreement", COLOURS["rotated"], "argmax agreement"),
                (axes[1], "mean_kl", COLOURS["naive"], "mean KL(p_a || p_b) (nats)")):
            for p in pairs:
                ax.scatter(xs, [p[n][h][key] for n in names for h in heads], s=10,
                           color="black", zorder=3)
            means = [sum(p[n][h][key] for p in pairs) / len(pairs) for n in names for h in heads]
            ax.bar(xs, means, color=colour, alpha=0.7)
            ax.set_xticks(list(xs), labels, fontsize=7)
            ax.set_ylabel(label)
        axes[0].set_ylim(0, 1.02)
        fig.suptitle("do the seeds compute the same function? (bars: mean over pairs, dots: "
                     "pairs)", fontsize=9)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def report(self, ctx, result: dict, figures) -> str:
        s = result["summary"]
        lines = [
            "## Do the seeds compute the same function? (`function_match`)",
            "",
            "Argmax agreement (fraction of kept positions with the same predicted class) and mean "
            "KL(p_a || p_b) per head of the family's readout, worst pair and mean over "
            f"{len(result['pairs'])} pair(s) with 95% intervals over pairs and sequences; "
            "definitions (and every pair's own interval) in results.json.",
            "",
            "| batch | head | min argmax agreement | mean [95% CI] | max mean KL (nats) | "
            "mean [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for name in result["batches"]:
            for head in result["heads"]:
                k = f"{name}/{head}"
                agree = fmt_ci(s[f"{k}/mean_argmax_agreement"],
                               s.get(f"{k}/mean_argmax_agreement_ci"), ".4f")
                kl = fmt_ci(s[f"{k}/mean_mean_kl"], s.get(f"{k}/mean_mean_kl_ci"), ".2e")
                lines.append(
                    f"| {name} | {head} | {s[f'{k}/min_argmax_agreement']:.4f} | {agree} | "
                    f"{s[f'{k}/max_mean_kl']:.2e} | {kl} |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
