"""haar: do the fitted rotations look like uniform (Haar) random draws?

Per (pair, site): ||R - I||_F (and its ratio to sqrt(2d)), the trace against a
Monte-Carlo Haar null of the same d and group (z-score, p-value), the published
KS test of eigen-angles, and the estimated dimension of the near-fixed subspace.
Pooled per site and over everything. Rotation matrices are saved as
``rotations.safetensors`` in the analysis folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from polymorph.align.haar import diagnose_many, haar_null
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import plt, save

ROTATIONS_FILE = "rotations.safetensors"


def rotation_key(a: int, b: int, site: str) -> str:
    return f"seed={a}/seed={b}/{site}"


class HaarDiagnosticsCallback(AnalysisCallback):
    """Args: null_samples: Monte-Carlo Haar draws per (d, group) for p-values and bands."""

    name = "haar"

    def __init__(self, null_samples: int = 1000) -> None:
        if int(null_samples) < 2:
            raise ValueError(f"null_samples must be >= 2, got {null_samples}")
        self.null_samples = int(null_samples)

    def run(self, ctx) -> dict:
        n_null = self.null_samples
        rows, per_site = [], {}
        self._angles: dict[str, np.ndarray] = {}
        self._null = {}
        for site in ctx.progress(ctx.sites, desc="haar (site)"):
            mats = [ctx.rotation(a, b, site).matrix for a, b in ctx.pairs]
            d = mats[0].shape[0]
            null = haar_null(d, ctx.group, n_null)
            self._null[site] = null
            diag = diagnose_many(mats, null)
            for (a, b), m in zip(ctx.pairs, diag.per_matrix):
                rows.append({"pair": [a, b], "site": site, **m.to_dict(include_angles=False)})
            per_site[site] = {k: v for k, v in diag.to_dict().items() if k != "per_matrix"}
            per_site[site]["null"] = self._null_band(null)
            self._angles[site] = np.concatenate([np.asarray(m.eigen_angles) for m in diag.per_matrix])
        self._save_rotations(ctx)
        return {
            "definitions": {
                "frob_dist": "||R - I||_F; for Haar R about sqrt(2d)",
                "frob_ratio": "||R - I||_F / sqrt(2d)",
                "trace_z": "(tr R - E[tr]) / sqrt(Var[tr]) with the exact Haar moments of the same d "
                "and group (Diaconis & Shahshahani: mean 0, variance 1 for d >= 3)",
                "trace_p": "two-sided Monte-Carlo p-value of tr R under the Haar null",
                "ks_p": "two-sample KS p-value of R's eigen-angles |arg(lambda)| against pooled Haar "
                "angles (the published test; insensitive to a few preserved dimensions)",
                "fixed_dim_estimate": "number of near-fixed directions (eigen-angles below the null's "
                "threshold) in excess of what a Haar draw gives",
                "null": f"{n_null} Haar draws per (d, group={ctx.group}); band = central 95% of ||R - I||_F",
                "trace": "tr R", "det": "det R (+1 or -1)",
                "ks_stat": "the KS statistic of that test",
                "fixed_threshold": "the eigen-angle (radians) below which a direction counts as "
                "near-fixed", "fixed_count": "eigen-angles of R below fixed_threshold",
                "fixed_forced": "angles at 0 forced by det R and the parity of d (0 or 1)",
                "fixed_expected": "mean count of free Haar angles below fixed_threshold",
                "frob_mean / frob_q025 / frob_q975": "mean and 2.5% / 97.5% quantiles of ||R - I||_F "
                "over the null's draws",
                "trace_mean / trace_std": "mean and standard deviation of tr R over the null's draws",
            },
            "rows": rows,
            "per_site": per_site,
            "rotations_file": ROTATIONS_FILE,
        }

    @staticmethod
    def _null_band(null) -> dict:
        frob = np.sqrt(np.maximum(0.0, 2 * null.d - 2 * null.traces))
        return {
            "frob_mean": float(frob.mean()),
            "frob_q025": float(np.quantile(frob, 0.025)),
            "frob_q975": float(np.quantile(frob, 0.975)),
            "trace_mean": null.trace_mean,
            "trace_std": null.trace_std,
            "n_samples": null.n_samples,
        }

    def _save_rotations(self, ctx) -> None:
        tensors = {}
        for (a, b, site), rot in ctx.rotations.items():
            key = rotation_key(a, b, site)
            tensors[f"{key}/matrix"] = rot.matrix.contiguous()
            tensors[f"{key}/source_mean"] = rot.source_mean.contiguous()
            tensors[f"{key}/target_mean"] = rot.target_mean.contiguous()
        meta = {
            "convention": "key seed=a/seed=b/site: x_b -> (x_b - source_mean) @ matrix + target_mean "
            "maps seed b's activations into seed a's frame",
            "group": ctx.group,
        }
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(ctx.out_dir / ROTATIONS_FILE), metadata=meta)

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        paths = []
        sites = list(self._angles)
        fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3), squeeze=False)
        for ax, site in zip(axes[0], sites):
            ax.hist(self._null[site].pooled_angles, bins=40, range=(0, np.pi), density=True,
                    histtype="step", color="black", label="Haar null")
            ax.hist(self._angles[site], bins=40, range=(0, np.pi), density=True, alpha=0.6,
                    color="#1c7ed6", label="fitted R")
            ax.set_title(site.replace("blocks.", "").replace("hook_resid_", ""), fontsize=9)
            ax.set_xlabel("eigen-angle |arg λ|")
        axes[0][0].legend(fontsize=7)
        paths.append(save(fig, fig_dir / "haar_eigen_angles.png"))

        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(sites)), 3.5))
        for j, site in enumerate(sites):
            band = result["per_site"][site]["null"]
            ax.fill_between([j - 0.35, j + 0.35], band["frob_q025"], band["frob_q975"],
                            color="#ced4da", label="Haar 95% band" if j == 0 else None)
            vals = [r["frob_dist"] for r in result["rows"] if r["site"] == site]
            ax.scatter([j] * len(vals), vals, color="#1c7ed6", zorder=3,
                       label="fitted R" if j == 0 else None)
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels([s.replace("blocks.", "").replace("hook_resid_", "") for s in sites])
        ax.set_ylabel("||R - I||_F")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        paths.append(save(fig, fig_dir / "haar_frobenius.png"))
        return paths

    def histograms(self, result: dict) -> dict[str, list[float]]:
        return {f"{site}/eigen_angles": a.tolist() for site, a in getattr(self, "_angles", {}).items()}

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for site, s in result["per_site"].items():
            out[f"{site}/pooled_trace_z"] = s["pooled_trace_z"]
            out[f"{site}/pooled_ks_p"] = s["pooled_ks_p"]
        return out

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Are the rotations Haar-random? (`haar`)",
            "",
            "||R - I||_F against the Haar null's 95% band, the trace z-score (the sharper test), the "
            "pooled KS p-value of eigen-angles (the published test: p near 1 is what any Haar draw "
            "gives) and the estimated near-fixed dimension. Mean over pairs per site.",
            "",
            "| site | ‖R−I‖_F | Haar band | mean trace z | pooled trace z | pooled KS p | near-fixed dims |",
            "|---|---|---|---|---|---|---|",
        ]
        for site, s in result["per_site"].items():
            rows = [r for r in result["rows"] if r["site"] == site]
            frob = sum(r["frob_dist"] for r in rows) / len(rows)
            tz = sum(r["trace_z"] for r in rows) / len(rows)
            fixed = sum(r["fixed_dim_estimate"] for r in rows) / len(rows)
            band = s["null"]
            lines.append(
                f"| `{site}` | {frob:.2f} | {band['frob_q025']:.2f}–{band['frob_q975']:.2f} | {tz:+.2f} "
                f"| {s['pooled_trace_z']:+.2f} | {s['pooled_ks_p']:.3f} | {fixed:.1f} |"
            )
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
