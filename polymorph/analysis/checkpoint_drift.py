"""checkpoint_drift: how far does one seed's residual frame move during training?

Within one seed's run, every intermediate model the family lists (the kept step checkpoints of
a trained run, or the published revisions given as ``family.revisions``) is reloaded and its
activations collected at the analysis sites on the analysis fit and scored batches (the same
inputs the final model's activations in the context were collected on, so rows align). Per
checkpoint and site:

* ``to_final``: the rotation R fitted on the fit batch from the checkpoint's activations (source)
  to the final analysed model's (target): ||R - I||_F, its ratio to sqrt(2d), the trace z-score
  against the Haar null of the same d and group, the near-fixed dimension, the same distance on
  the activations' span, and the activation-level explained variance of the final model's
  activations by the checkpoint's, raw and rotated (``score_alignment``, on the scored batch);
* ``from_previous``: the same for the rotation from the previous followed checkpoint to this one;
* ``sae``: the final model's SAE at that site applied to the checkpoint's activations, naive
  (as they are) and rotated (mapped into the final frame by R), both EV definitions.

A frame that only rotates during training shows a large ||R - I||_F with a rotated EV near 1;
a frame that settles early shows ||R - I||_F falling to 0 long before the last step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from polymorph.align.drift import rotation_summary
from polymorph.align.metrics import EV_DEFINITIONS, explained_variance
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.analysis.sae_transfer import sae_codes_and_reconstruction
from polymorph.errors import PolymorphError
from polymorph.files import read_json

FIGURE_FILE = "checkpoint_drift.png"
EV_NAMES = tuple(EV_DEFINITIONS)


def sae_evs(sae, x: torch.Tensor) -> dict[str, float]:
    """Both EV definitions of ``sae``'s reconstruction of ``x`` (scored against ``x``)."""
    _, recon = sae_codes_and_reconstruction(sae, x)
    return explained_variance(recon, x)


