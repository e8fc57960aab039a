"""map_family: is the seed-to-seed map a rotation, or would a general linear map do much better?

Per (pair (a, b), site): every family of ``polymorph.align.maps`` fitted from seed b's fit-batch
activations onto seed a's, scored on the scored batch (held out by default) under both EV
definitions; the orthogonal share = EV_standard(orthogonal) / EV_standard(affine); and linear CKA
of the two seeds' scored activations. Between the scaled rotation and the affine map, the
scaled rotation plus a linear correction of rank k (``fit_rank_corrected_maps``, for each k of
``ranks``) says how many directions the rest of the linear map needs.

Every EV and share has a percentile-bootstrap interval over the scored sequences (one set of
resamples for every family, so the share's interval is that of the ratio); per-site means over
pairs resample the pairs too. CKA is reported without an interval (it is not a function of
per-sequence sums of a fixed size: a resample would need the full Gram matrices again).
"""

from __future__ import annotations

from pathlib import Path

from polymorph.align.maps import MAP_FAMILIES, fit_map, fit_rank_corrected_maps, linear_cka
from polymorph.align.statistics import EVSums, ev_from_sums
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.intervals import (
    INTERVAL_DEFINITION,
    SequenceBootstrap,
    check_n_boot,
    error_bars,
    mean,
)
from polymorph.analysis.plots import plt, save
from polymorph.analysis.readings import fmt, fmt_ci

DEFINITIONS = ("ev_standard", "ev_published")

COLOURS = ["#868e96", "#1c7ed6", "#4dabf7", "#15aabf", "#f08c00", "#c92a2a"]


