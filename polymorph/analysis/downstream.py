"""spliced_loss: what does splicing an SAE into the model do to its output?

The community judges an SAE by its downstream cost, not by explained variance alone: replace a
site's activations by the SAE's reconstruction (a TransformerLens forward hook on the site, at
the batch's kept positions) and measure the model's loss L_sae. With L_clean the unmodified loss
and L_abl the loss with the site mean-ablated (every kept position replaced by the model's mean
activation there on the fit batch), the fraction of loss recovered is, as SAELens and SAEBench
define it::

    recovered = (L_abl - L_sae) / (L_abl - L_clean)

(1: the SAE costs nothing; 0: as bad as erasing the site). The loss is the family readout's:
for the Dyck toy the sum over its three heads of each head's mean cross-entropy over the non-PAD
positions (every head is also reported alone); for a language model the next-token
cross-entropy. KL(clean || spliced), per position, is reported beside it.

Per site, on the first ``n_sequences`` of the scored batch: the anchor's own SAE on the anchor;
on every other seed its own SAE, the anchor's SAE as it is (naive) and the anchor's SAE
transferred by the fitted rotation (:func:`~polymorph.align.transfer.transfer_sae`), each
against that seed's own clean and mean-ablated loss. Every number has a percentile-bootstrap
interval over the steered sequences (one set of resamples for all of them); means over the
other seeds resample the seeds too.

:func:`spliced_loss_sums` is the reusable core: any replacement of a site's activations (an
SAE, a shared dictionary, a crosscoder's reconstruction) in any model of the family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from polymorph.align.outputs import KLReference, cross_entropy_rows, per_sequence
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.intervals import (
    INTERVAL_DEFINITION,
    SequenceBootstrap,
    check_margin,
    check_n_boot,
    error_bars,
    mean,
)
from polymorph.analysis.plots import plt, save
from polymorph.analysis.readings import fmt_ci, relation
from polymorph.errors import PolymorphError
from polymorph.families.base import NO_TARGET, TokenBatch

TOTAL = "total"
#: the versions spliced into a seed other than the anchor (the anchor has only "own")
VERSIONS = ("own", "naive", "transferred")
FIGURE_FILE = "spliced_loss.png"

Replacement = Callable[[torch.Tensor], torch.Tensor]


def _splice(fn: Replacement, keep: torch.Tensor):
    """A TransformerLens hook replacing the activations at the kept positions by ``fn`` of them."""

    def hook(act, hook):
        k = keep[:, : act.shape[1]].to(act.device)
        out = act.clone()
        out[k] = fn(act[k].float()).to(device=act.device, dtype=act.dtype)
        return out

    return hook


@torch.no_grad()
def spliced_sums(readout, model, replacements: dict[str, tuple[str, Replacement]],
                 batch: TokenBatch, batch_size: int,
                 progress=lambda it, **kw: it) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per-sequence loss sums of ``model`` clean and with each replacement spliced in.

    ``replacements``: name -> (site, fn), fn mapping the kept positions' activations at the site
    [n_rows, d] (float32, activation-row order) to their replacements. The clean forward of a
    chunk is shared by every replacement. Returns ``{"clean": {head: {"ce", "n"}}, name: {head:
    {"ce", "kl", "n"}}}``, float64 [S] per-sequence sums over the positions with a target
    (cross-entropy, KL(clean || spliced) in nats, and their count).
    """
    n_seq, heads = batch.n_sequences, readout.heads

    def zeros():
        return torch.zeros(n_seq, dtype=torch.float64)

    out = {"clean": {h: {"ce": zeros(), "n": zeros()} for h in heads}}
    out.update({name: {h: {"ce": zeros(), "kl": zeros(), "n": zeros()} for h in heads}
                for name in replacements})
    for start, tokens, mask in progress(list(batch.chunks(batch_size)),
                                        desc="spliced_loss (chunks)"):
        rows = mask.nonzero()[:, 0] + start
        targets = readout.targets(tokens, mask)
        clean = readout.logits(model, tokens, mask)
        refs = {}
        for h in heads:
            ce, _, has = cross_entropy_rows(clean[h], targets[h], NO_TARGET)
            out["clean"][h]["ce"] += per_sequence(ce, rows, n_seq)
            out["clean"][h]["n"] += per_sequence(has, rows, n_seq)
            refs[h] = (KLReference(clean[h]), has)
        del clean
        for name, (site, fn) in replacements.items():
            spliced = readout.logits(model, tokens, mask, fwd_hooks=[(site, _splice(fn, mask))])
            for h in heads:
                ref, has = refs[h]
                ce, _, _ = cross_entropy_rows(spliced[h], targets[h], NO_TARGET)
                acc = out[name][h]
                acc["ce"] += per_sequence(ce, rows, n_seq)
                acc["kl"] += per_sequence(ref.kl_rows(spliced[h]) * has, rows, n_seq)
                acc["n"] += per_sequence(has, rows, n_seq)
            del spliced
    return out


