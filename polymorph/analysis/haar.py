"""haar: do the fitted rotations look like uniform (Haar) random draws?

Per (pair, site), every trace statistic is a z-score against the **exact** Haar moments of the
same d and group (Diaconis & Shahshahani: tr R has mean 0 and variance 1 for d >= 3); the
Monte-Carlo null (``null_samples`` draws) is used only for p-values, the ||R - I||_F band and the
eigen-angle distribution.

* **On the span.** Where a site's activations span r < d directions, R is determined only on
  that span (the fit's completion on the other d - r is arbitrary), so the full-matrix
  diagnostics (||R - I||_F, tr R, KS of eigen-angles, near-fixed count) would judge the
  completion: they are reported only where the span is all of d (``determined``). The trace of
  R compressed to the span (:func:`~polymorph.align.span.span_diagnostics`: tr(B^T R B),
  exact null mean 0 and variance r/d) is reported everywhere; it is the full trace test where
  r = d.
* **Without the shared directions.** Directions every seed shares by construction (the Dyck
  family's fixed positional code, ``family.shared_directions(d)``) are preserved by any fit, so
  a trace excess may come from them alone. The second statistic is the trace on the
  complement of those k directions (within the span where r < d), against the null "R leaves
  them invariant and is Haar on the other d - k" (exact moments of the compression of a Haar
  draw in d - k dimensions). It says whether any excess survives removing what the seeds share
  by construction. Families without such directions have none.

Pooled per site (sum of the pairs' z over sqrt(pairs), normal p-value; it treats the pairs as
independent, which pairs sharing the anchor are not), and the mean z over pairs with a
percentile interval over the pairs. Rotation matrices are saved as ``rotations.safetensors``
in the analysis folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import stats

from polymorph.align.drift import span_of_fit
from polymorph.align.haar import compressed_trace_moments, diagnose, haar_null, mc_two_sided_p
from polymorph.align.span import complement_basis, span_diagnostics
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.intervals import INTERVAL_DEFINITION, check_n_boot, mean, pair_interval
from polymorph.analysis.plots import plt, save
from polymorph.analysis.readings import fmt, fmt_ci

ROTATIONS_FILE = "rotations.safetensors"
# the full-matrix diagnostics of a row: meaningful only where R is determined (span = d)
FULL_KEYS = ("frob_dist", "frob_ratio", "trace", "trace_z", "trace_p", "det", "ks_stat",
             "ks_p", "fixed_threshold", "fixed_count", "fixed_forced", "fixed_expected",
             "fixed_dim_estimate", "trace_exact_mean", "trace_exact_var", "trace_mc_mean",
             "trace_mc_std")


def rotation_key(a: int, b: int, site: str) -> str:
    return f"seed={a}/seed={b}/{site}"


def off_shared_diagnostics(r: torch.Tensor, span: torch.Tensor, shared: torch.Tensor,
                           group: str, n_null: int) -> dict:
    """The trace of R on the part of the span orthogonal to the shared directions.

    ``span`` [d, r] and ``shared`` [d, k] orthonormal. The subspace is span ∩ shared^⊥ (all of
    shared^⊥ where r = d), r' dimensional; the null: R invariant on the shared directions and
    Haar on the other d - k, under which tr(C^T R C) has the exact moments of the compression of
    a Haar draw in d - k dimensions to r' of them (mean 0, variance r' / (d - k)). Where r = d
    this is :func:`~polymorph.align.span.complement_diagnostics`.
    """
    d = r.shape[0]
    k = d - int(complement_basis(shared).shape[1])  # the rank of the shared directions
    basis = complement_basis(torch.cat([shared, complement_basis(span)], dim=1))
    rank = int(basis.shape[1])
    out = {"rank": rank, "excluded": k}
    if rank == 0:
        return {**out, "trace": None, "trace_z": None, "trace_p": None, "retained": None}
    comp = basis.T @ r.double() @ basis
    trace = float(torch.trace(comp))
    mean_, var = compressed_trace_moments(d - k, rank, group)
    null = haar_null(d - k, group, n_null)
    return {**out, "trace": trace, "trace_exact_mean": mean_, "trace_exact_var": var,
            "trace_z": (trace - mean_) / math.sqrt(var) if var > 0 else None,
            "trace_p": mc_two_sided_p(trace, null.compressed_traces(rank), mean_),
            "retained": float(comp.pow(2).sum() / rank)}


def pooled(zs: list[float]) -> tuple[float | None, float | None]:
    """Stouffer's pooled z of independent standard-normal z's, and its two-sided p-value."""
    vals = [z for z in zs if z is not None and math.isfinite(z)]
    if not vals:
        return None, None
    z = sum(vals) / math.sqrt(len(vals))
    return z, float(2 * stats.norm.sf(abs(z)))


def _verdict(departs: bool, z: float) -> str:
    if not departs:
        return "consistent with a Haar draw"
    return ("R preserves more than a Haar draw does" if z > 0 else
            "R moves these directions further than a Haar draw does")


class HaarDiagnosticsCallback(AnalysisCallback):
    """Args:
        null_samples: Monte-Carlo Haar draws per (d, group) for p-values, bands and angles.
        n_boot, level, boot_seed: the interval over pairs of the mean trace z (n_boot >= 100);
            a pooled p-value below 1 - level reads as a departure from Haar.
    """

    name = "haar"

    def __init__(self, null_samples: int = 1000, n_boot: int = 1000, level: float = 0.95,
                 boot_seed: int = 0) -> None:
        if int(null_samples) < 2:
            raise ValueError(f"null_samples must be >= 2, got {null_samples}")
        self.null_samples = int(null_samples)
        self.n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
        self.level = float(level)
        self.boot_seed = int(boot_seed)

    def run(self, ctx) -> dict:
        n_null = self.null_samples
        rows, per_site = [], {}
        self._angles: dict[str, np.ndarray] = {}
        self._null = {}
        for site in ctx.progress(ctx.sites, desc="haar (site)"):
            site_rows = []
            d = ctx.rotation(*ctx.pairs[0], site).d
            null = haar_null(d, ctx.group, n_null)
            shared = ctx.family.shared_directions(d)
            angles = []
            for a, b in ctx.pairs:
                rot = ctx.rotation(a, b, site)
                diag = diagnose(rot.matrix, null)
                span = span_of_fit(rot, ctx.acts["fit"][b][site])  # R reads b's frame
                rank = int(span.shape[1])
                row = {"pair": [a, b], "site": site, "span_rank": rank, "determined": rank == d}
                full = diag.to_dict(include_angles=False)
                row.update({k: (full[k] if rank == d else None) for k in FULL_KEYS})
                row["on_span"] = span_diagnostics(rot.matrix, span, null).to_dict()
                row["off_shared"] = None if shared is None else off_shared_diagnostics(
                    rot.matrix, span, shared, ctx.group, n_null)
                if rank == d:
                    angles.append(np.asarray(diag.eigen_angles))
                site_rows.append(row)
            rows += site_rows
            self._null[site] = null
            per_site[site] = self._site_summary(site_rows, null, angles, d)
            if angles:
                self._angles[site] = np.concatenate(angles)
        self._save_rotations(ctx)
        return {
            "definitions": self._definitions(ctx),
            "rows": rows,
            "per_site": per_site,
            "rotations_file": ROTATIONS_FILE,
            "shared_directions": self._shared(ctx),
        }

    @staticmethod
    def _shared(ctx) -> dict | None:
        d = ctx.rotation(*ctx.pairs[0], ctx.sites[0]).d
        shared = ctx.family.shared_directions(d)
        if shared is None:
            return None
        return {"n_directions": int(shared.shape[1]),
                "source": "family.shared_directions(d): residual directions every seed shares "
                "by construction"}

    def _site_summary(self, rows: list[dict], null, angles: list, d: int) -> dict:
        out: dict = {"n_pairs": len(rows), "d": d,
                     "span_rank": min(r["span_rank"] for r in rows),
                     "determined": all(r["determined"] for r in rows)}
        alpha = 1 - self.level
        for key in ("on_span", "off_shared"):
            zs = [r[key]["trace_z"] for r in rows if r.get(key)]
            if not zs or any(z is None for z in zs):
                out[f"trace_z_{key}"] = None
                continue
            out[f"trace_z_{key}"] = mean(zs)
            out[f"trace_z_{key}_ci"] = pair_interval(zs, self.n_boot, self.level, self.boot_seed)
            z, p = pooled(zs)
            out[f"pooled_trace_z_{key}"], out[f"pooled_trace_p_{key}"] = z, p
            out[f"departs_from_haar_{key}"] = bool(p < alpha)
            if key == "off_shared":
                out["off_shared_rank"] = rows[0]["off_shared"]["rank"]
        if out["determined"]:
            ks = stats.ks_2samp(np.concatenate(angles), null.pooled_angles)
            out["pooled_ks_stat"], out["pooled_ks_p"] = float(ks.statistic), float(ks.pvalue)
            out["pooled_trace_z"], out["pooled_trace_p"] = pooled([r["trace_z"] for r in rows])
            out["frob_dist"] = mean(r["frob_dist"] for r in rows)
            out["frob_dist_ci"] = pair_interval([r["frob_dist"] for r in rows], self.n_boot,
                                                self.level, self.boot_seed)
            out["fixed_dim_estimate"] = mean(r["fixed_dim_estimate"] for r in rows)
        out["null"] = self._null_band(null)
        return out

    def _definitions(self, ctx) -> dict:
        n_null = self.null_samples
        return {
            "span_rank": "r = rank of the fit's cross-covariance (Rotation.effective_rank): the "
            "directions of seed b's fit activations on which R is determined",
            "determined": "r = d: R is determined everywhere, so the full-matrix diagnostics "
            "apply; otherwise they are null (they would judge the fit's arbitrary completion)",
            "frob_dist": "||R - I||_F; for Haar R about sqrt(2d)",
            "frob_ratio": "||R - I||_F / sqrt(2d)",
            "trace_z": "(tr R - E[tr]) / sqrt(Var[tr]) with the exact Haar moments of the same "
            "d and group (Diaconis & Shahshahani: mean 0, variance 1 for d >= 3)",
            "trace_p": "two-sided Monte-Carlo p-value of the trace under the Haar null",
            "ks_p": "two-sample KS p-value of R's eigen-angles |arg(lambda)| against pooled Haar "
            "angles (the published test; insensitive to a few preserved dimensions)",
            "fixed_dim_estimate": "number of near-fixed directions (eigen-angles below the "
            "noiseless null's threshold) in excess of what a Haar draw gives",
            "null": f"{n_null} Haar draws per (d, group={ctx.group}): p-values, the ||R - I||_F "
            "band (central 95%) and the angle distribution only",
            "trace": "the trace of R (or of its compression to the subspace)",
            "det": "det R (+1 or -1)", "ks_stat": "the KS statistic of that test",
            "fixed_threshold": "the eigen-angle (radians) below which a direction counts as "
            "near-fixed", "fixed_count": "eigen-angles of R below fixed_threshold",
            "fixed_forced": "angles at 0 forced by det R and the parity of d (0 or 1)",
            "fixed_expected": "mean count of free Haar angles below fixed_threshold",
            "trace_exact_mean / trace_exact_var": "the exact null moments of the trace "
            "statistic", "trace_mc_mean / trace_mc_std": "the Monte-Carlo null's moments (a "
            "check on the simulation, not used by any z)",
            "frob_mean / frob_q025 / frob_q975": "mean and 2.5% / 97.5% quantiles of ||R - I||_F "
            "over the null's draws",
            "trace_mean / trace_std": "mean and standard deviation of tr R over the null's draws",
            "on_span": "the trace of R compressed to the span of seed b's fit activations, "
            "tr(B^T R B), against its exact Haar moments (mean 0, variance r/d; "
            "align.span.span_diagnostics); equal to the full trace test where r = d",
            "rank": "dimension of the subspace a restricted statistic uses",
            "frob_dist_on_span": "||B^T (R - I)||_F = sqrt(2r - 2 trace)",
            "frob_ratio_on_span": "frob_dist_on_span / sqrt(2r)",
            "retained": "||C^T R C||_F^2 / r': the fraction of the subspace R maps back into "
            "itself (r' / d on average for a Haar R)",
            "off_shared": "the trace of R on the span's part orthogonal to the family's shared "
            "directions (excluded = their number), against the null 'R leaves them invariant, "
            "Haar on the other d - excluded': exact mean 0, variance rank / (d - excluded); "
            "null where the family shares no directions by construction",
            "excluded": "number of shared directions removed",
            "trace_z_on_span / trace_z_off_shared": "per site: mean over pairs of that z "
            "(interval over pairs)",
            "pooled_trace_z_on_span / pooled_trace_z_off_shared / pooled_trace_z": "per site: "
            "sum of the pairs' z / sqrt(pairs) (treats pairs as independent)",
            "pooled_trace_p_on_span / pooled_trace_p_off_shared / pooled_trace_p": "its "
            "two-sided normal p-value",
            "departs_from_haar_on_span / departs_from_haar_off_shared": f"pooled p < "
            f"{1 - self.level:.2g}",
            "pooled_ks_p / pooled_ks_stat": "KS of all pairs' eigen-angles pooled against the "
            "null's (where determined)",
            "off_shared_rank": "rank of the off_shared subspace",
            "shared_directions": "the directions the family shares by construction "
            "(n_directions of them), null for a family without any",
            **INTERVAL_DEFINITION,
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
            "convention": "key seed=a/seed=b/site: x_b -> (x_b - source_mean) @ matrix + "
            "target_mean maps seed b's activations into seed a's frame",
            "group": ctx.group,
        }
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(ctx.out_dir / ROTATIONS_FILE), metadata=meta)

    # -- outputs -------------------------------------------------------------------------

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        paths = []
        sites = list(self._angles)
        if sites:
            fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3),
                                     squeeze=False)
            for ax, site in zip(axes[0], sites):
                ax.hist(self._null[site].pooled_angles, bins=40, range=(0, np.pi), density=True,
                        histtype="step", color="black", label="Haar null")
                ax.hist(self._angles[site], bins=40, range=(0, np.pi), density=True, alpha=0.6,
                        color="#1c7ed6", label="fitted R")
                ax.set_title(site.replace("blocks.", "").replace("hook_resid_", ""), fontsize=9)
                ax.set_xlabel("eigen-angle |arg λ|")
            axes[0][0].legend(fontsize=7)
            fig.suptitle("eigen-angles (sites where R is determined)", fontsize=9)
            paths.append(save(fig, fig_dir / "haar_eigen_angles.png"))

        all_sites = list(result["per_site"])
        fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(all_sites)), 3.5))
        for j, site in enumerate(all_sites):
            rows = [r for r in result["rows"] if r["site"] == site]
            z_span = [r["on_span"]["trace_z"] for r in rows]
            ax.scatter([j - 0.12] * len(rows), z_span, color="#1c7ed6", zorder=3,
                       label="trace z on the span" if j == 0 else None)
            z_off = [r["off_shared"]["trace_z"] for r in rows if r.get("off_shared")
                     and r["off_shared"]["trace_z"] is not None]
            if z_off:
                ax.scatter([j + 0.12] * len(z_off), z_off, color="#f08c00", zorder=3,
                           marker="s", label="without shared directions" if j == 0 else None)
        ax.axhspan(-1.96, 1.96, color="#ced4da", label="Haar 95% (exact moments)")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(all_sites)))
        ax.set_xticklabels([s.replace("blocks.", "").replace("hook_resid_", "")
                            for s in all_sites])
        ax.set_ylabel("trace z (one dot per pair)")
        ax.legend(fontsize=7)
        paths.append(save(fig, fig_dir / "haar_trace_z.png"))
        return paths

    def histograms(self, result: dict) -> dict[str, list[float]]:
        return {f"{site}/eigen_angles": a.tolist()
                for site, a in getattr(self, "_angles", {}).items()}

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for site, s in result["per_site"].items():
            for key in ("pooled_trace_z", "pooled_ks_p", "pooled_trace_z_on_span",
                        "pooled_trace_z_off_shared", "trace_z_on_span", "trace_z_off_shared"):
                if s.get(key) is not None:
                    out[f"{site}/{key}"] = s[key]
        return out

    def reading(self, site: str, s: dict) -> str:
        """One sentence per site, generated from the tests."""
        where = (f"span {s['span_rank']} of {s['d']}" if not s["determined"]
                 else f"d = {s['d']}")
        z = s.get("trace_z_on_span")
        if z is None:
            return f"`{site}` ({where}): no trace statistic."
        text = (f"`{site}` ({where}): trace z on the span "
                f"{fmt_ci(z, s.get('trace_z_on_span_ci'), '+.2f')} (pooled "
                f"{fmt(s['pooled_trace_z_on_span'], '+.2f')}, p = "
                f"{s['pooled_trace_p_on_span']:.2g}): "
                + _verdict(s["departs_from_haar_on_span"], s["pooled_trace_z_on_span"]))
        off = s.get("trace_z_off_shared")
        if off is not None:
            text += (f"; on the {s['off_shared_rank']} directions orthogonal to the shared ones "
                     f"z {fmt_ci(off, s.get('trace_z_off_shared_ci'), '+.2f')} (pooled p = "
                     f"{s['pooled_trace_p_off_shared']:.2g}): "
                     + _verdict(s["departs_from_haar_off_shared"],
                                s["pooled_trace_z_off_shared"]))
            if s["departs_from_haar_on_span"]:
                text += (", so the departure survives removing what the seeds share by "
                         "construction" if s["departs_from_haar_off_shared"] else
                         ", so the departure comes from the shared directions alone")
        if not s["determined"]:
            text += (f". R is not determined on {s['d'] - s['span_rank']} directions: the "
                     "full-matrix tests are not reported here")
        return text + "."

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Are the rotations Haar-random? (`haar`)",
            "",
            "Trace z-scores against the exact Haar moments (Monte-Carlo draws only for p-values, "
            "the ||R - I||_F band and angle distributions): on the span of the activations (the "
            "full trace where the span is all of d), and "
            + ("on the directions orthogonal to the "
               f"{result['shared_directions']['n_directions']} every seed of the "
               f"{ctx.family.name} family shares by construction (family.shared_directions)"
               if result.get("shared_directions") else
               f"no second statistic: the {ctx.family.name} family shares no residual "
               "directions by construction")
            + ". Means over pairs with intervals over the pairs, pooled z over pairs (Stouffer; "
            "pairs sharing the anchor are not independent). ||R - I||_F, the published KS test "
            "(p near 1 is what any Haar draw gives) and the near-fixed dimension only where R "
            "is determined.",
            "",
            "| site | span r | trace z on span | pooled | z without shared dirs | pooled | "
            "‖R−I‖_F | Haar band | pooled KS p | near-fixed dims |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for site, s in result["per_site"].items():
            band = s["null"]
            full = s["determined"]
            frob = fmt_ci(s.get("frob_dist"), s.get("frob_dist_ci"), ".2f") if full else \
                "undetermined"
            lines.append(
                f"| `{site}` | {s['span_rank']} / {s['d']} "
                f"| {fmt_ci(s.get('trace_z_on_span'), s.get('trace_z_on_span_ci'), '+.2f')} "
                f"| {fmt(s.get('pooled_trace_z_on_span'), '+.2f')} "
                f"| {fmt_ci(s.get('trace_z_off_shared'), s.get('trace_z_off_shared_ci'), '+.2f')} "
                f"| {fmt(s.get('pooled_trace_z_off_shared'), '+.2f')} "
                f"| {frob} "
                f"| {band['frob_q025']:.2f}–{band['frob_q975']:.2f} "
                f"| {fmt(s.get('pooled_ks_p'), '.3f') if full else '-'} "
                f"| {fmt(s.get('fixed_dim_estimate'), '.1f') if full else '-'} |")
        lines += ["", "Reading: " + " ".join(self.reading(site, s)
                                               for site, s in result["per_site"].items())]
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
