"""sae_transfer: does seed a's SAE reconstruct seed b, raw and after rotation, beyond a null?

Per (pair (a, b), site), all on the scored batch (held-out eval batch unless
``analysis.score_on=fit``), with R the rotation fitted on the fit batch (b -> a):

* ``self``: SAE_a on a's own activations (the ceiling of every transfer);
* ``naive``: SAE_a on b's activations as they are;
* ``transferred_on_b``: SAE_a on R(x_b), scored against R(x_b). This is the published "rotated"
  EV; it equals the EV of the transferred SAE (:func:`~polymorph.align.transfer.transfer_sae`)
  on seed b in b's own frame. It asks whether the SAE reconstructs b's activations; it is not
  bounded by ``self`` and does not see whether R matches points (it can be high where R
  predicts a's activations badly);
* ``transferred_against_a``: the same reconstruction SAE_a(R(x_b)) scored against x_a on the
  same inputs: does the transferred code reconstruct what seed a had there?
* ``rotation``: R(x_b) itself as a prediction of x_a (the rotation's activation EV);
* ``shuffled_null_*``: the same three with R replaced by the shuffled-pairing null fit
  (:func:`~polymorph.align.procrustes.fit_rotation_shuffled`: the fit batch's sequences of seed
  b re-paired with other sequences of the same length), which matches the two activation
  distributions as sets but not point by point; mean over ``null_shuffles`` such fits. What
  the null also scores is what distribution matching alone buys;
* ``floor``: predicting the per-dimension mean of a's activations;

each in both EV definitions, plus firing-pattern overlap: per feature, the Pearson correlation
over rows of SAE_a's activation on a versus on b (raw, and rotated), averaged over features
active on both sides.

Every EV has a percentile-bootstrap interval over the scored sequences (one set of resamples
shared by every quantity of the callback); per-site means over pairs resample the pairs too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from pathlib import Path

import torch
from scipy import stats

from polymorph.align.metrics import EV_DEFINITIONS
from polymorph.align.procrustes import fit_rotation_shuffled
from polymorph.align.statistics import EVSums, ev_from_sums
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
from polymorph.analysis.readings import fmt, fmt_ci, relation, relation_to_band

DEFINITIONS = ("ev_standard", "ev_published")
# every EV kind of a row, in report order
KINDS = ("self", "naive", "transferred_on_b", "transferred_against_a", "rotation",
         "shuffled_null_on_b", "shuffled_null_against_a", "shuffled_null_rotation", "floor")
NULL_KINDS = ("shuffled_null_on_b", "shuffled_null_against_a", "shuffled_null_rotation")
# names of earlier versions, kept in every row for existing readers (docs/results/README.md)
ALIASES = {"ceiling": "self", "rotated": "transferred_on_b"}
COLOURS = {"self": "#2b8a3e", "naive": "#c92a2a", "transferred_on_b": "#1c7ed6",
           "transferred_against_a": "#4dabf7", "shuffled_null_on_b": "#f08c00",
           "floor": "#868e96"}


@torch.no_grad()
def sae_codes_and_reconstruction(sae, x: torch.Tensor, batch_size: int = 8192):
    feats, recon = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(dtype=sae.dtype, device=sae.device)
        f = sae.encode(xb)
        feats.append(f.float().cpu())
        recon.append(sae.decode(f).float().cpu())
    return torch.cat(feats), torch.cat(recon)


def standardised_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature centred codes scaled to unit norm over rows, and which features vary at all."""
    centred = codes - codes.mean(0)
    norms = centred.norm(dim=0)
    varies = norms > 0
    return centred / norms.clamp(min=1e-30), varies


def firing_overlap(std_a: tuple[torch.Tensor, torch.Tensor], codes_b: torch.Tensor) -> dict:
    """Mean per-feature Pearson correlation between two row-aligned code matrices.

    ``std_a`` is :func:`standardised_codes` of the first matrix (computed once per site).
    """
    za, varies_a = std_a
    zb, varies_b = standardised_codes(codes_b)
    ok = varies_a & varies_b
    corr = (za * zb).sum(0)[ok]
    return {
        "mean_pearson": float(corr.double().mean()) if ok.any() else float("nan"),
        "n_features_compared": int(ok.sum()),
    }


