"""convergence: does the cross-seed map become a pure rotation as the seeds converge?

For every training step at which both seeds of an analysed pair have an intermediate checkpoint
(the family's checkpoints: kept steps of a trained run, or published revisions), or
``max_steps`` of those steps evenly spaced (first and last kept): the seeds' activations at that
step on the fit and eval batches, then per (pair, site) the held-out EV of the orthogonal map
and of the affine (general linear) map, against step and against the seeds' rank metric
(``val/min_acc``) and learning rate at that step.
"""

from __future__ import annotations

from pathlib import Path

from polymorph.align.maps import fit_map, score_map
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import plt, save
from polymorph.errors import PolymorphError


def seed_checkpoints(ctx) -> dict[int, dict]:
    """Per seed, its intermediate checkpoints by step."""
    return {s: {c.step: c for c in ctx.family.checkpoints(ctx.runs[s])} for s in ctx.seeds}


def pair_steps(ctx, checkpoints: dict[int, dict] | None = None) -> dict[tuple[int, int], list[int]]:
    """For every analysed pair, the checkpoint steps both of its seeds have."""
    checkpoints = checkpoints if checkpoints is not None else seed_checkpoints(ctx)
    saved = {s: set(c) for s, c in checkpoints.items()}
    shared = {(a, b): sorted(saved[a] & saved[b]) for a, b in ctx.pairs}
    if not any(shared.values()):
        listing = "; ".join(f"seed {s}: {sorted(v) or 'none'}" for s, v in saved.items())
        raise PolymorphError(
            f"no pair of seeds shares a checkpoint step, so there is no common point of training "
            f"to compare ({listing}); train them with the same training.eval_every"
        )
    return shared


def spaced(steps: list[int], k: int | None) -> list[int]:
    if k is None or len(steps) <= k:
        return steps
    idx = {round(i * (len(steps) - 1) / (k - 1)) for i in range(k)}
    return [steps[i] for i in sorted(idx)]


class Convergence(AnalysisCallback):
    name = "convergence"

    def __init__(self, max_steps: int | None = 6, sites=None) -> None:
        if max_steps is not None and int(max_steps) < 2:
            raise ValueError(f"max_steps must be None (all) or >= 2, got {max_steps}")
        self.max_steps = None if max_steps is None else int(max_steps)
        self.sites = None if sites is None else [str(s) for s in sites]

    def run(self, ctx) -> dict:
        sites = self.sites or ctx.sites
        unknown = [s for s in sites if s not in ctx.sites]
        if unknown:
            raise PolymorphError(f"convergence.sites {unknown} are not analysis sites {ctx.sites}")
        checkpoints = seed_checkpoints(ctx)
        shared = pair_steps(ctx, checkpoints)
        steps_all = sorted(set().union(*shared.values()))
        steps = spaced(steps_all, self.max_steps)
        rank = ctx.family.rank_metric

        def metric(seed, step, key):
            return checkpoints[seed][step].metrics.get(key) if key else None
        rows = []
        for step in ctx.progress(steps, desc="convergence (step)"):
            pairs = [p for p in ctx.pairs if step in shared[p]]
            acts = {}
            for seed in sorted({s for p in pairs for s in p}):
                model = checkpoints[seed][step].load()
                acts[seed] = {
                    name: ctx.collect(model, name, sites)
                    for name in {"fit", ctx.score_batch}
                }
            for a, b in pairs:
                for site in sites:
                    src_fit, tgt_fit = acts[b]["fit"][site], acts[a]["fit"][site]
                    src, tgt = acts[b][ctx.score_batch][site], acts[a][ctx.score_batch][site]
                    row = {
                        "step": step,
                        "pair": [a, b],
                        "site": site,
                        "min_acc_a": metric(a, step, rank),
                        "min_acc_b": metric(b, step, rank),
                        "lr_a": metric(a, step, "lr"),
                        "lr_b": metric(b, step, "lr"),
                    }
                    for family in ("orthogonal", "affine"):
                        ev = score_map(fit_map(src_fit, tgt_fit, family), src, tgt)
                        row[f"{family}_ev_standard"] = ev["ev_standard"]
                        row[f"{family}_ev_published"] = ev["ev_published"]
                    rows.append(row)
        return {
            "definitions": {
                "orthogonal_ev_*": "held-out EV of seed a's activations from seed b's through the "
                "orthogonal map fitted on the fit batch, both seeds at the same training step",
                "affine_ev_*": "the same through the affine (general linear) map",
                "min_acc_a / min_acc_b": f"{rank} of each seed at that step (its index.json; "
                "null for a family without a rank metric)",
                "lr_a / lr_b": "the learning rate each seed's checkpoint was taken at (null where "
                "not recorded)",
                "common_steps": "every step saved by both seeds of at least one analysed pair",
            },
            "common_steps": steps_all,
            "pair_steps": {f"{a},{b}": v for (a, b), v in shared.items()},
            "steps": steps,
            "rows": rows,
        }

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        sites = sorted({r["site"] for r in result["rows"]}, key=ctx.sites.index)
        if not sites:
            return []
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for site in sites:
            rows = [r for r in result["rows"] if r["site"] == site]
            by_step = {}
            for r in rows:
                by_step.setdefault(r["step"], []).append(r)
            xs = sorted(by_step)
            mean = [sum(r["orthogonal_ev_standard"] for r in by_step[x]) / len(by_step[x]) for x in xs]
            label = site.replace("blocks.", "").replace("hook_resid_", "")
            axes[0].plot(xs, mean, marker="o", label=label)
            accs = [min(r["min_acc_a"] or 0, r["min_acc_b"] or 0) for r in rows]
            axes[1].scatter(accs, [r["orthogonal_ev_standard"] for r in rows], s=10, label=label)
        axes[0].set_xlabel("training step")
        axes[0].set_ylabel("rotated EV (ev_standard, mean over pairs)")
        axes[1].set_xlabel("min(val/min_acc) of the two seeds")
        axes[1].set_ylabel("rotated EV (ev_standard)")
        axes[0].legend(fontsize=7)
        return [save(fig, fig_dir / "convergence_rotated_ev.png")]

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Does the map become a rotation as the seeds converge? (`convergence`)",
            "",
            f"At checkpoint steps saved by both seeds of a pair ({len(result['steps'])} of "
            f"{len(result['common_steps'])} such steps; pairs counted per step): held-out EV through the orthogonal and the affine map, mean over pairs, "
            "and the lowest val/min_acc of the seeds at that step. A gap that closes as accuracy "
            "rises says polymorphism becomes a pure rotation with convergence.",
            "",
            "| site | step | min val/min_acc | orthogonal EV | affine EV |",
            "|---|---|---|---|---|",
        ]
        for site in ctx.sites:
            for step in result["steps"]:
                rows = [r for r in result["rows"] if r["site"] == site and r["step"] == step]
                if not rows:
                    continue
                accs = [x for r in rows for x in (r["min_acc_a"], r["min_acc_b"]) if x is not None]
                o = sum(r["orthogonal_ev_standard"] for r in rows) / len(rows)
                f = sum(r["affine_ev_standard"] for r in rows) / len(rows)
                acc_txt = f"{min(accs):.3f}" if accs else "n/a"
                lines.append(f"| `{site}` | {step} | {acc_txt} | {o:.3f} | {f:.3f} |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