def spliced_loss_sums(ctx, model, site: str, replace_fn: Replacement | None,
                      batch: TokenBatch) -> dict[str, dict[str, torch.Tensor]]:
    """Per head of ``ctx.readout``, per-sequence sums of ``model``'s loss on ``batch`` with the
    activations at ``site`` replaced by ``replace_fn`` at the batch's kept positions.

    Args:
        ctx: the analysis context (its ``readout`` and ``batch_size`` are used).
        model: a model of the context's family (TransformerLens hooks).
        site: the hook name whose activations are replaced.
        replace_fn: maps the kept positions' activations of one chunk, [n_rows, d] float32 in
            activation-row order, to their replacements [n_rows, d] (e.g. an SAE's
            reconstruction); None: the clean model.
        batch: the inputs (a :class:`~polymorph.families.base.TokenBatch`, e.g.
            ``ctx.batches["eval"].head(256)``).

    Returns:
        ``{head: {"ce": [S], "ce_clean": [S], "kl": [S], "n": [S]}}``, float64 per-sequence
        sums over the positions with a target: the spliced model's cross-entropy, the clean
        model's, KL(clean || spliced) in nats, and the number of such positions. A loss is
        ``ce.sum() / n.sum()``; resample sequences for an interval.
    """
    fns = {} if replace_fn is None else {"spliced": (site, replace_fn)}
    sums = spliced_sums(ctx.readout, model, fns, batch, ctx.batch_size)
    out = {}
    for h, clean in sums["clean"].items():
        sp = sums.get("spliced", {}).get(h)
        out[h] = {"ce": clean["ce"] if sp is None else sp["ce"], "ce_clean": clean["ce"],
                  "kl": torch.zeros_like(clean["ce"]) if sp is None else sp["kl"],
                  "n": clean["n"]}
    return out


def sae_replacement(sae) -> Replacement:
    """x -> the SAE's reconstruction of x."""

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = sae.decode(sae.encode(x.to(device=sae.device, dtype=sae.dtype)))
        return y.float().to(x.device)

    return fn


def mean_replacement(mu: torch.Tensor) -> Replacement:
    """x -> the mean activation ``mu`` [d] at every position (mean ablation)."""
    mu = mu.float()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return mu.to(x.device).expand_as(x).clone()

    return fn


