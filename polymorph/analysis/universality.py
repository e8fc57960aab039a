"""universality: do two seeds' SAE dictionaries contain the same directions?

Per (pair (a, b), site): for each decoder direction of SAE a, the max cosine
over SAE b's directions (mean, fraction above a threshold) and a one-to-one
Hungarian matching's mean cosine; raw, and with b's dictionary rotated into
a's frame by the fitted rotation. See ``polymorph.align.universality``.
"""

from __future__ import annotations

from pathlib import Path

from polymorph.align.universality import decoder_universality
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import plt, save


def _summary(u) -> dict:
    return u.to_dict(include_per_feature=False)  # per-feature lists stay out of results.json


class Universality(AnalysisCallback):
    name = "universality"

    def run(self, ctx) -> dict:
        rows, skipped = [], []
        self._hist = {}
        for (a, b), site in ctx.progress(
            [(p, s) for p in ctx.pairs for s in ctx.sites], desc="universality (pair, site)"
        ):
            sa, sb = ctx.saes.get(a, {}).get(site), ctx.saes.get(b, {}).get(site)
            if sa is None or sb is None:
                skipped.append(f"pair {a},{b} at {site}: SAE missing")
                continue
            dec_a, dec_b = sa.sae.W_dec.detach(), sb.sae.W_dec.detach()
            raw = decoder_universality(dec_a, dec_b)
            rot = decoder_universality(dec_a, dec_b, rotation=ctx.rotation(a, b, site))
            rows.append({"pair": [a, b], "site": site, "raw": _summary(raw), "rotated": _summary(rot)})
            self._hist[(a, b, site)] = (raw.max_cos, rot.max_cos)
        init = {s: ctx.run_configs[s].get("sae", {}) for s in ctx.seeds}
        return {
            "definitions": {
                "mean_max_cos": "mean over SAE a's decoder directions of the max cosine over SAE b's "
                "decoder directions (the published universality number)",
                "frac_above_0_5": "fraction of SAE a's directions whose max cosine exceeds 0.5",
                "hungarian_mean_cos": "mean cosine of the one-to-one matching (Hungarian algorithm) "
                "that maximises the total cosine",
                "hist_counts": "histogram of the per-feature max cosine on [-1, 1] (hist_edges)",
                "rotated": "SAE b's decoder directions multiplied by the fitted rotation (b -> a) first",
            },
            "sae_config_id": ctx.sae_config_id,
            "sae_init_seed_setting": {str(s): (dict(c).get("init_seed") if c else None) for s, c in init.items()},
            "rows": rows,
            "skipped": skipped,
        }

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        if not getattr(self, "_hist", None):
            return []
        fig, axes = plt.subplots(1, len(ctx.sites), figsize=(3.2 * len(ctx.sites), 3), squeeze=False)
        for ax, site in zip(axes[0], ctx.sites):
            for (a, b, s), (raw, rot) in self._hist.items():
                if s != site:
                    continue
                ax.hist(raw.numpy(), bins=40, range=(0, 1), alpha=0.5, color="#c92a2a", label="raw")
                ax.hist(rot.numpy(), bins=40, range=(0, 1), alpha=0.5, color="#1c7ed6", label="rotated")
                break  # first pair per site keeps the panel readable
            ax.set_title(site.replace("blocks.", "").replace("hook_resid_", ""), fontsize=9)
            ax.set_xlabel("max cosine")
        axes[0][0].legend(fontsize=8)
        return [save(fig, fig_dir / "universality_max_cosine.png")]

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Decoder universality (`universality`)",
            "",
            "Mean max-cosine of SAE a's decoder directions over SAE b's, fraction above "
            "0.5, and Hungarian one-to-one mean cosine; raw vs with b rotated into "
            "a's frame. Mean over pairs.",
            "",
            "| site | max-cos raw | rotated | frac>thr raw | rotated | Hungarian raw | rotated |",
            "|---|---|---|---|---|---|---|",
        ]
        for site in ctx.sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            if not rows:
                continue

            cells = [
                f"{sum(r[kind][key] for r in rows) / len(rows):.3f}"
                for key in ("mean_max_cos", "frac_above_0_5", "hungarian_mean_cos")
                for kind in ("raw", "rotated")
            ]
            lines.append(f"| `{site}` | " + " | ".join(cells) + " |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
