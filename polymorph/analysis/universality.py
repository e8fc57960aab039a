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
    d = u.to_dict()
    d.pop("max_cosine", None)  # per-feature list: too long for results.json
    return d


class Universality(AnalysisCallback):
    name = "universality"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

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
            raw = decoder_universality(dec_a, dec_b, threshold=self.threshold)
            rot = decoder_universality(
                dec_a, dec_b, rotation=ctx.rotation(a, b, site), threshold=self.threshold
            )
            rows.append({"pair": [a, b], "site": site, "raw": _summary(raw), "rotated": _summary(rot)})
            self._hist[(a, b, site)] = (raw.max_cosine, rot.max_cosine)
        init = {s: ctx.run_configs[s].get("sae", {}) for s in ctx.seeds}
        return {
            "definitions": {
                "mean_max_cosine": "mean over SAE a's decoder directions of the max |cosine| "
                "... see polymorph.align.universality for the exact definition",
                "frac_above_threshold": f"fraction of SAE a's directions whose max cosine > {self.threshold}",
                "hungarian_mean_cosine": "mean cosine of a one-to-one assignment maximising total cosine",
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
            f"{self.threshold}, and Hungarian one-to-one mean cosine; raw vs with b rotated into "
            "a's frame. Mean over pairs.",
            "",
            "| site | max-cos raw | rotated | frac>thr raw | rotated | Hungarian raw | rotated |",
            "|---|---|---|---|---|---|---|",
        ]
        for site in ctx.sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            if not rows:
                continue

            def mean(kind, key):
                return sum(r[kind][key] for r in rows) / len(rows)

            lines.append(
                f"| `{site}` | {mean('raw', 'mean_max_cosine'):.3f} | {mean('rotated', 'mean_max_cosine'):.3f} "
                f"| {mean('raw', 'frac_above_threshold'):.3f} | {mean('rotated', 'frac_above_threshold'):.3f} "
                f"| {mean('raw', 'hungarian_mean_cosine'):.3f} | {mean('rotated', 'hungarian_mean_cosine'):.3f} |"
            )
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
