"""map_family: is the seed-to-seed map a rotation, or would a general linear map do much better?

Per (pair (a, b), site): every family of ``polymorph.align.maps`` fitted from seed b's fit-batch
activations onto seed a's, scored on the scored batch (held out by default) under both EV
definitions; the orthogonal share = EV_standard(orthogonal) / EV_standard(affine); and linear CKA
of the two seeds' scored activations.
"""

from __future__ import annotations

from pathlib import Path

from polymorph.align.maps import MAP_FAMILIES, fit_map, linear_cka, score_map
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import plt, save

COLOURS = ["#868e96", "#1c7ed6", "#4dabf7", "#15aabf", "#f08c00", "#c92a2a"]


class MapFamily(AnalysisCallback):
    name = "map_family"

    def __init__(self, ridge: float = 0.0) -> None:
        self.ridge = float(ridge)

    def run(self, ctx) -> dict:
        rows = []
        for (a, b), site in ctx.progress(
            [(p, s) for p in ctx.pairs for s in ctx.sites], desc="map_family (pair, site)"
        ):
            src_fit, tgt_fit = ctx.acts["fit"][b][site], ctx.acts["fit"][a][site]
            src, tgt = ctx.scoring_acts(b, site), ctx.scoring_acts(a, site)
            row = {"pair": [a, b], "site": site}
            for family in MAP_FAMILIES:
                fitted = fit_map(src_fit, tgt_fit, family, ridge=self.ridge)
                for definition, value in score_map(fitted, src, tgt).items():
                    row[f"{family}_{definition}"] = value
            row["orthogonal_share"] = row["orthogonal_ev_standard"] / row["affine_ev_standard"]
            row["cka"] = linear_cka(src, tgt)
            rows.append(row)
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
                "cka": "linear CKA of the two seeds' scored activations (1 = identical up to "
                "rotation and isotropic scale)",
            },
            "families": list(MAP_FAMILIES),
            "rows": rows,
        }

    @staticmethod
    def per_site(ctx, result) -> dict:
        out = {}
        for site in ctx.sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            if rows:
                keys = [f"{f}_ev_standard" for f in result["families"]] + ["orthogonal_share", "cka"]
                out[site] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        return out

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        """One figure per site: held-out EV of every family, one bar per pair plus the mean."""
        fams = result["families"]
        paths = []
        for site in ctx.sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6.5, 3.4))
            means = [sum(r[f"{f}_ev_standard"] for r in rows) / len(rows) for f in fams]
            ax.bar(range(len(fams)), means, color=COLOURS[: len(fams)], alpha=0.8)
            for r in rows:
                ax.scatter(range(len(fams)), [r[f"{f}_ev_standard"] for f in fams], s=8,
                           color="black", zorder=3)
            ax.set_xticks(range(len(fams)))
            ax.set_xticklabels([f.replace("_", "\n") for f in fams], fontsize=7)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylim(max(-1.0, min(min(means), 0) - 0.05), 1.02)
            ax.set_ylabel(f"held-out EV (ev_standard, {ctx.score_batch})")
            ax.set_title(f"{site}: map families, bars = mean, dots = pairs", fontsize=9)
            paths.append(save(fig, fig_dir / f"map_family_{site}.png"))
        return paths

    def report(self, ctx, result: dict, figures) -> str:
        summary = self.per_site(ctx, result)
        fams = result["families"]
        lines = [
            "## Is the map a rotation? (`map_family`)",
            "",
            f"Held-out EV (ev_standard, {ctx.score_batch} batch) of seed a's activations from seed b's "
            "under each map family, fitted on the fit batch; orthogonal share = orthogonal / affine; "
            "linear CKA. Mean over pairs. An orthogonal share near 1 says the general linear map "
            "adds nothing to the rotation; well below 1, the seeds differ by more than a rotation.",
            "",
            "| site | " + " | ".join(fams) + " | orthogonal share | CKA |",
            "|---|" + "---|" * (len(fams) + 2),
        ]
        for site, s in summary.items():
            cells = [f"{s[f'{f}_ev_standard']:.3f}" for f in fams]
            lines.append(f"| `{site}` | " + " | ".join(cells)
                         + f" | {s['orthogonal_share']:.3f} | {s['cka']:.3f} |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)

    def scalars(self, result: dict) -> dict[str, float]:
        return {f"seed={r['pair'][1]}/{r['site']}/orthogonal_share": r["orthogonal_share"]
                for r in result["rows"]}
