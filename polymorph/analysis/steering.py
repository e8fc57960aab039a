"""steering: do steering vectors built on the anchor move the other seeds, raw or rotated?

Written once for every family; two strategies (``_target_`` nodes, see
:mod:`polymorph.analysis.steering_strategies`) say how vectors are built (Dyck label contrasts,
or prompt contrasts for language models) and how an effect is measured (a head's accuracy drop,
or next-token KL).

Protocol. The vectors are built on the anchor at one residual site from the **fit** batch (or
from prompts), and every effect is scored on the first ``n_sequences`` of the held-out scored
batch, so nothing is scored on the data a vector was built from. ``sign * alpha * v`` is added at
every position of that site (a TransformerLens forward hook), at each dose alpha, in five
conditions:

* ``within``: the anchor with v; ``within_random``: the anchor with a random direction of the
  same norm (one per vector, seeded);
* on every other seed: ``raw`` (v in unchanged coordinates, the published protocol), ``rotated``
  (v moved into that seed's frame by the fitted rotation) and ``random`` (the random direction,
  the cross-seed control).

Transfer ratio = cross effect / within effect. The regime of a vector on a seed, at the
reference dose, with W, Rw the within and within-random effects, C the cross effect (raw or
rotated) and Rc that seed's random effect, and a margin m:

* ``none``: W <= max(Rw, 0) + m: the vector does not beat a random push on its own model, so
  there is nothing to transfer (its ratio is null);
* ``no_transfer``: C <= max(Rc, 0) + m (the vector does no more to the other seed than a random
  push does) and no larger dose changes that;
* otherwise by C / W: ``inverted`` above the clean range (off-target damage: more effect on the
  other seed than on its own), ``clean`` inside it, ``partial`` below it when a larger dose
  reaches W, ``no_transfer`` when none does.

Every effect and ratio has a percentile-bootstrap interval over the steered sequences (one
resample shared by every condition); the means over seeds also resample the seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from polymorph.align.outputs import per_sequence
from polymorph.align.transfer import transfer_vector
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.errors import PolymorphError

REGIMES = ("clean", "partial", "inverted", "no_transfer", "none")
CROSS_KINDS = ("raw", "rotated", "random")
FIGURE_FILE = "steering_dose_response.png"


def transfer_ratio(cross: float, within: float, eps: float = 1e-12) -> float | None:
    """cross / within, or None when the within effect is (numerically) zero."""
    if within is None or cross is None or abs(within) <= eps or not (
            math.isfinite(cross) and math.isfinite(within)):
        return None
    return cross / within


def classify_regime(alphas: list[float], within: list[float], cross: list[float],
                    random_within: list[float], random_cross: list[float],
                    reference_alpha: float, clean_range: tuple[float, float],
                    margin: float) -> str:
    """The transfer regime of one vector on one seed (lists are per alpha; see the module
    docstring for the rule)."""
    i = alphas.index(reference_alpha)
    w = within[i]
    if not w > max(random_within[i], 0.0) + margin:
        return "none"

    def beats_control(j: int) -> bool:
        return cross[j] > max(random_cross[j], 0.0) + margin

    larger = [j for j, a in enumerate(alphas) if a > reference_alpha]
    if not beats_control(i):
        if any(beats_control(j) and cross[j] >= w for j in larger):
            return "partial"
        return "no_transfer"
    ratio = cross[i] / w
    low, high = clean_range
    if ratio > high:
        return "inverted"
    if ratio >= low:
        return "clean"
    if any(cross[j] >= w for j in larger):
        return "partial"
    return "no_transfer"


def pick_reference_alpha(alphas: list[float], wanted: float | None) -> float:
    """``wanted`` if given (must be one of the alphas), else the alpha closest to 1."""
    if wanted is not None:
        if float(wanted) not in alphas:
            raise ValueError(f"reference_alpha={wanted} is not one of alphas={alphas}; add it to "
                             "alphas or choose one of them")
        return float(wanted)
    return min(alphas, key=lambda a: (abs(a - 1.0), a))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double(), b.double()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


class Steering(AnalysisCallback):
    """Dose-response of steering vectors within the anchor and across seeds.

    Args:
        vectors: how vectors are built (a strategy: ``LabelContrasts``, ``PromptContrasts``).
        effect: how an effect is measured (``HeadAccuracyDrop``, ``NextTokenKL``).
        site: the residual hook to steer at; an analysis site (rotations exist only there);
            None: the middle analysis site.
        alphas: the doses; each is one steered forward pass per vector, model and condition.
        random_seed: seeds the random control directions (one per vector, in build order).
        reference_alpha: the dose regimes are judged at (None: the alpha closest to 1).
        n_sequences: steer the first n sequences of the scored batch (None: all of it).
        margin: how much (in the effect's units) an effect must beat its random control to
            count; in [0, 1].
        clean_range: transfer ratios inside this range are "clean" (symmetric in log scale).
        n_boot: bootstrap resamples for the intervals (>= 100); level: their coverage.
    """

    name = "steering"

    def __init__(self, vectors, effect, site: str | None = None,
                 alphas=(0.5, 1.0, 2.0, 4.0), random_seed: int = 0,
                 reference_alpha: float | None = None, n_sequences: int | None = None,
                 margin: float = 0.01, clean_range=(0.67, 1.5), n_boot: int = 1000,
                 level: float = 0.95, boot_seed: int = 0) -> None:
        alphas = [float(a) for a in alphas]
        if not alphas or not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of finite doses, got {alphas}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas has duplicates: {alphas}")
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        if not 0.0 <= float(margin) <= 1.0:
            raise ValueError(f"margin={margin} must be in [0, 1] (in the effect's units)")
        lo, hi = (float(x) for x in clean_range)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"clean_range={clean_range} must be (low <= 1 <= high), low > 0")
        if int(n_boot) < 100:
            raise ValueError(f"n_boot={n_boot} is too few for a 95% interval: use >= 100")
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1)")
        if getattr(vectors, "readout", None) != getattr(effect, "readout", None):
            raise ValueError(f"the vector strategy ({type(vectors).__name__}) reads "
                             f"{getattr(vectors, 'readout', None)} outputs but the effect "
                             f"({type(effect).__name__}) reads {getattr(effect, 'readout', None)}")
        self.vectors, self.effect = vectors, effect
        self.readouts = (vectors.readout,)
        self.site = None if site is None else str(site)
        self.alphas = alphas
        self.random_seed = int(random_seed)
        self.reference_alpha = pick_reference_alpha(alphas, reference_alpha)
        self.n_sequences = None if n_sequences is None else int(n_sequences)
        self.margin = float(margin)
        self.clean_range = (lo, hi)
        self.n_boot, self.level, self.boot_seed = int(n_boot), float(level), int(boot_seed)

    # -- computation ---------------------------------------------------------------------

    def _site(self, ctx) -> str:
        site = self.site or ctx.sites[len(ctx.sites) // 2]
        if site not in ctx.sites:
            raise PolymorphError(
                f"steering site {site} is not an analysis site, and rotations exist only there; "
                f"use one of {list(ctx.sites)} (analysis.callbacks.steering.site=...) or add it "
                "to sites=[...]")
        return site

    def _deltas(self, ctx, site, vectors) -> dict[int, dict[tuple[str, str, int], torch.Tensor]]:
        """The delta of every (vector, condition, alpha), grouped by the model it runs on."""
        anchor = ctx.anchor
        others = [s for s in ctx.seeds if s != anchor]
        d = next(iter(vectors.values())).direction.shape[0]
        g = torch.Generator().manual_seed(self.random_seed)
        random = torch.randn(len(vectors), d, generator=g, dtype=torch.float64)
        frames = {seed: ctx.to_frame_of(seed, anchor, site) for seed in others}
        deltas: dict[int, dict] = {s: {} for s in ctx.seeds}
        for k, (name, vec) in enumerate(vectors.items()):
            r = random[k] * (vec.norm / float(random[k].norm()))
            moved = {seed: transfer_vector(vec.direction, frames[seed]) for seed in others}
            for i, alpha in enumerate(self.alphas):
                dose = vec.sign * alpha
                deltas[anchor][(name, "within", i)] = dose * vec.direction
                deltas[anchor][(name, "within_random", i)] = dose * r
                for seed in others:
                    deltas[seed][(name, "raw", i)] = dose * vec.direction
                    deltas[seed][(name, "rotated", i)] = dose * moved[seed]
                    deltas[seed][(name, "random", i)] = dose * r
        self._moved = moved if others else {}
        return deltas

    @torch.no_grad()
    def _effect_sums(self, ctx, site, batch, deltas, vectors):
        """Per (seed, condition): float64 [S] numerators and denominators of the effect, per
        steered sequence. Chunk by chunk, the clean outputs of a chunk are computed once and
        compared with every steered run of that model on the chunk."""
        readout, n_seq = ctx.readout, batch.n_sequences
        sums = {seed: {c: [torch.zeros(n_seq, dtype=torch.float64),
                           torch.zeros(n_seq, dtype=torch.float64)] for c in conds}
                for seed, conds in deltas.items()}
        chunks = list(batch.chunks(ctx.batch_size))
        work = [(seed, chunk) for seed in ctx.seeds for chunk in chunks]
        for seed, (start, tokens, mask) in ctx.progress(work, desc="steering (seed, chunk)"):
            model = ctx.models[seed]
            labels = readout.targets(tokens, mask)
            rows_seq = mask.nonzero()[:, 0] + start
            targets = {name: self.vectors.target(name, labels) for name in vectors}
            state = self.effect.prepare(readout.logits(model, tokens, mask), labels)
            for cond, delta in deltas[seed].items():
                add = delta.to(next(model.parameters()).device, torch.float32)

                def steer(act, hook, add=add):
                    return act + add.to(act.dtype)

                steered = readout.logits(model, tokens, mask, fwd_hooks=[(site, steer)])
                head, rows = targets[cond[0]]
                num, den = self.effect.rows(state, steered, labels, head, rows)
                sums[seed][cond][0] += per_sequence(num, rows_seq, n_seq)
                sums[seed][cond][1] += per_sequence(den, rows_seq, n_seq)
                del steered
        return sums

    def run(self, ctx) -> dict:
        site, anchor = self._site(ctx), ctx.anchor
        others = [s for s in ctx.seeds if s != anchor]
        build_on = "fit"  # vectors from the fit batch; effects on the scored (held-out) batch
        vectors, skipped = self.vectors.build(ctx, site, build_on)
        batch = ctx.batches[ctx.score_batch].head(self.n_sequences)
        if not vectors:
            return self._empty(ctx, site, batch, skipped)
        deltas = self._deltas(ctx, site, vectors)
        sums = self._effect_sums(ctx, site, batch, deltas, vectors)
        boot = _Bootstrap(batch.n_sequences, self.n_boot, self.level, self.boot_seed)
        n_alpha = len(self.alphas)
        i_ref = self.alphas.index(self.reference_alpha)
        out_vectors = {}
        for name, vec in vectors.items():

            def series(seed, kind, name=name):
                return [sums[seed][(name, kind, i)] for i in range(n_alpha)]

            within = series(anchor, "within")
            within_random = series(anchor, "within_random")
            w_eff = [_point(x) for x in within]
            rw_eff = [_point(x) for x in within_random]
            entry = {
                "description": vec.description,
                "sign": vec.sign, "norm": vec.norm, "n_plus": vec.n_plus, "n_minus": vec.n_minus,
                "n_targets": int(within[0][1].sum()),
                "within": {"effect": w_eff, "random_effect": rw_eff,
                           "effect_ci": [boot.ratio(x) for x in within],
                           "random_effect_ci": [boot.ratio(x) for x in within_random]},
                "cross": [],
            }
            for seed in others:
                row = {"seed": seed}
                eff = {}
                for kind in CROSS_KINDS:
                    s = series(seed, kind)
                    eff[kind] = [_point(x) for x in s]
                    row[f"{kind}_effect"] = eff[kind]
                    row[f"{kind}_effect_ci"] = [boot.ratio(x) for x in s]
                for kind in ("raw", "rotated"):
                    regime = classify_regime(self.alphas, w_eff, eff[kind], rw_eff,
                                             eff["random"], self.reference_alpha,
                                             self.clean_range, self.margin)
                    row[f"regime_{kind}"] = regime
                    if regime == "none":
                        row[f"{kind}_ratio"] = [None] * n_alpha
                        row[f"{kind}_ratio_ci"] = [None] * n_alpha
                    else:
                        row[f"{kind}_ratio"] = [transfer_ratio(c, w)
                                                for c, w in zip(eff[kind], w_eff)]
                        row[f"{kind}_ratio_ci"] = [
                            boot.ratio_of_ratios(series(seed, kind)[i], within[i])
                            for i in range(n_alpha)]
                row["cos_raw_rotated"] = cosine(vec.direction,
                                                transfer_vector(vec.direction,
                                                                ctx.to_frame_of(seed, anchor, site)))
                entry["cross"].append(row)
            entry["summary"] = self._summary(entry, i_ref, boot,
                                             {s: {k: series(s, k)[i_ref] for k in CROSS_KINDS}
                                              for s in others}, within[i_ref])
            out_vectors[name] = entry
        return {
            "site": site,
            "anchor": anchor,
            "seeds": others,
            "alphas": list(self.alphas),
            "reference_alpha": self.reference_alpha,
            "random_seed": self.random_seed,
            "vectors_built_on": build_on,
            "scored_batch": ctx.score_batch,
            "n_sequences": batch.n_sequences,
            "effect_units": self.effect.units,
            "margin": self.margin,
            "clean_range": list(self.clean_range),
            "n_boot": self.n_boot,
            "level": self.level,
            "vectors": out_vectors,
            "skipped": [f"{k}: {v}" for k, v in skipped.items()],
            "definitions": self._definitions(ctx, site, batch),
        }

    def _empty(self, ctx, site, batch, skipped) -> dict:
        return {"site": site, "anchor": ctx.anchor, "seeds": [], "alphas": list(self.alphas),
                "reference_alpha": self.reference_alpha, "vectors": {},
                "n_sequences": batch.n_sequences, "effect_units": self.effect.units,
                "skipped": [f"{k}: {v}" for k, v in skipped.items()],
                "missing": ["no steering vector could be built: " + "; ".join(skipped.values())],
                "definitions": self._definitions(ctx, site, batch)}

    def _summary(self, entry: dict, i: int, boot, cross_sums: dict, within_sums) -> dict:
        cross = entry["cross"]
        out = {
            "within_effect": entry["within"]["effect"][i],
            "within_effect_ci": entry["within"]["effect_ci"][i],
            "random_within_effect": entry["within"]["random_effect"][i],
            "mean_cos_raw_rotated": _mean(r["cos_raw_rotated"] for r in cross),
        }
        for kind in CROSS_KINDS:
            out[f"mean_{kind}_effect"] = _mean(r[f"{kind}_effect"][i] for r in cross)
            out[f"mean_{kind}_effect_ci"] = boot.mean_over_seeds(
                [cross_sums[r["seed"]][kind] for r in cross]) if cross else None
        for kind in ("raw", "rotated"):
            labels = [r[f"regime_{kind}"] for r in cross]
            out[f"regime_{kind}_counts"] = {g: labels.count(g) for g in REGIMES if g in labels}
            usable = [r for r in cross if r[f"regime_{kind}"] != "none"]
            out[f"mean_{kind}_ratio"] = _mean(r[f"{kind}_ratio"][i] for r in usable)
            out[f"mean_{kind}_ratio_ci"] = boot.mean_ratio_over_seeds(
                [cross_sums[r["seed"]][kind] for r in usable], within_sums) if usable else None
        return out

    def _definitions(self, ctx, site: str, batch) -> dict:
        lo, hi = self.clean_range
        return {
            "vectors": "built on the anchor at the steering site from the fit batch (or from "
            "prompts): see each vector's `description`",
            "steering": f"sign * alpha * v added to the activation at {site} at every position "
            f"(TransformerLens forward hook) of {batch.description}",
            "effect": self.effect.definition + f" ({self.effect.units})",
            "within": "the anchor steered with v",
            "within.random_effect": "the anchor steered with a random Gaussian direction of norm "
            f"||v|| (one per vector, torch seed {self.random_seed})",
            "raw_effect": "another seed steered with v in unchanged coordinates (the published "
            "cross-seed protocol)",
            "rotated_effect": "another seed steered with v moved into its frame, v @ R^T with R "
            "the fitted rotation mapping that seed's activations into the anchor's frame",
            "random_effect": "another seed steered with the random direction (the cross-seed "
            "control: a random direction is random in every frame)",
            "raw_ratio / rotated_ratio": "cross effect / within effect at the same alpha; null "
            "where the regime is none or the within effect is 0",
            "regime": f"at the reference alpha {self.reference_alpha}, with W, Rw = within, "
            f"within-random effect, C = cross effect (raw or rotated), Rc = that seed's random "
            f"effect, m = {self.margin}: none if W <= max(Rw, 0) + m; no_transfer if C <= "
            f"max(Rc, 0) + m, unless a larger alpha beats the control and reaches W (partial); "
            f"else inverted if C/W > {hi}, clean if {lo} <= C/W <= {hi}, partial if C/W < {lo} "
            "but a larger alpha reaches W, no_transfer otherwise",
            "*_ci": f"{self.level:.0%} percentile bootstrap interval [low, high] over the steered "
            f"sequences ({self.n_boot} resamples, one shared by every condition); summary means "
            "over seeds also resample the seeds",
            "cos_raw_rotated": "cos(v, v @ R^T): how much the raw vector already points the way "
            "the rotated one does in the other seed's frame",
            "summary": "per vector at the reference alpha: means over the other seeds (ratios "
            "over the seeds whose regime is not none) and counts of regimes",
            "clean, partial, inverted, no_transfer, none": "in regime_*_counts: how many of the "
            "other seeds are in that regime",
            "norm": "||v||, in the anchor's activation units",
        }

    # -- outputs -----------------------------------------------------------------------

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for name, entry in result["vectors"].items():
            s = entry["summary"]
            for key in ("within_effect", "random_within_effect", "mean_raw_effect",
                        "mean_rotated_effect", "mean_random_effect", "mean_raw_ratio",
                        "mean_rotated_ratio", "mean_cos_raw_rotated"):
                if s.get(key) is not None:
                    out[f"{name}/{key}"] = float(s[key])
            n = len(entry["cross"])
            for kind in ("raw", "rotated"):
                if n:
                    out[f"{name}/fraction_clean_{kind}"] = (
                        s[f"regime_{kind}_counts"].get("clean", 0) / n)
        return out

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        effects, transfer = [], []
        alphas, ref = result["alphas"], result["reference_alpha"]
        i_ref = alphas.index(ref)
        for name, entry in result["vectors"].items():
            w = entry["within"]
            for i, a in enumerate(alphas):
                effects.append([name, result["anchor"], "within", a, w["effect"][i],
                                *(w["effect_ci"][i] or [None, None]), None])
                effects.append([name, result["anchor"], "within_random", a,
                                w["random_effect"][i], *(w["random_effect_ci"][i] or [None, None]),
                                None])
            for row in entry["cross"]:
                for kind in CROSS_KINDS:
                    for i, a in enumerate(alphas):
                        ratio = row.get(f"{kind}_ratio", [None] * len(alphas))[i]
                        effects.append([name, row["seed"], f"cross_{kind}", a,
                                        row[f"{kind}_effect"][i],
                                        *(row[f"{kind}_effect_ci"][i] or [None, None]), ratio])
                transfer.append([name, row["seed"], row["regime_raw"], row["regime_rotated"],
                                 row["raw_ratio"][i_ref], row["rotated_ratio"][i_ref],
                                 row["cos_raw_rotated"]])
        return {
            "steering_effects": (["vector", "seed", "kind", "alpha", "effect", "ci_low",
                                  "ci_high", "ratio"], effects),
            "steering_transfer": (["vector", "seed", "regime_raw", "regime_rotated",
                                   f"raw_ratio@{ref}", f"rotated_ratio@{ref}", "cos_raw_rotated"],
                                  transfer),
        }

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        names = list(result["vectors"])
        if not names:
            return []
        alphas = result["alphas"]
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
        styles = {"raw": COLOURS["naive"], "rotated": COLOURS["rotated"],
                  "random": COLOURS["floor"]}
        for ax, name in zip(axes[0], names):
            entry = result["vectors"][name]
            w = entry["within"]
            for kind, colour in styles.items():
                rows = entry["cross"]
                if not rows:
                    continue
                mean = [_mean(r[f"{kind}_effect"][i] for r in rows) for i in range(len(alphas))]
                lo = [min(r[f"{kind}_effect_ci"][i][0] for r in rows) for i in range(len(alphas))]
                hi = [max(r[f"{kind}_effect_ci"][i][1] for r in rows) for i in range(len(alphas))]
                ls = ":" if kind == "random" else "-"
                ax.plot(alphas, mean, color=colour, lw=2, marker="o", ms=3, ls=ls,
                        label=f"cross {kind}" + (" control" if kind == "random" else ""))
                ax.fill_between(alphas, lo, hi, color=colour, alpha=0.15, lw=0)
            ax.errorbar(alphas, w["effect"], yerr=_yerr(w["effect"], w["effect_ci"]),
                        color="black", lw=2, marker="o", ms=3, capsize=2, label="within")
            ax.plot(alphas, w["random_effect"], color="black", lw=1, ls="--",
                    label="within random control")
            ax.axhline(0, color="grey", lw=0.6)
            if all(a > 0 for a in alphas):
                ax.set_xscale("log", base=2)
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
            ax.set_xlabel("alpha")
            ax.set_ylabel(f"effect ({result['effect_units']})")
            ax.set_title(name, fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"steering at {result['site']} (anchor seed {result['anchor']}; lines: mean "
                     "over seeds, bands: the seeds' 95% intervals)", fontsize=9)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def report(self, ctx, result: dict, figures) -> str:
        ref = result["reference_alpha"]
        lines = [
            "## Steering transfer (`steering`)",
            "",
            (
                f"Vectors built on the anchor (seed {result['anchor']}) at `{result['site']}` "
                f"from the {result.get('vectors_built_on', 'fit')} batch, added as ±alpha·v at "
                f"every position of {result['n_sequences']} held-out sequences. Effect in "
                f"{result['effect_units']} (definition in results.json). Cross raw = the same "
                "vector on another seed (the published test); rotated = moved into that seed's "
                "frame by the fitted rotation; random = a random direction of equal norm (the "
                f"control on each seed). At alpha = {ref}, means over the other seeds with "
                f"{result.get('level', 0.95):.0%} bootstrap intervals; ratios only where the "
                "regime is not none."
            ),
            "",
            "| vector | within [CI] | random | cross raw (ratio) | cross rotated (ratio) | "
            "cross random | regimes raw | regimes rotated |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in result["vectors"].items():
            s = entry["summary"]

            def counts(kind, s=s):
                return ", ".join(f"{k} {v}" for k, v in s[f"regime_{kind}_counts"].items()) or "-"

            lines.append(
                f"| {name} | {_ci(s['within_effect'], s['within_effect_ci'])} | "
                f"{_f(s['random_within_effect'])} | "
                f"{_ci(s['mean_raw_effect'], s['mean_raw_effect_ci'])} "
                f"({_f(s['mean_raw_ratio'], '{:.2f}')}) | "
                f"{_ci(s['mean_rotated_effect'], s['mean_rotated_effect_ci'])} "
                f"({_f(s['mean_rotated_ratio'], '{:.2f}')}) | {_f(s['mean_random_effect'])} | "
                f"{counts('raw')} | {counts('rotated')} |")
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        if result["skipped"]:
            lines += ["", "Skipped: " + "; ".join(result["skipped"])]
        return "\n".join(lines)


def _point(pair) -> float:
    num, den = pair
    d = float(den.sum())
    return float(num.sum()) / d if d > 0 else float("nan")


def _f(x, fmt="{:+.3f}"):
    return "n/a" if x is None else fmt.format(x)


def _ci(x, ci, fmt="{:+.3f}"):
    if x is None:
        return "n/a"
    if not ci:
        return fmt.format(x)
    return f"{fmt.format(x)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _yerr(values, cis):
    lo = [v - c[0] if c else 0.0 for v, c in zip(values, cis)]
    hi = [c[1] - v if c else 0.0 for v, c in zip(values, cis)]
    return [lo, hi]


class _Bootstrap:
    """Percentile bootstrap of ratio-of-sums effects over sequences (one resample shared by
    every quantity), and over seeds for means across seeds."""

    def __init__(self, n_sequences: int, n_boot: int, level: float, seed: int) -> None:
        g0 = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n_sequences, (n_boot, n_sequences), generator=g0)
        self.weights = torch.zeros(n_boot, n_sequences, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(n_boot, n_sequences, dtype=torch.float64))  # [B, S] counts
        self.level = level
        g = torch.Generator().manual_seed(seed + 1)
        self._g = g

    def _interval(self, samples: torch.Tensor) -> list[float] | None:
        samples = samples[torch.isfinite(samples)]
        if samples.numel() < 2:
            return None
        a = (1 - self.level) / 2
        q = torch.quantile(samples, torch.tensor([a, 1 - a], dtype=samples.dtype))
        return [float(q[0]), float(q[1])]

    def _boot_ratio(self, pair) -> torch.Tensor:
        num, den = pair
        return (self.weights @ num) / (self.weights @ den)

    def ratio(self, pair) -> list[float] | None:
        return self._interval(self._boot_ratio(pair))

    def ratio_of_ratios(self, cross, within) -> list[float] | None:
        return self._interval(self._boot_ratio(cross) / self._boot_ratio(within))

    def _seed_resample(self, k: int) -> torch.Tensor:
        return torch.randint(0, k, (self.weights.shape[0], k), generator=self._g)

    def mean_over_seeds(self, pairs: list) -> list[float] | None:
        per = torch.stack([self._boot_ratio(p) for p in pairs], dim=1)  # [B, k]
        pick = self._seed_resample(per.shape[1])
        return self._interval(per.gather(1, pick).mean(1))

    def mean_ratio_over_seeds(self, pairs: list, within) -> list[float] | None:
        w = self._boot_ratio(within)
        per = torch.stack([self._boot_ratio(p) / w for p in pairs], dim=1)
        pick = self._seed_resample(per.shape[1])
        return self._interval(per.gather(1, pick).mean(1))