class MapFamily(AnalysisCallback):
    name = "map_family"

    def __init__(self, ridge: float = 0.0, n_boot: int = 1000, level: float = 0.95,
                 boot_seed: int = 0, ranks=(1, 2, 4, 8, 16)) -> None:
        self.ridge = float(ridge)
        ranks = list(ranks or [])
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ranks):
            raise ValueError(f"ranks={ranks} must be integers >= 1, e.g. [1, 2, 4, 8, 16] "
                             "(or [] for none)")
        self.ranks = sorted(set(ranks))
        self.n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
        self.level = float(level)
        self.boot_seed = int(boot_seed)

    def run(self, ctx) -> dict:
        rows = []
        groups = ctx.batches[ctx.score_batch].row_sequences()
        boot = SequenceBootstrap(int(groups.unique().numel()), self.n_boot, self.level,
                                 self.boot_seed)
        reps: dict = {}
        for (a, b), site in ctx.progress(
            [(p, s) for p in ctx.pairs for s in ctx.sites], desc="map_family (pair, site)"
        ):
            src_fit, tgt_fit = ctx.acts["fit"][b][site], ctx.acts["fit"][a][site]
            src, tgt = ctx.scoring_acts(b, site), ctx.scoring_acts(a, site)
            row = {"pair": [a, b], "site": site}
            rep: dict = {}
            for family in MAP_FAMILIES:
                fitted = fit_map(src_fit, tgt_fit, family, ridge=self.ridge)
                sums = EVSums.from_rows(fitted.apply(src.double()), tgt.double(), groups)
                rep[family] = boot.ev(sums)
                for definition, value in ev_from_sums(sums).items():
                    row[f"{family}_{definition}"] = float(value)
                    row[f"{family}_{definition}_ci"] = boot.ci(rep[family][definition],
                                                               float(value))
            self._rank_corrected(src_fit, tgt_fit, src, tgt, groups, boot, row, rep)
            row["orthogonal_share"] = row["orthogonal_ev_standard"] / row["affine_ev_standard"]
            rep["orthogonal_share"] = (rep["orthogonal"]["ev_standard"]
                                       / rep["affine"]["ev_standard"])
            row["orthogonal_share_ci"] = boot.ci(rep["orthogonal_share"], row["orthogonal_share"])
            row["cka"] = linear_cka(src, tgt)
            rows.append(row)
            reps[((a, b), site)] = rep
        per_site = {}
        for site in ctx.sites:
            keys = [k for k in reps if k[1] == site]
            site_rows = [r for r in rows if r["site"] == site]
            if not keys:
                continue
            entry: dict = {"n_pairs": len(keys)}
            for family in MAP_FAMILIES:
                for d in DEFINITIONS:
                    pts = [r[f"{family}_{d}"] for r in site_rows]
                    entry[f"{family}_{d}"] = mean(pts)
                    entry[f"{family}_{d}_ci"] = boot.over_pairs(
                        [reps[k][family][d] for k in keys], pts)
            pts = [r["orthogonal_share"] for r in site_rows]
            entry["orthogonal_share"] = mean(pts)
            entry["orthogonal_share_ci"] = boot.over_pairs(
                [reps[k]["orthogonal_share"] for k in keys], pts)
            entry["cka"] = mean(r["cka"] for r in site_rows)
            for d in DEFINITIONS:
                name = f"rank_corrected_{d}"
                ranks = [k for k in site_rows[0][name]]
                entry[name] = {k: mean([r[name][k] for r in site_rows]) for k in ranks}
                entry[f"{name}_ci"] = {
                    k: boot.over_pairs([reps[key][name][k] for key in keys],
                                       [r[name][k] for r in site_rows]) for k in ranks}
            closed = [r["gap_closed"] for r in site_rows]
            entry["gap_closed"] = {
                k: (None if any(c[k] is None for c in closed) else mean([c[k] for c in closed]))
                for k in site_rows[0]["gap_closed"]}
            per_site[site] = entry
        return {
            "definitions": {
                "<family>_ev_standard / _ev_published": "EV of seed a's activations predicted by the "
                "family's map of seed b's, fitted on the fit batch, scored on the "
                f"{ctx.score_batch} batch (definitions as in polymorph.align.metrics)",
                "families": "identity: x; orthogonal / special_orthogonal: centre, R in O(d) / SO(d), "
                "add a's mean; scaled_orthogonal: the same times one global scale; linear: x W by "
                "least squares through the origin; affine: centred least squares plus a's mean"
                + (f" (ridge {self.ridge})" if self.ridge else ""),
                "orthogonal_share": "ev_standard(orthogonal) / ev_standard(affine): 1 means the best "
                "general linear map adds nothing to a rotation",
                "rank_corrected_ev_standard / rank_corrected_ev_published": "keyed by k: EV "
                "(as above) of the scaled rotation plus a linear correction of rank <= k, fitted "
                "jointly on the fit batch by alternating least squares (polymorph.align.maps."
                "fit_rank_corrected: at most 200 iterations, stopping early once an iteration "
                "gains less than 1e-8 of the variance); k = 0 is scaled_orthogonal, k = d would "
                "be affine",
                "gap_closed": "keyed by k: (ev_standard(rank k) - ev_standard(scaled_orthogonal)) "
                "/ (ev_standard(affine) - ev_standard(scaled_orthogonal)), the share of what the "
                "general linear map adds to the scaled rotation that k directions recover; null "
                "where that gap is below 1e-6",
                "ranks": "the correction ranks fitted (those below the activations' dimension)",
                "cka": "linear CKA of the two seeds' scored activations (1 = identical up to "
                "rotation and isotropic scale); no interval",
                "per_site": "means over the site's pairs; *_ci over pairs and sequences",
                **INTERVAL_DEFINITION,
            },
            "families": list(MAP_FAMILIES),
            "ranks": sorted({int(k) for r in rows for k in r["rank_corrected_ev_standard"]}),
            "rows": rows,
            "per_site": per_site,
        }

    def _rank_corrected(self, src_fit, tgt_fit, src, tgt, groups, boot, row, rep) -> None:
        """The scaled rotation plus a rank-k linear correction, for every k below d."""
        d = src.shape[1]
        for definition in DEFINITIONS:
            row[f"rank_corrected_{definition}"] = {}
            row[f"rank_corrected_{definition}_ci"] = {}
            rep[f"rank_corrected_{definition}"] = {}
        row["gap_closed"] = {}
        gap = row["affine_ev_standard"] - row["scaled_orthogonal_ev_standard"]
        ranks = [k for k in self.ranks if k < d]
        for k, fitted in fit_rank_corrected_maps(src_fit, tgt_fit, ranks).items():
            sums = EVSums.from_rows(fitted.apply(src.double()), tgt.double(), groups)
            reps = boot.ev(sums)
            for definition, value in ev_from_sums(sums).items():
                name = f"rank_corrected_{definition}"
                row[name][str(k)] = float(value)
                row[f"{name}_ci"][str(k)] = boot.ci(reps[definition], float(value))
                rep[name][str(k)] = reps[definition]
            row["gap_closed"][str(k)] = (
                None if gap < 1e-6
                else (row["rank_corrected_ev_standard"][str(k)]
                      - row["scaled_orthogonal_ev_standard"]) / gap)

    @staticmethod
    def per_site(ctx, result) -> dict:
        return result["per_site"]

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        """One figure per site: held-out EV of every family, one bar per pair plus the mean."""
        fams = result["families"]
        paths = []
        for site in ctx.sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6.5, 3.4))
            s = result["per_site"][site]
            means = [s[f"{f}_ev_standard"] for f in fams]
            cis = [s.get(f"{f}_ev_standard_ci") for f in fams]
            ax.bar(range(len(fams)), means, yerr=error_bars(means, cis), capsize=2,
                   color=COLOURS[: len(fams)], alpha=0.8)
            for r in rows:
                ax.scatter(range(len(fams)), [r[f"{f}_ev_standard"] for f in fams], s=8,
                           color="black", zorder=3)
            ax.set_xticks(range(len(fams)))
            ax.set_xticklabels([f.replace("_", "\n") for f in fams], fontsize=7)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylim(max(-1.0, min(min(means), 0) - 0.05), 1.02)
            ax.set_ylabel(f"held-out EV (ev_standard, {ctx.score_batch})")
            ax.set_title(f"{site}: map families, bars = mean (95% intervals), dots = pairs",
                         fontsize=9)
            paths.append(save(fig, fig_dir / f"map_family_{site}.png"))
        ranks = result.get("ranks", [])
        if ranks:
            paths.append(self._rank_figure(result, ranks, fig_dir))
        return paths

    @staticmethod
    def _rank_figure(result: dict, ranks: list[int], fig_dir: Path) -> Path:
        """Held-out EV against the correction's rank, every site: 0 = the scaled rotation,
        the dotted level = the affine map."""
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for i, (site, s) in enumerate(result["per_site"].items()):
            ks = [k for k in ranks if str(k) in s["rank_corrected_ev_standard"]]
            xs = [0, *ks]
            ys = [s["scaled_orthogonal_ev_standard"],
                  *[s["rank_corrected_ev_standard"][str(k)] for k in ks]]
            cis = [s.get("scaled_orthogonal_ev_standard_ci"),
                   *[s["rank_corrected_ev_standard_ci"][str(k)] for k in ks]]
            colour = f"C{i}"
            ax.errorbar(xs, ys, yerr=error_bars(ys, cis), marker="o", ms=3, capsize=2,
                        color=colour, label=site)
            ax.axhline(s["affine_ev_standard"], color=colour, ls=":", lw=0.9)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks([0, *ranks])
        ax.set_xticklabels([str(k) for k in [0, *ranks]])
        ax.set_xlabel("rank of the linear correction on top of the scaled rotation")
        ax.set_ylabel("held-out EV (ev_standard)")
        ax.set_title("scaled rotation + rank-k correction (dotted: affine), 95% intervals",
                     fontsize=9)
        ax.legend(fontsize=7)
        return save(fig, fig_dir / "map_family_ranks.png")

    def report(self, ctx, result: dict, figures) -> str:
        summary = self.per_site(ctx, result)
        fams = result["families"]
        lines = [
            "## Is the map a rotation? (`map_family`)",
            "",
            f"Held-out EV (ev_standard, {ctx.score_batch} batch) of seed a's activations from seed b's "
            "under each map family, fitted on the fit batch; orthogonal share = orthogonal / affine; "
            "linear CKA (no interval). Mean over pairs, 95% intervals over pairs and sequences. An "
            "orthogonal share near 1 says the general linear map "
            "adds nothing to the rotation; well below 1, the seeds differ by more than a rotation.",
            "",
            "| site | " + " | ".join(fams) + " | orthogonal share | CKA |",
            "|---|" + "---|" * (len(fams) + 2),
        ]
        for site, s in summary.items():
            cells = [fmt_ci(s[f"{f}_ev_standard"], s.get(f"{f}_ev_standard_ci")) for f in fams]
            lines.append(f"| `{site}` | " + " | ".join(cells)
                         + f" | {fmt_ci(s['orthogonal_share'], s.get('orthogonal_share_ci'))}"
                         f" | {fmt(s['cka'])} |")
        ranks = [str(k) for k in result.get("ranks", [])]
        if ranks:
            lines += [
                "",
                "How many directions does the rest of the linear map need? Held-out EV "
                "(ev_standard) of the scaled rotation plus a linear correction of rank k, fitted "
                "jointly; in parentheses the share of the scaled-rotation-to-affine gap it closes. "
                "A gap closed by a few directions is a low-rank linear part; one that closes only "
                "as k nears d is spread over the whole space (a correction of d equal singular "
                "values on isotropic inputs closes k / d of it); what the affine map leaves is "
                "not linear at all.",
                "",
                "| site | scaled orthogonal | " + " | ".join(f"+ rank {k}" for k in ranks)
                + " | affine |",
                "|---|---|" + "---|" * (len(ranks) + 1),
            ]
            for site, s in summary.items():
                cells = []
                for k in ranks:
                    if k not in s["rank_corrected_ev_standard"]:
                        cells.append("-")
                        continue
                    closed = s["gap_closed"].get(k)
                    cells.append(fmt(s["rank_corrected_ev_standard"][k])
                                 + ("" if closed is None else f" ({closed:.2f})"))
                lines.append(f"| `{site}` | {fmt(s['scaled_orthogonal_ev_standard'])} | "
                             + " | ".join(cells) + f" | {fmt(s['affine_ev_standard'])} |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)

    def scalars(self, result: dict) -> dict[str, float]:
        return {f"seed={r['pair'][1]}/{r['site']}/orthogonal_share": r["orthogonal_share"]
                for r in result["rows"]}