class _Target:
    """Per-sequence sums of one target matrix x, shared by every prediction scored against it
    (only the squared error differs between them)."""

    def __init__(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        self.x = x
        self.groups = groups
        self.base = EVSums.from_rows(x, x, groups)

    def sums(self, x_hat: torch.Tensor) -> EVSums:
        sq = (x_hat.double() - self.x.double()).pow(2).sum(1)
        sse = torch.zeros_like(self.base.n).index_add_(0, self._index, sq)
        return dataclasses.replace(self.base, sse=sse)

    @functools.cached_property
    def _index(self) -> torch.Tensor:
        return torch.unique(self.groups, return_inverse=True)[1]


def null_band(fits: list[list[float]], level: float) -> list[float] | None:
    """Where the mean over P pairs of a single null fit each would fall with probability
    ``level``, from K null fits per pair: mean +- t_{P(K-1)} s sqrt((1 + 1/K) / P), s the
    between-fit standard deviation pooled over pairs (normal approximation); None if K < 2."""
    k = min(len(f) for f in fits)
    if k < 2:
        return None
    p = len(fits)
    centre = sum(sum(f) / len(f) for f in fits) / p
    ss = sum(sum((v - sum(f) / len(f)) ** 2 for v in f) for f in fits)
    dof = sum(len(f) - 1 for f in fits)
    s = math.sqrt(ss / dof)
    half = float(stats.t.ppf((1 + level) / 2, dof)) * s * math.sqrt((1 + 1 / k) / p)
    return [centre - half, centre + half]


class SAETransfer(AnalysisCallback):
    """SAE transfer between seeds, read against self, the shuffled-pairing null and the floor.

    Args:
        save_transferred: write every transferred SAE (SAELens format) into the analysis folder.
        null_shuffles: shuffled-pairing null fits per (pair, site) (0: no null).
        null_seed: seeds the first shuffle (+k for the k-th).
        margin: EV differences smaller than this (in [0, 1]) read as "at".
        n_boot, level, boot_seed: the sequence bootstrap (n_boot >= 100).
    """

    name = "sae_transfer"

    def __init__(self, save_transferred: bool = True, null_shuffles: int = 3,
                 null_seed: int = 0, margin: float = 0.01, n_boot: int = 1000,
                 level: float = 0.95, boot_seed: int = 0) -> None:
        if int(null_shuffles) < 0:
            raise ValueError(f"null_shuffles={null_shuffles} must be >= 0 (0: no null)")
        self.save_transferred = save_transferred
        self.null_shuffles = int(null_shuffles)
        self.null_seed = int(null_seed)
        self.margin = check_margin(margin)
        self.n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
        self.level = float(level)
        self.boot_seed = int(boot_seed)

    # -- computation ---------------------------------------------------------------------

    def _null_rotations(self, ctx, a: int, b: int, site: str) -> list:
        groups = ctx.batches["fit"].row_sequences()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # rank-deficient sites: expected
            return [fit_rotation_shuffled(ctx.acts["fit"][b][site], ctx.acts["fit"][a][site],
                                          seed=self.null_seed + k, groups=groups,
                                          group=ctx.group, precision=ctx.fit_precision)
                    for k in range(self.null_shuffles)]

    def run(self, ctx) -> dict:
        rows, skipped = [], []
        groups = ctx.batches[ctx.score_batch].row_sequences()
        # EV sums hold one entry per sequence with a row
        boot = SequenceBootstrap(int(groups.unique().numel()), self.n_boot, self.level,
                                 self.boot_seed)
        own: dict = {}  # (seed, site) -> SAE a's codes and reconstruction of its own activations
        reps: dict = {}  # (pair, site) -> kind -> definition -> [B] replicates
        for (a, b), site in ctx.progress(
            [(p, s) for p in ctx.pairs for s in ctx.sites], desc="sae_transfer (pair, site)"
        ):
            saved = ctx.saes.get(a, {}).get(site)
            if saved is None:
                skipped.append(f"pair {a},{b} at {site}: seed {a} has no SAE there")
                continue
            sae = saved.sae
            x_a, x_b = ctx.scoring_acts(a, site), ctx.scoring_acts(b, site)
            rotation = ctx.rotation(a, b, site)
            x_b_in_a = rotation.apply(x_b).float()
            if (a, site) not in own:
                codes_a, rec_a = sae_codes_and_reconstruction(sae, x_a)
                own[(a, site)] = (standardised_codes(codes_a), rec_a,
                                  float((codes_a != 0).sum(1).double().mean()))
            std_a, rec_a, l0_a = own[(a, site)]
            codes_naive, rec_naive = sae_codes_and_reconstruction(sae, x_b)
            codes_rot, rec_rot = sae_codes_and_reconstruction(sae, x_b_in_a)
            floor = x_a.double().mean(0, keepdim=True).expand_as(x_a)
            against_a = _Target(x_a, groups)  # the sums of x are shared by every prediction
            sums = {
                "self": against_a.sums(rec_a),
                "naive": _Target(x_b, groups).sums(rec_naive),
                "transferred_on_b": _Target(x_b_in_a, groups).sums(rec_rot),
                "transferred_against_a": against_a.sums(rec_rot),
                "rotation": against_a.sums(x_b_in_a),
                "floor": against_a.sums(floor),
            }
            row: dict = {"pair": [a, b], "site": site}
            rep: dict = {}
            for kind, s in sums.items():
                rep[kind] = boot.ev(s)
                for definition, value in ev_from_sums(s).items():
                    row[f"{kind}_{definition}"] = float(value)
            if self.null_shuffles:
                self._null(ctx, a, b, site, sae, against_a, x_b, groups, boot, row, rep)
            for kind, per_def in rep.items():
                for definition, r in per_def.items():
                    row[f"{kind}_{definition}_ci"] = boot.ci(r, row[f"{kind}_{definition}"])
            for old, new in ALIASES.items():
                for definition in DEFINITIONS:
                    row[f"{old}_{definition}"] = row[f"{new}_{definition}"]
            row["firing_overlap_raw"] = firing_overlap(std_a, codes_naive)
            row["firing_overlap_rotated"] = firing_overlap(std_a, codes_rot)
            row["l0_self"] = l0_a
            if self.save_transferred:
                row["transferred_sae"] = self._save(ctx, saved, rotation, a, b, site)
            rows.append(row)
            reps[((a, b), site)] = rep
        per_site = {}
        for site in ctx.sites:
            keys = [k for k in reps if k[1] == site]
            if keys:
                per_site[site] = self._site_summary([r for r in rows if r["site"] == site],
                                                    [reps[k] for k in keys], boot)
        return {
            "definitions": self._definitions(ctx),
            "scored_batch": ctx.score_batch,
            "null_shuffles": self.null_shuffles,
            "margin": self.margin,
            "rows": rows,
            "per_site": per_site,
            "skipped": skipped,
        }

    def _null(self, ctx, a, b, site, sae, against_a, x_b, groups, boot, row, rep) -> None:
        """The shuffled-pairing null: the mean over the shuffles, and each shuffle's value."""
        per_fit: dict = {k: [] for k in NULL_KINDS}
        for rot in self._null_rotations(ctx, a, b, site):
            x_k = rot.apply(x_b).float()
            _, rec_k = sae_codes_and_reconstruction(sae, x_k)
            per_fit["shuffled_null_on_b"].append(_Target(x_k, groups).sums(rec_k))
            per_fit["shuffled_null_against_a"].append(against_a.sums(rec_k))
            per_fit["shuffled_null_rotation"].append(against_a.sums(x_k))
        for kind, sums in per_fit.items():
            points = [ev_from_sums(s) for s in sums]
            fits = [boot.ev(s) for s in sums]
            rep[kind] = {d: torch.stack([f[d] for f in fits]).mean(0) for d in DEFINITIONS}
            for d in DEFINITIONS:
                values = [float(p[d]) for p in points]
                row[f"{kind}_{d}"] = sum(values) / len(values)
                row[f"{kind}_{d}_fits"] = values

    def _site_summary(self, rows: list[dict], reps: list[dict], boot) -> dict:
        out: dict = {"n_pairs": len(rows)}
        for kind in reps[0]:
            for d in DEFINITIONS:
                key = f"{kind}_{d}"
                points = [r[key] for r in rows]
                out[key] = mean(points)
                out[f"{key}_ci"] = boot.over_pairs([rp[kind][d] for rp in reps], points)
                if kind in NULL_KINDS:
                    out[f"{key}_band"] = null_band([r[f"{key}_fits"] for r in rows],
                                                   self.level)
        for d in DEFINITIONS:
            # differences under the shared resamples: their intervals are paired
            for name, (x, y) in {"transferred_on_b_minus_self": ("transferred_on_b", "self"),
                                 "transferred_against_a_minus_self": ("transferred_against_a",
                                                                      "self")}.items():
                diffs = [rp[x][d] - rp[y][d] for rp in reps]
                points = [r[f"{x}_{d}"] - r[f"{y}_{d}"] for r in rows]
                out[f"{name}_{d}"] = mean(points)
                out[f"{name}_{d}_ci"] = boot.over_pairs(diffs, points)
        m = self.margin
        rel: dict = {}
        for d in DEFINITIONS:
            for kind in ("on_b", "against_a"):
                null = out.get(f"shuffled_null_{kind}_{d}_band")
                if f"shuffled_null_{kind}_{d}" not in out:
                    continue
                band = tuple(null) if null else (out[f"shuffled_null_{kind}_{d}"],) * 2
                rel[f"transferred_{kind}_vs_shuffled_null_{d}"] = relation_to_band(
                    out[f"transferred_{kind}_{d}"], out[f"transferred_{kind}_{d}_ci"], band, m)
            for name in ("transferred_on_b_minus_self", "transferred_against_a_minus_self"):
                rel[f"{name.replace('_minus_', '_vs_')}_{d}"] = relation(
                    out[f"{name}_{d}"], out[f"{name}_{d}_ci"], 0.0, m)
        out["relations"] = rel
        return out

    def _definitions(self, ctx) -> dict:
        return {
            **EV_DEFINITIONS,
            "self": "SAE of seed a on seed a's own activations (the ceiling of any transfer)",
            "naive": "SAE of seed a on seed b's activations, unchanged",
            "transferred_on_b": "SAE of seed a on seed b's activations mapped into a's frame by "
            "the rotation R fitted on the fit batch, scored against those mapped activations "
            "R(x_b): equal to the transferred SAE's EV on seed b in b's frame (the published "
            "'rotated' EV)",
            "transferred_against_a": "the same reconstruction SAE_a(R(x_b)) scored against seed "
            "a's own activations x_a on the same inputs",
            "rotation": "R(x_b) itself as a prediction of x_a (the rotation's activation EV)",
            "shuffled_null_on_b / shuffled_null_against_a / shuffled_null_rotation": "the same "
            "three with R replaced by the shuffled-pairing null fit (fit batch: seed b's "
            "sequences re-paired with other sequences of the same length, "
            "align.procrustes.fit_rotation_shuffled), which matches the activation "
            f"distributions as sets but not point by point; mean over {self.null_shuffles} "
            "shuffles (null_seed + k); *_fits: each shuffle's value; per_site *_band: where "
            "the site's mean transferred value falls with the given level if the fitted "
            "rotation were one more shuffled fit (mean over pairs and shuffles +- t * s * "
            "sqrt((1 + 1/K) / P), s the between-shuffle standard deviation pooled over the P "
            "pairs, K shuffles per pair; none with one shuffle)",
            "floor": "predict the per-dimension mean of seed a's activations",
            "ceiling_ev_standard / ceiling_ev_published": "old name of self_* (kept for "
            "existing readers)",
            "rotated_ev_standard / rotated_ev_published": "old name of transferred_on_b_* (kept "
            "for existing readers)",
            "transferred_on_b_minus_self / transferred_against_a_minus_self": "per-site mean "
            "over pairs of the difference, its interval from the shared resamples (paired)",
            "relations": "above / at / below, margin "
            f"{self.margin}: transferred vs shuffled null = the transferred interval against "
            "the null's band (its value with one shuffle); vs self = the interval of the "
            "difference against 0",
            "firing_overlap": "mean over features of the Pearson correlation (over rows) of SAE "
            "a's activation on a versus on b (raw / rotated); features constant on either side "
            "excluded",
            "mean_pearson": "that mean over the n_features_compared features",
            "l0_self": "mean number of active features of SAE a on its own scored activations",
            "per_site": "means over the site's pairs; *_ci over pairs and sequences",
            "scored_on": f"the {ctx.score_batch} batch",
            "null_shuffles": "shuffled-pairing fits per (pair, site)",
            "margin": "the practical-equivalence margin of the relations (EV units)",
            **INTERVAL_DEFINITION,
        }

    def _save(self, ctx, saved, rotation, a: int, b: int, site: str) -> str:
        from polymorph.align.transfer import transfer_sae
        from polymorph.sae.io import save_sae

        folder = ctx.out_dir / "transferred_saes" / f"seed={a}_to_seed={b}" / site
        moved = transfer_sae(saved.sae, rotation)
        meta = getattr(moved.cfg, "metadata", None)
        if meta is not None and getattr(meta, "model_name", None):
            # it now reads seed b's residual stream at the same hook
            meta.model_name = f"{meta.model_name} -> transferred to seed={b}"
        metadata = {
            **saved.metadata,
            "transferred": {
                "from_seed": a,
                "to_seed": b,
                "site": site,
                "meaning": f"SAE trained on seed {a}, rewritten to read seed {b}'s activations "
                f"directly (rotation fitted on the analysis fit batch, group {ctx.group})",
            },
        }
        save_sae(moved, folder, metadata=metadata, metrics={})
        return str(folder.relative_to(ctx.out_dir))

    # -- outputs -------------------------------------------------------------------------

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for row in result["rows"]:
            key = f"seed={row['pair'][1]}/{row['site']}"
            for kind in (*KINDS, *ALIASES):
                value = row.get(f"{kind}_ev_standard")
                if value is not None:
                    out[f"{key}/{kind}_ev_standard"] = value
        return out

    def tables(self, result: dict):
        kinds = [k for k in KINDS if result["rows"] and f"{k}_ev_standard" in result["rows"][0]]
        cols = ["seed_a", "seed_b", "site"] + [f"{k}_{d}" for k in kinds for d in DEFINITIONS]
        rows = [[r["pair"][0], r["pair"][1], r["site"]]
                + [r[f"{k}_{d}"] for k in kinds for d in DEFINITIONS] for r in result["rows"]]
        return {"sae_transfer_ev": (cols, rows)}

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        summary = result["per_site"]
        if not summary:
            return []
        kinds = [k for k in COLOURS if f"{k}_ev_standard" in next(iter(summary.values()))]
        sites = list(summary)
        fig, ax = plt.subplots(figsize=(max(6.5, 2.0 * len(sites)), 4))
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(sites))]
            vals = [summary[s][f"{kind}_ev_standard"] for s in sites]
            cis = [summary[s].get(f"{kind}_ev_standard_ci") for s in sites]
            ax.bar(xs, vals, width, yerr=error_bars(vals, cis), capsize=2,
                   label=kind.replace("_", " "), color=COLOURS[kind])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels([s.replace("blocks.", "").replace("hook_resid_", "") for s in sites])
        ax.set_ylabel(f"explained variance (ev_standard, {ctx.score_batch})")
        lo = min(summary[s][f"{k}_ev_standard"] for s in sites for k in kinds)
        ax.set_ylim(max(lo - 0.1, -2.0), 1.05)
        ax.legend(fontsize=7)
        ax.set_title("SAE transfer, mean over pairs (error bars: 95% intervals over pairs and "
                     "sequences)", fontsize=9)
        return [save(fig, fig_dir / "sae_transfer_ev.png")]

    def reading(self, site: str, s: dict, n_shuffles: int) -> str:
        """One sentence per site, generated from the comparisons."""
        rel = s["relations"]
        d = "ev_standard"
        text = (f"`{site}`: the transferred SAE's EV on seed b "
                f"{fmt_ci(s[f'transferred_on_b_{d}'], s.get(f'transferred_on_b_{d}_ci'))} is "
                f"{rel[f'transferred_on_b_vs_self_{d}']} self "
                f"{fmt(s[f'self_{d}'])}")
        if f"transferred_on_b_vs_shuffled_null_{d}" in rel:
            band = s.get(f"shuffled_null_on_b_{d}_band")
            spread = (f"band {fmt(band[0])}..{fmt(band[1])} over {n_shuffles} shuffles"
                      if band else "one shuffle, no spread")
            text += (f" and {rel[f'transferred_on_b_vs_shuffled_null_{d}']} the "
                     f"shuffled-pairing null {fmt(s[f'shuffled_null_on_b_{d}'])} ({spread}: "
                     "what matching the distributions alone gives)")
        against = fmt_ci(s[f"transferred_against_a_{d}"], s.get(f"transferred_against_a_{d}_ci"))
        text += (f"; scored against seed a's own activations on the same inputs it is {against}"
                 f" ({rel[f'transferred_against_a_vs_self_{d}']} self")
        if f"transferred_against_a_vs_shuffled_null_{d}" in rel:
            text += (f", {rel[f'transferred_against_a_vs_shuffled_null_{d}']} its null "
                     f"{fmt(s[f'shuffled_null_against_a_{d}'])}")
        text += (f"), where the rotation alone predicts seed a with EV {fmt(s[f'rotation_{d}'])}"
                 f"; naive {fmt(s[f'naive_{d}'])}.")
        return text

    def report(self, ctx, result: dict, figures) -> str:
        summary = result["per_site"]
        lines = [
            "## SAE transfer (`sae_transfer`)",
            "",
            f"Seed a's SAE on: its own activations (self), seed b's raw activations (naive), and "
            f"seed b's activations rotated into a's frame, scored two ways: against those rotated "
            f"activations (transferred on b = the transferred SAE's EV on seed b, the published "
            f"'rotated' EV) and against seed a's own activations on the same inputs (transferred "
            f"vs a). Rotation = the rotated activations as a prediction of a's; shuffled null = "
            f"the same with a rotation fitted between mismatched sequences "
            f"({result['null_shuffles']} shuffles; distribution matching alone); floor = "
            f"predict a's mean. Mean over {len(ctx.pairs)} pair(s), scored on the "
            f"{ctx.score_batch} batch, ev_standard with 95% intervals over pairs and sequences "
            f"(ev_published and every per-pair value in results.json).",
            "",
            "| site | self | naive | transferred on b | null on b | transferred vs a | "
            "null vs a | rotation | null rotation | floor |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        d = "ev_standard"
        for site, s in summary.items():
            cells = []
            for kind in ("self", "naive", "transferred_on_b", "shuffled_null_on_b",
                         "transferred_against_a", "shuffled_null_against_a", "rotation",
                         "shuffled_null_rotation", "floor"):
                cells.append(fmt_ci(s.get(f"{kind}_{d}"), s.get(f"{kind}_{d}_ci")))
            lines.append(f"| `{site}` | " + " | ".join(cells) + " |")
        for site, s in summary.items():
            lines += ["", self.reading(site, s, result["null_shuffles"])]
        overlap = []
        for site in summary:
            rows = [r for r in result["rows"] if r["site"] == site]
            raw = mean(r["firing_overlap_raw"]["mean_pearson"] for r in rows)
            rot = mean(r["firing_overlap_rotated"]["mean_pearson"] for r in rows)
            overlap.append(f"`{site}` raw {fmt(raw)}, rotated {fmt(rot)}")
        lines += ["", "Firing overlap (mean per-feature Pearson of SAE a's codes on a vs on b): "
                  + "; ".join(overlap) + "."]
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        if result["skipped"]:
            lines += ["", "Skipped: " + "; ".join(result["skipped"])]
        return "\n".join(lines)