class SplicedLoss(AnalysisCallback):
    """Loss with SAEs spliced in, against the clean model and mean ablation.

    Args:
        sites: sites to splice at (None: every analysis site).
        n_sequences: the first n sequences of the scored batch (None: all of it).
        margin: differences of the fraction recovered smaller than this (in [0, 1]) read as
            "at".
        n_boot, level, boot_seed: the sequence bootstrap (n_boot >= 100).
    """

    name = "spliced_loss"

    def __init__(self, sites: list[str] | None = None, n_sequences: int | None = 256,
                 margin: float = 0.01, n_boot: int = 1000, level: float = 0.95,
                 boot_seed: int = 0) -> None:
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        self.sites = None if sites is None else [str(s) for s in sites]
        self.n_sequences = None if n_sequences is None else int(n_sequences)
        self.margin = check_margin(margin)
        self.n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
        self.level = float(level)
        self.boot_seed = int(boot_seed)

    # -- computation ---------------------------------------------------------------------

    def _sites(self, ctx) -> list[str]:
        sites = list(ctx.sites) if self.sites is None else self.sites
        unknown = [s for s in sites if s not in ctx.sites]
        if unknown:
            raise PolymorphError(
                f"spliced_loss sites {unknown} are not analysis sites (rotations and SAEs exist "
                f"only there); use a subset of {list(ctx.sites)} "
                "(analysis.callbacks.spliced_loss.sites=[...]) or null for all")
        return sites

    def _replacements(self, ctx, seed: int, sites: list[str]) -> dict:
        from polymorph.align.transfer import transfer_sae

        out = {}
        anchor = ctx.anchor
        for site in sites:
            out[("ablated", site)] = (site, mean_replacement(
                ctx.acts["fit"][seed][site].double().mean(0)))
            own = ctx.saes.get(seed, {}).get(site)
            if own is not None:
                out[("own", site)] = (site, sae_replacement(own.sae))
            ref = ctx.saes.get(anchor, {}).get(site)
            if seed != anchor and ref is not None:
                out[("naive", site)] = (site, sae_replacement(ref.sae))
                moved = transfer_sae(ref.sae, ctx.to_frame_of(anchor, seed, site))
                out[("transferred", site)] = (site, sae_replacement(moved))
        return out

    def run(self, ctx) -> dict:
        sites = self._sites(ctx)
        batch = ctx.batches[ctx.score_batch].head(self.n_sequences)
        boot = SequenceBootstrap(batch.n_sequences, self.n_boot, self.level, self.boot_seed)
        heads = list(ctx.readout.heads)
        rows, reps, skipped = [], {}, []
        for seed in ctx.progress(ctx.seeds, desc="spliced_loss (seed)"):
            fns = self._replacements(ctx, seed, sites)
            sums = spliced_sums(ctx.readout, ctx.models[seed],
                                {f"{v}@{s}": fn for (v, s), fn in fns.items()}, batch,
                                ctx.batch_size)
            for site in sites:
                versions = [v for v in VERSIONS if f"{v}@{site}" in sums]
                if not versions:
                    skipped.append(f"seed {seed} at {site}: no SAE to splice in")
                    continue
                for head in (*heads, TOTAL):
                    row, rep = self._row(boot, sums, seed, site, head, versions, heads)
                    rows.append(row)
                    reps[(seed, site, head)] = rep
        per_site = {site: self._site_summary(ctx, boot, rows, reps, site)
                    for site in sites if any(r["site"] == site for r in rows)}
        return {
            "definitions": self._definitions(ctx, batch),
            "readout": ctx.readout.name,
            "heads": heads,
            "sites": sites,
            "anchor": ctx.anchor,
            "n_sequences": batch.n_sequences,
            "margin": self.margin,
            "rows": rows,
            "per_site": per_site,
            "skipped": skipped,
        }

    def _row(self, boot, sums, seed, site, head, versions, heads):
        """Losses, their differences and the fraction recovered for one (seed, site, head);
        head TOTAL sums the heads' mean losses."""
        picked = heads if head == TOTAL else [head]

        def loss(name: str, key: str = "ce") -> tuple[float, torch.Tensor]:
            point = sum(float(sums[name][h][key].sum() / sums[name][h]["n"].sum())
                        for h in picked)
            rep = sum(boot.ratio(sums[name][h][key], sums[name][h]["n"]) for h in picked)
            return point, rep

        row: dict = {"seed": seed, "site": site, "head": head}
        rep: dict = {}
        clean, clean_r = loss("clean")
        abl, abl_r = loss(f"ablated@{site}")
        row["clean_loss"], row["clean_loss_ci"] = clean, boot.ci(clean_r, clean)
        row["ablated_loss"], row["ablated_loss_ci"] = abl, boot.ci(abl_r, abl)
        gap_ci = boot.ci(abl_r - clean_r, abl - clean)
        row["ablation_gap"], row["ablation_gap_ci"] = abl - clean, gap_ci
        # recovered is defined only where the ablation measurably raises the loss
        resolved = gap_ci is not None and gap_ci["ci_low"] > 0
        for v in versions:
            name = f"{v}@{site}"
            value, r = loss(name)
            kl, kl_r = loss(name, "kl")
            row[f"{v}_loss"], row[f"{v}_loss_ci"] = value, boot.ci(r, value)
            row[f"{v}_delta_loss"] = value - clean
            row[f"{v}_delta_loss_ci"] = boot.ci(r - clean_r, value - clean)
            row[f"{v}_kl"], row[f"{v}_kl_ci"] = kl, boot.ci(kl_r, kl)
            rep[f"{v}_delta_loss"], rep[f"{v}_kl"] = r - clean_r, kl_r
            if resolved:
                rec_r = (abl_r - r) / (abl_r - clean_r)
                rec = (abl - value) / (abl - clean)
                row[f"{v}_recovered"], row[f"{v}_recovered_ci"] = rec, boot.ci(rec_r, rec)
                rep[v] = rec_r
            else:
                row[f"{v}_recovered"], row[f"{v}_recovered_ci"] = None, None
        return row, rep

    def _site_summary(self, ctx, boot, rows, reps, site) -> dict:
        anchor = ctx.anchor
        out: dict = {}
        for head in (*ctx.readout.heads, TOTAL):
            site_rows = {r["seed"]: r for r in rows if r["site"] == site and r["head"] == head}
            entry: dict = {}
            a = site_rows.get(anchor)
            if a is not None and "own_loss" in a:
                for key in ("own_recovered", "own_delta_loss", "own_kl"):
                    entry[f"anchor_{key}"] = a[key]
                    entry[f"anchor_{key}_ci"] = a[f"{key}_ci"]
            others = [s for s in site_rows if s != anchor]
            for v in VERSIONS:
                have = [s for s in others if site_rows[s].get(f"{v}_recovered") is not None]
                entry[f"{v}_recovered"] = mean(site_rows[s][f"{v}_recovered"] for s in have)
                entry[f"{v}_recovered_ci"] = boot.over_pairs(
                    [reps[(s, site, head)][v] for s in have],
                    [site_rows[s][f"{v}_recovered"] for s in have]) if have else None
                for key in ("delta_loss", "kl"):
                    have = [s for s in others if site_rows[s].get(f"{v}_{key}") is not None]
                    entry[f"{v}_{key}"] = mean(site_rows[s][f"{v}_{key}"] for s in have)
                    entry[f"{v}_{key}_ci"] = boot.over_pairs(
                        [reps[(s, site, head)][f"{v}_{key}"] for s in have],
                        [site_rows[s][f"{v}_{key}"] for s in have]) if have else None
            both = [s for s in others if site_rows[s].get("transferred_recovered") is not None
                    and site_rows[s].get("own_recovered") is not None]
            if both:
                diff = [reps[(s, site, head)]["transferred"] - reps[(s, site, head)]["own"]
                        for s in both]
                pts = [site_rows[s]["transferred_recovered"] - site_rows[s]["own_recovered"]
                       for s in both]
                entry["transferred_minus_own_recovered"] = mean(pts)
                ci = boot.over_pairs(diff, pts)
                entry["transferred_minus_own_recovered_ci"] = ci
                entry["transferred_vs_own"] = relation(mean(pts), ci, 0.0, self.margin)
            if entry.get("transferred_recovered") is not None and \
                    entry.get("anchor_own_recovered") is not None:
                entry["transferred_vs_anchor_own"] = relation(
                    entry["transferred_recovered"], entry["transferred_recovered_ci"],
                    entry["anchor_own_recovered"], self.margin)
            entry["n_other_seeds"] = len(others)
            out[head] = entry
        return out

    def _definitions(self, ctx, batch) -> dict:
        readout = ctx.readout
        return {
            "loss": f"per head: {readout.loss_definition}; {TOTAL}: the sum of the heads' "
            f"losses (heads: {', '.join(readout.heads)})",
            "head": f"a head of the {readout.name} readout, or {TOTAL}",
            "clean_loss": "the model's own loss on the spliced batch",
            "ablated_loss": "the loss with the site's activations at every kept position "
            "replaced by the model's mean activation there over the fit batch (mean ablation)",
            "ablation_gap": "ablated_loss - clean_loss; recovered is defined only where its "
            "interval lies above 0",
            "own": "the seed's own SAE (of the analysed config) spliced in at the site",
            "naive": "the anchor's SAE spliced into another seed as it is",
            "transferred": "the anchor's SAE transferred into the other seed's frame by the "
            "fitted rotation (align.transfer.transfer_sae) and spliced in",
            "own_loss / naive_loss / transferred_loss": "the loss with that SAE spliced in "
            "(its reconstruction replaces the site's activations at the kept positions)",
            "own_delta_loss / naive_delta_loss / transferred_delta_loss": "that loss minus "
            "clean_loss (nats)",
            "own_kl / naive_kl / transferred_kl": "mean over the positions with a target of "
            "KL(p_clean || p_spliced) in nats, summed over heads for total",
            "own_recovered / naive_recovered / transferred_recovered": "fraction of loss "
            "recovered (L_abl - L_sae) / (L_abl - L_clean), as SAELens and SAEBench define it "
            "(1: no cost; 0: as bad as mean ablation)",
            "anchor_own_recovered / anchor_own_delta_loss / anchor_own_kl": "the anchor's own "
            "SAE on the anchor",
            "transferred_minus_own_recovered": "per other seed, transferred minus own recovered, "
            "mean over seeds (paired interval)",
            "transferred_vs_own / transferred_vs_anchor_own": f"above / at / below (margin "
            f"{self.margin}): the transferred SAE against each seed's own SAE (the interval "
            "of the difference against 0), and against the anchor's own SAE on the anchor",
            "per_site": "per site and head: means over the other seeds (intervals over seeds "
            "and sequences) and the anchor's own values",
            "n_other_seeds": "seeds other than the anchor",
            "spliced": f"{batch.description}; the SAE reads and replaces the activations of "
            "the kept positions only",
            "margin": "the practical-equivalence margin of the relations (fraction recovered)",
            **INTERVAL_DEFINITION,
        }

    # -- outputs -------------------------------------------------------------------------

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for site, per_head in result["per_site"].items():
            for key, value in per_head.get(TOTAL, {}).items():
                if isinstance(value, float):
                    out[f"{site}/{key}"] = value
        return out

    def tables(self, result: dict):
        cols = ["seed", "site", "head", "clean_loss", "ablated_loss"] + [
            f"{v}_{k}" for v in VERSIONS for k in ("loss", "delta_loss", "kl", "recovered")]
        rows = [[r["seed"], r["site"], r["head"], r["clean_loss"], r["ablated_loss"]]
                + [r.get(c) for c in cols[5:]] for r in result["rows"]]
        return {"spliced_loss": (cols, rows)}

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        sites = list(result["per_site"])
        if not sites:
            return []
        fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(sites)), 3.6))
        kinds = [("anchor_own", "anchor's own SAE", "#2b8a3e"),
                 ("own", "other seeds' own SAEs", "#82c91e"),
                 ("transferred", "transferred", "#1c7ed6"), ("naive", "naive", "#c92a2a")]
        width = 0.8 / len(kinds)
        for i, (key, label, colour) in enumerate(kinds):
            raw = [result["per_site"][s][TOTAL].get(f"{key}_recovered") for s in sites]
            cis = [result["per_site"][s][TOTAL].get(f"{key}_recovered_ci") for s in sites]
            vals = [float("nan") if v is None else v for v in raw]
            xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(sites))]
            ax.bar(xs, vals, width, yerr=error_bars(raw, cis), capsize=2, color=colour,
                   label=label)
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(1, color="grey", lw=0.6, ls=":")
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels([s.replace("blocks.", "").replace("hook_resid_", "") for s in sites])
        ax.set_ylabel("fraction of loss recovered")
        ax.legend(fontsize=7)
        ax.set_title("SAE spliced in: (L_abl - L_sae) / (L_abl - L_clean), 95% intervals",
                     fontsize=9)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def reading(self, site: str, e: dict) -> str:
        def part(key: str) -> str:
            return fmt_ci(e.get(f"{key}_recovered"), e.get(f"{key}_recovered_ci"))

        text = f"`{site}`: the anchor's own SAE recovers {part('anchor_own')} of the loss"
        if e.get("anchor_own_delta_loss") is not None:
            delta = fmt_ci(e["anchor_own_delta_loss"], e.get("anchor_own_delta_loss_ci"), "+.4f")
            text += f" (delta loss {delta} nats)"
        if e.get("n_other_seeds"):
            text += (f"; on the other seeds the transferred SAE recovers {part('transferred')}"
                     f", the naive one {part('naive')}, their own SAEs {part('own')}")
            rel = [f"{e[k]} {what}" for k, what in (("transferred_vs_own", "their own"),
                                                    ("transferred_vs_anchor_own",
                                                     "the anchor's own on the anchor"))
                   if e.get(k)]
            if rel:
                text += "; transferred is " + " and ".join(rel)
        return text + "."

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Loss with the SAE spliced in (`spliced_loss`)",
            "",
            f"Each SAE's reconstruction replaces the site's activations (kept positions of the "
            f"first {result['n_sequences']} {ctx.score_batch} sequences); fraction of loss "
            "recovered = (L_abl - L_sae) / (L_abl - L_clean) with L_abl the mean-ablated loss "
            "(as SAELens and SAEBench define it), on the summed loss of the readout's heads "
            f"({', '.join(result['heads'])}; each head alone, delta loss and KL(clean || "
            "spliced) in results.json). Anchor: its own SAE; other seeds: means over them of "
            "their own SAE, the anchor's SAE transferred by the fitted rotation, and the "
            "anchor's SAE as it is (naive). 95% intervals over sequences (and seeds).",
            "",
            "| site | anchor's own | transferred | naive | others' own | transferred KL | "
            "naive KL |",
            "|---|---|---|---|---|---|---|",
        ]
        for site, per_head in result["per_site"].items():
            e = per_head[TOTAL]

            def cell(key: str, e=e) -> str:
                return fmt_ci(e.get(f"{key}_recovered"), e.get(f"{key}_recovered_ci"))

            lines.append(f"| `{site}` | {cell('anchor_own')} | {cell('transferred')} | "
                         f"{cell('naive')} | {cell('own')} | "
                         f"{fmt_ci(e.get('transferred_kl'), e.get('transferred_kl_ci'), '.4f')} | "
                         f"{fmt_ci(e.get('naive_kl'), e.get('naive_kl_ci'), '.4f')} |")
        lines += ["", "Reading (margin {:g}): ".format(result["margin"]) + " ".join(
            self.reading(site, per_head[TOTAL]) for site, per_head in result["per_site"].items())]
        unresolved = sorted({f"`{r['site']}`" for r in result["rows"]
                             if r["head"] == TOTAL and r.get("ablation_gap_ci")
                             and r["ablation_gap_ci"]["ci_low"] <= 0})
        if unresolved:
            lines += ["", "Mean ablation does not raise the loss measurably at "
                      + ", ".join(unresolved) + " (for some seed): no fraction recovered there."]
        if result["skipped"]:
            lines += ["", "Skipped: " + "; ".join(result["skipped"])]
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