class CheckpointDrift(AnalysisCallback):
    """Drift of one seed's frame over its kept training checkpoints.

    Args:
        seed: the run to follow (None: the anchor); must be one of the analysed seeds.
        sites: sites to measure (None: every analysis site); each must be an analysis site,
            whose final-model activations the context already holds.
        max_checkpoints: follow at most this many kept checkpoints, evenly spaced over the
            run, always keeping the first, the last and the best (None: all of them).
        null_samples: Monte-Carlo Haar draws per (d, group) for the trace p-values and the
            near-fixed threshold.
    """

    name = "checkpoint_drift"

    def __init__(self, seed: int | None = None, sites=None,
                 max_checkpoints: int | None = None, null_samples: int = 1000) -> None:
        if max_checkpoints is not None and int(max_checkpoints) < 2:
            raise ValueError(f"max_checkpoints must be None (all) or >= 2, got {max_checkpoints}")
        if int(null_samples) < 2:
            raise ValueError(f"null_samples must be >= 2, got {null_samples}")
        self.seed = None if seed is None else int(seed)
        self.sites = None if sites is None else [str(s) for s in sites]
        self.max_checkpoints = None if max_checkpoints is None else int(max_checkpoints)
        self.null_samples = int(null_samples)

    def _resolve(self, ctx) -> tuple[int, list[str]]:
        seed = ctx.anchor if self.seed is None else self.seed
        if seed not in ctx.seeds:
            raise PolymorphError(f"checkpoint_drift.seed={seed} is not an analysed seed "
                                 f"({ctx.seeds}); choose one of them or null for the anchor")
        sites = list(ctx.sites) if self.sites is None else self.sites
        unknown = [s for s in sites if s not in ctx.sites]
        if unknown or not sites:
            raise PolymorphError(f"checkpoint_drift.sites {unknown or sites} must be analysis "
                                 f"sites: one or more of {list(ctx.sites)} (or null for all)")
        return seed, sites

    def _select(self, steps: list[int], best: int | None) -> list[int]:
        k = self.max_checkpoints
        if k is None or len(steps) <= k:
            return steps
        picks = {steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)}
        if best in steps:
            picks.add(best)
        return sorted(picks)

    @torch.no_grad()
    def run(self, ctx) -> dict:
        seed, sites = self._resolve(ctx)
        layout = ctx.runs[seed]
        kept = {c.step: c for c in ctx.family.checkpoints(layout)}
        notes: list[str] = []
        if not kept:
            notes.append(f"the {ctx.family.name} family lists no intermediate checkpoints for "
                         f"seed {seed} (family=pretrained: family.revisions=[step1000,...]): "
                         "nothing to follow")
        rank = ctx.family.rank_metric
        best_step = None
        if layout.final_metrics.is_file():
            best_step = read_json(layout.final_metrics).get("best_step")
        steps = self._select(sorted(kept), best_step)
        if len(steps) < len(kept):
            notes.append(f"followed {len(steps)} of {len(kept)} kept checkpoints "
                         f"(max_checkpoints={self.max_checkpoints})")
        n_null = self.null_samples
        score = ctx.score_batch
        final = {b: {s: ctx.acts[b][seed][s] for s in sites} for b in ("fit", score)}
        ceilings = {}
        for site in sites:
            saved = ctx.saes.get(seed, {}).get(site)
            if saved is None:
                notes.append(f"seed {seed} has no SAE at {site}: SAE columns are null")
            else:
                ceilings[site] = sae_evs(saved.sae, final[score][site])

        per_site: dict[str, list[dict]] = {s: [] for s in sites}
        rows_steps = []
        previous = None
        for step in ctx.progress(steps, desc=f"checkpoint_drift (seed {seed})"):
            checkpoint = kept[step]
            model = checkpoint.load()
            acts = {"fit": ctx.collect(model, "fit", sites)}
            acts[score] = acts["fit"] if score == "fit" else ctx.collect(model, score, sites)
            del model
            val = checkpoint.metrics.get(rank) if rank else None
            rows_steps.append({"step": step, "checkpoint": checkpoint.label, "val_min_acc": val,
                               "lr": checkpoint.metrics.get("lr"),
                               "is_best": step == best_step})
            for site in sites:
                to_final, rot = rotation_summary(acts["fit"][site], final["fit"][site],
                                                 acts[score][site], final[score][site],
                                                 ctx.group, n_null)
                from_prev = None
                if previous is not None:
                    from_prev, _ = rotation_summary(previous["fit"][site], acts["fit"][site],
                                                    previous[score][site], acts[score][site],
                                                    ctx.group, n_null)
                sae = None
                saved = ctx.saes.get(seed, {}).get(site)
                if saved is not None:
                    x = acts[score][site]
                    naive = sae_evs(saved.sae, x)
                    rotated = sae_evs(saved.sae, rot.apply(x).float())
                    sae = {**{f"naive_{k}": v for k, v in naive.items()},
                           **{f"rotated_{k}": v for k, v in rotated.items()}}
                per_site[site].append({"step": step, "val_min_acc": val,
                                       "is_best": step == best_step, "to_final": to_final,
                                       "from_previous": from_prev, "sae": sae})
            previous = acts
        return {
            "seed": seed,
            "sites": sites,
            "final": ctx.family.final_label(layout),
            "best_step": best_step,
            "steps": rows_steps,
            "per_site": per_site,
            "sae_ceiling": ceilings,
            "notes": notes,
            "definitions": self._definitions(ctx, n_null),
        }

    @staticmethod
    def _definitions(ctx, n_null: int) -> dict:
        return {
            **EV_DEFINITIONS,
            "steps": "every kept step checkpoint of the seed's run "
            "(checkpoints/step=*.safetensors), or max_checkpoints of them",
            "val_min_acc": f"{ctx.family.rank_metric} of that checkpoint (the family's rank metric; "
            "null for families without one), from checkpoints/index.json: minimum "
            "accuracy over 3 heads x {train, compositional, long} validation sets",
            "is_best": "this checkpoint is the run's best (the final analysed model)",
            "lr": "the learning rate the checkpoint's weights were taken at (null where not "
            "recorded, e.g. published revisions)",
            "to_final": "rotation R fitted (Procrustes, group "
            f"{ctx.group}) on the fit batch from the checkpoint's activations to the final "
            "model's: x_final ~ (x_ckpt - mean) R + mean",
            "from_previous": "the same from the previous followed checkpoint to this one (null "
            "for the first)",
            "frob_dist": "||R - I||_F (0: same frame; about sqrt(2d) for a Haar-random R)",
            "frob_ratio": "||R - I||_F / sqrt(2d)",
            "trace_z": "(tr R - E[tr]) / sqrt(Var[tr]) with the exact Haar moments of the same d "
            "and group (mean 0, variance 1 for d >= 3)",
            "trace_on_span / trace_z_on_span / trace_p_on_span": "tr(B^T R B) with B the "
            "activations' span (r directions), its z against the exact Haar moments (mean 0, "
            f"variance r/d) and its two-sided Monte-Carlo p-value ({n_null} draws): the trace "
            "test restricted to where R is determined",
            "fixed_dim_estimate": "near-fixed directions of R in excess of a Haar draw",
            "span_rank": "r = rank of the fit's cross-covariance (Rotation.effective_rank); below "
            "d, R is not determined outside the span of the activations and ||R - I||_F counts "
            "that arbitrary part as drift",
            "frob_dist_on_span": "||B^T (R - I)||_F with B an orthonormal basis of the top-r "
            "principal directions of the source activations (fit batch): the drift on observed "
            "directions only; equals frob_dist when r = d; about sqrt(2r) for a Haar R",
            "frob_ratio_on_span": "frob_dist_on_span / sqrt(2r)",
            "raw_ev_*, rotated_ev_*, floor_ev_*": f"explained variance of the final model's "
            f"activations on the {ctx.score_batch} batch by the checkpoint's activations as they "
            "are (raw), mapped by R (rotated), or by the final model's own mean (floor)",
            "sae.naive_ev_*": "the final model's SAE at the site reconstructing the checkpoint's "
            f"activations ({ctx.score_batch} batch) as they are; EV against those activations",
            "sae.rotated_ev_*": "the same SAE reconstructing the checkpoint's activations mapped "
            "into the final frame by R; EV against the mapped activations",
            "sae_ceiling": "the SAE on the final model's own activations (its reference EV)",
        }

    # -- outputs -----------------------------------------------------------------------

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        cols = ["site", "step", "val_min_acc", "is_best", "frob_to_final", "frob_ratio_to_final",
                "trace_z_to_final", "frob_on_span_to_final", "span_rank"]
        cols += [f"{k}_{e}" for k in ("raw", "rotated") for e in EV_NAMES]
        cols += [f"sae_{k}_{e}" for k in ("naive", "rotated") for e in EV_NAMES]
        cols += ["frob_on_span_from_previous", "trace_z_from_previous",
                 "rotated_ev_standard_from_previous"]
        rows = []
        for site, entries in result["per_site"].items():
            for r in entries:
                t, p, s = r["to_final"], r["from_previous"], r["sae"]
                row = [site, r["step"], r["val_min_acc"], r["is_best"], t["frob_dist"],
                       t["frob_ratio"], t["trace_z"], t["frob_dist_on_span"], t["span_rank"]]
                row += [t[f"{k}_{e}"] for k in ("raw", "rotated") for e in EV_NAMES]
                row += [None if s is None else s[f"{k}_{e}"]
                        for k in ("naive", "rotated") for e in EV_NAMES]
                row += [None] * 3 if p is None else [p["frob_dist_on_span"], p["trace_z"],
                                                     p["rotated_ev_standard"]]
                rows.append(row)
        return {"checkpoint_drift": (cols, rows)}

    def scalars(self, result: dict) -> dict[str, float]:
        """Per site: the earliest followed checkpoint against the final model, and the largest
        step-to-step move (the full curves are in the table)."""
        out: dict[str, float] = {"n_checkpoints": float(len(result["steps"]))}
        for site, entries in result["per_site"].items():
            if not entries:
                continue
            first = entries[0]
            out[f"{site}/first/frob_to_final"] = first["to_final"]["frob_dist"]
            out[f"{site}/first/frob_on_span_to_final"] = first["to_final"]["frob_dist_on_span"]
            out[f"{site}/first/rotated_ev_standard"] = first["to_final"]["rotated_ev_standard"]
            if first["sae"] is not None:
                for k in ("naive", "rotated"):
                    out[f"{site}/first/sae_{k}_ev_standard"] = first["sae"][f"{k}_ev_standard"]
            moves = [e["from_previous"]["frob_dist_on_span"] for e in entries
                     if e["from_previous"]]
            if moves:
                out[f"{site}/max_frob_on_span_from_previous"] = max(moves)
        return out

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        sites = [s for s, e in result["per_site"].items() if e]
        if not sites:
            return []
        fig, axes = plt.subplots(len(sites), 2, figsize=(10, 3.2 * len(sites)), squeeze=False)
        for (ax_r, ax_e), site in zip(axes, sites):
            entries = result["per_site"][site]
            steps = [e["step"] for e in entries]
            rank = max(e["to_final"]["span_rank"] for e in entries)
            ax_r.plot(steps, [e["to_final"]["frob_dist_on_span"] for e in entries], marker="o",
                      ms=3, color=COLOURS["rotated"], label="checkpoint → final")
            prev = [(e["step"], e["from_previous"]["frob_dist_on_span"]) for e in entries
                    if e["from_previous"]]
            if prev:
                ax_r.plot(*zip(*prev), marker="s", ms=3, color=COLOURS["naive"],
                          label="previous → this")
            ax_r.axhline(math.sqrt(2 * rank), color=COLOURS["floor"], ls="--", lw=1,
                         label=f"Haar: sqrt(2r), r = {rank}")
            ax_r.set_ylabel("||R - I||_F on the activations' span")
            ax_r.set_ylim(bottom=0)
            ax_r.set_title(f"{site}: rotation to the final model", fontsize=9)
            ax_r.legend(fontsize=7)
            series = {"activations rotated": ("to_final", "rotated_ev_standard", "-",
                                              COLOURS["rotated"]),
                      "activations raw": ("to_final", "raw_ev_standard", "-", COLOURS["naive"])}
            if all(e["sae"] is not None for e in entries):
                series.update({
                    "final SAE, rotated acts": ("sae", "rotated_ev_standard", "--",
                                                COLOURS["rotated"]),
                    "final SAE, naive acts": ("sae", "naive_ev_standard", "--", COLOURS["naive"]),
                })
            for label, (part, key, ls, colour) in series.items():
                ax_e.plot(steps, [e[part][key] for e in entries], ls=ls, marker="o", ms=3,
                          color=colour, label=label)
            vals = [(e["step"], e["val_min_acc"]) for e in entries if e["val_min_acc"] is not None]
            if vals:
                ax_e.plot(*zip(*vals), color="black", lw=1, ls=":", label="val/min_acc")
            lo = min(min(e[p][k] for e in entries) for p, k, _, _ in series.values())
            ax_e.set_ylim(max(-2.0, min(0.0, lo) - 0.05), 1.05)  # naive EVs can be << 0
            ax_e.set_ylabel("explained variance (ev_standard)")
            ax_e.set_title(f"{site}: EV of checkpoint activations", fontsize=9)
            ax_e.legend(fontsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("training step")
        fig.suptitle(f"checkpoint drift of seed {result['seed']}", fontsize=10)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Frame drift over training (`checkpoint_drift`)",
            "",
            (
                f"Seed {result['seed']}: each kept checkpoint's activations against the final "
                f"model's ({result['final']}). ||R - I||_F of the rotation fitted "
                "from the checkpoint to the final model, on the span of the activations (about "
                "sqrt(2r) for a Haar draw, r the span's dimension; 0 for the same frame), the EV "
                "of the final activations by the rotated checkpoint activations, and the final "
                "SAE on the checkpoint's activations, naive and rotated (ev_standard; scored on "
                f"the {ctx.score_batch} batch). Read a large ||R - I||_F with a rotated EV near 1 "
                "as a frame that moves by a rotation while the computation stays."
            ),
            "",
            (
                "| site | step | val min acc | ‖R−I‖_F to final (span r) | rotated EV | "
                "SAE naive | SAE rotated | ‖R−I‖_F from previous |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]

        def f(x, fmt="{:.3f}"):
            return "n/a" if x is None else fmt.format(x)

        for site, entries in result["per_site"].items():
            for e in self._compact(entries):
                t, s, p = e["to_final"], e["sae"], e["from_previous"]
                lines.append(
                    f"| `{site}` | {e['step']}{' (best)' if e['is_best'] else ''} | "
                    f"{f(e['val_min_acc'])} | "
                    f"{t['frob_dist_on_span']:.2f} ({t['span_rank']}) | "
                    f"{t['rotated_ev_standard']:.3f} | {f(s and s['naive_ev_standard'])} | "
                    f"{f(s and s['rotated_ev_standard'])} | "
                    f"{f(p and p['frob_dist_on_span'], '{:.2f}')} |"
                )
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        lines += [
            "",
            (
                "Caveats: the final model is the run's best checkpoint, which need not be the "
                "last one. Where a site's activations span r < d directions, R is not determined "
                "outside their span: the full ||R - I||_F (results.json `frob_dist`) then "
                "overstates the drift, which is why the table and figure restrict it to the span. "
                "The table shows at most 12 checkpoints per site; the full curves are in "
                "results.json and the W&B table."
            ),
        ]
        if result["notes"]:
            lines += ["", "Notes: " + "; ".join(result["notes"])]
        return "\n".join(lines)

    @staticmethod
    def _compact(entries: list[dict], limit: int = 12) -> list[dict]:
        if len(entries) <= limit:
            return entries
        idx = {round(i * (len(entries) - 1) / (limit - 1)) for i in range(limit)}
        idx |= {i for i, e in enumerate(entries) if e["is_best"]}
        return [entries[i] for i in sorted(idx)]
