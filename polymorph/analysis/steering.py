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
import warnings
from pathlib import Path

import torch
from scipy import stats

from polymorph.align.fixed import DEFAULT_FACTOR, DEFAULT_QUANTILE, near_fixed_subspace
from polymorph.align.haar import haar_null
from polymorph.align.outputs import per_sequence
from polymorph.align.transfer import transfer_vector
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.intervals import (
    INTERVAL_DEFINITION,
    SequenceBootstrap,
    check_margin,
    check_n_boot,
    error_bars,
)
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.analysis.readings import fmt
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
        fixed_subspace: measure each vector's overlap with the near-fixed subspace of the
            rotation between the anchor and every other seed
            (:func:`~polymorph.align.fixed.near_fixed_subspace`, thresholded at the fit's own
            bootstrap noise over the fit batch's sequences).
        fixed_n_boot: refits of that bootstrap (>= 2); fixed_quantile, fixed_factor: its rule.
        null_samples: Haar draws for the expected count of free angles below the threshold.
    """

    name = "steering"

    def __init__(self, vectors, effect, site: str | None = None,
                 alphas=(0.5, 1.0, 2.0, 4.0), random_seed: int = 0,
                 reference_alpha: float | None = None, n_sequences: int | None = None,
                 margin: float = 0.01, clean_range=(0.67, 1.5), n_boot: int = 1000,
                 level: float = 0.95, boot_seed: int = 0, fixed_subspace: bool = True,
                 fixed_n_boot: int = 32, fixed_quantile: float = DEFAULT_QUANTILE,
                 fixed_factor: float = DEFAULT_FACTOR, null_samples: int = 1000) -> None:
        alphas = [float(a) for a in alphas]
        if not alphas or not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of finite doses, got {alphas}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas has duplicates: {alphas}")
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        margin = check_margin(margin)
        lo, hi = (float(x) for x in clean_range)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"clean_range={clean_range} must be (low <= 1 <= high), low > 0")
        n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1)")
        if int(fixed_n_boot) < 2:
            raise ValueError(f"fixed_n_boot={fixed_n_boot} must be >= 2 (refits of the rotation "
                             "that calibrate the near-fixed threshold; 32 by default)")
        if not 0.0 < float(fixed_quantile) < 1.0 or float(fixed_factor) <= 0:
            raise ValueError(f"fixed_quantile={fixed_quantile} must be in (0, 1) and "
                             f"fixed_factor={fixed_factor} > 0")
        if int(null_samples) < 2:
            raise ValueError(f"null_samples={null_samples} must be >= 2")
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
        self.fixed_subspace = bool(fixed_subspace)
        self.fixed_n_boot = int(fixed_n_boot)
        self.fixed_quantile, self.fixed_factor = float(fixed_quantile), float(fixed_factor)
        self.null_samples = int(null_samples)

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

    def _fixed_subspaces(self, ctx, site: str, others: list[int]) -> dict[int, dict]:
        """Per other seed, the near-fixed subspace of the rotation between it and the anchor
        (the same subspace in both frames: R fixes it), thresholded at the fit's own noise from
        a bootstrap over the fit batch's sequences."""
        groups = ctx.batches["fit"].row_sequences()
        out = {}
        for seed in others:
            key = (ctx.anchor, seed, site)
            source, target = (seed, ctx.anchor) if key in ctx.rotations else (ctx.anchor, seed)
            rot = ctx.rotations[(target, source, site)]
            if rot.effective_rank() < rot.d:
                out[seed] = {"skipped": f"the activations span {rot.effective_rank()} of "
                             f"{rot.d} directions: R is not determined on the rest, so its "
                             "near-fixed subspace would include the fit's arbitrary completion"}
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                nfs = near_fixed_subspace(
                    ctx.acts["fit"][source][site], ctx.acts["fit"][target][site], rot,
                    haar_null(rot.d, rot.group, self.null_samples), n_boot=self.fixed_n_boot,
                    seed=self.boot_seed, groups=groups, quantile=self.fixed_quantile,
                    factor=self.fixed_factor)
            out[seed] = {"count": nfs.count, "dim_estimate": nfs.dim_estimate,
                         "threshold": nfs.threshold, "noise_level": nfs.step_thresholds[0][1], "expected_free": nfs.expected_free,
                         "forced": nfs.forced, "noiseless_threshold": nfs.noiseless_threshold,
                         "noiseless_estimate": nfs.noiseless_estimate, "d": nfs.d,
                         "fixed_n_boot": self.fixed_n_boot, "basis": nfs.basis}
        return out

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
        boot = SequenceBootstrap(batch.n_sequences, self.n_boot, self.level, self.boot_seed)
        fixed = self._fixed_subspaces(ctx, site, others) if self.fixed_subspace else {}
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
                           "effect_ci": [boot.ratio_ci(*x) for x in within],
                           "random_effect_ci": [boot.ratio_ci(*x) for x in within_random]},
                "cross": [],
            }
            for seed in others:
                row = {"seed": seed}
                eff = {}
                for kind in CROSS_KINDS:
                    s = series(seed, kind)
                    eff[kind] = [_point(x) for x in s]
                    row[f"{kind}_effect"] = eff[kind]
                    row[f"{kind}_effect_ci"] = [boot.ratio_ci(*x) for x in s]
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
                            None if r is None else
                            boot.ci(boot.ratio(*series(seed, kind)[i]) / boot.ratio(*within[i]),
                                    r) for i, r in enumerate(row[f"{kind}_ratio"])]
                row["cos_raw_rotated"] = cosine(vec.direction,
                                                transfer_vector(vec.direction,
                                                                ctx.to_frame_of(seed, anchor, site)))
                if seed in fixed and fixed[seed].get("basis") is not None:
                    row.update(fixed_overlap(vec.direction, fixed[seed]["basis"], self.level))
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
            "fixed_subspaces": {str(k): {x: y for x, y in v.items() if x != "basis"}
                                for k, v in fixed.items()},
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
        """Means over the other seeds at the reference alpha; intervals resample the seeds and,
        shared by all of them, the steered sequences."""
        cross = entry["cross"]
        out = {
            "within_effect": entry["within"]["effect"][i],
            "within_effect_ci": entry["within"]["effect_ci"][i],
            "random_within_effect": entry["within"]["random_effect"][i],
            "random_within_effect_ci": entry["within"]["random_effect_ci"][i],
            "mean_cos_raw_rotated": _mean(r["cos_raw_rotated"] for r in cross),
        }
        for kind in CROSS_KINDS:
            out[f"mean_{kind}_effect"] = _mean(r[f"{kind}_effect"][i] for r in cross)
            out[f"mean_{kind}_effect_ci"] = boot.over_pairs(
                [boot.ratio(*cross_sums[r["seed"]][kind]) for r in cross],
                [r[f"{kind}_effect"][i] for r in cross]) if cross else None
        w_reps = boot.ratio(*within_sums)
        for kind in ("raw", "rotated"):
            labels = [r[f"regime_{kind}"] for r in cross]
            out[f"regime_{kind}_counts"] = {g: labels.count(g) for g in REGIMES if g in labels}
            usable = [r for r in cross if r[f"regime_{kind}"] != "none"
                      and r[f"{kind}_ratio"][i] is not None]
            out[f"mean_{kind}_ratio"] = _mean(r[f"{kind}_ratio"][i] for r in usable)
            out[f"mean_{kind}_ratio_ci"] = boot.over_pairs(
                [boot.ratio(*cross_sums[r["seed"]][kind]) / w_reps for r in usable],
                [r[f"{kind}_ratio"][i] for r in usable]) if usable else None
        with_fixed = [r for r in cross if r.get("fixed_overlap") is not None]
        if with_fixed:
            out["mean_fixed_overlap"] = _mean(r["fixed_overlap"] for r in with_fixed)
            out["mean_fixed_overlap_random"] = _mean(r["fixed_overlap_random"]
                                                     for r in with_fixed)
            out["fixed_overlap_above_random"] = sum(
                r["fixed_overlap"] > r["fixed_overlap_random_q"] for r in with_fixed)
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
            "*_ci": f"{self.level:.0%} percentile bootstrap interval over the steered sequences "
            f"({self.n_boot} resamples, one shared by every condition, "
            "polymorph.align.statistics); summary means over seeds also resample the seeds",
            "cos_raw_rotated": "cos(v, v @ R^T): how much the raw vector already points the way "
            "the rotated one does in the other seed's frame",
            "summary": "per vector at the reference alpha: means over the other seeds (ratios "
            "over the seeds whose regime is not none) and counts of regimes",
            "clean, partial, inverted, no_transfer, none": "in regime_*_counts: how many of the "
            "other seeds are in that regime",
            "norm": "||v||, in the anchor's activation units",
            "fixed_subspaces": "per other seed: the near-fixed subspace of the rotation between "
            "it and the anchor (align.fixed.near_fixed_subspace on the fit batch): the "
            "directions R leaves in place, with the angle threshold set at the fit's own noise "
            f"from {self.fixed_n_boot} refits on resampled fit-batch sequences",
            "count": "eigen-angles of R below the threshold (the subspace's dimension)",
            "dim_estimate": "count minus the angle forced by det and parity and minus a Haar "
            "draw's expected free angles below the threshold (the excess over Haar)",
            "threshold": "the angle (radians) below which a direction counts as fixed (1e-6 "
            "when only exact zeros qualify)",
            "noise_level": "the rule's first threshold (factor x the bootstrap quantile of the "
            "largest noise angle of the whole rotation): the noise of its least determined "
            "direction, an upper bound of the final threshold",
            "expected_free": "a Haar draw's mean number of free angles below the threshold",
            "forced": "the angle forced to 0 by det R and the parity of d (0 or 1)",
            "noiseless_threshold / noiseless_estimate": "the noiseless rule's threshold and "
            "estimate on the same R (calibrated on exact Haar draws, blind to fit noise)",
            "fixed_n_boot": "refits behind the threshold",
            "fixed_overlap": "||P v||^2 / ||v||^2, P the projector onto that seed's near-fixed "
            "subspace: how much of the vector lies in directions both frames share",
            "fixed_overlap_random": "its mean for a random direction, count / d",
            "fixed_overlap_random_q": f"its {self.level:.0%} quantile for a random direction "
            "(||P v||^2 ~ Beta(count/2, (d - count)/2))",
            "mean_fixed_overlap / mean_fixed_overlap_random": "means over the other seeds",
            "fixed_overlap_above_random": "other seeds where the overlap exceeds that quantile",
            **INTERVAL_DEFINITION,
        }

    # -- outputs -----------------------------------------------------------------------

    @staticmethod
    def _fixed_report(result: dict) -> list[str]:
        """The vectors' overlap with the rotations' near-fixed subspaces, read against a random
        direction's overlap with a subspace of the same dimension."""
        fixed = result.get("fixed_subspaces") or {}
        if not fixed:
            return []
        found = {k: v for k, v in fixed.items() if "count" in v}
        lines = ["", "Near-fixed subspace of the rotation between the anchor and each seed "
                 "(threshold at the fit's own bootstrap noise): "
                 + ("; ".join(f"seed {k}: {v['count']} direction(s) held in place "
                              f"({v['forced']} forced by det and parity; angle threshold "
                              f"{v['threshold']:.2g} rad; excess over Haar {v['dim_estimate']}, "
                              f"noiseless rule {v['noiseless_estimate']})"
                              for k, v in found.items()) or "none")
                 + "".join(f"; seed {k}: {v['skipped']}" for k, v in fixed.items()
                           if "skipped" in v) + "."]
        for name, entry in result["vectors"].items():
            s = entry["summary"]
            if s.get("mean_fixed_overlap") is None:
                continue
            n = sum(r.get("fixed_overlap") is not None for r in entry["cross"])
            above = s["fixed_overlap_above_random"]
            lines.append(
                f"- {name}: {fmt(s['mean_fixed_overlap'])} of ||v||^2 lies in the near-fixed "
                f"subspace (mean over {n} seed(s)); a random direction gives "
                f"{fmt(s['mean_fixed_overlap_random'])} on average: "
                + (f"above the random {result['level']:.0%} quantile on {above} of {n} seed(s), "
                   "so the vector leans on directions both frames share" if above else
                   "no more than a random direction on any seed"))
        return lines

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
                                *_lohi(w["effect_ci"][i]), None])
                effects.append([name, result["anchor"], "within_random", a,
                                w["random_effect"][i], *_lohi(w["random_effect_ci"][i]), None])
            for row in entry["cross"]:
                for kind in CROSS_KINDS:
                    for i, a in enumerate(alphas):
                        ratio = row.get(f"{kind}_ratio", [None] * len(alphas))[i]
                        effects.append([name, row["seed"], f"cross_{kind}", a,
                                        row[f"{kind}_effect"][i],
                                        *_lohi(row[f"{kind}_effect_ci"][i]), ratio])
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
                lo = [min(_lohi(r[f"{kind}_effect_ci"][i], r[f"{kind}_effect"][i])[0]
                          for r in rows) for i in range(len(alphas))]
                hi = [max(_lohi(r[f"{kind}_effect_ci"][i], r[f"{kind}_effect"][i])[1]
                          for r in rows) for i in range(len(alphas))]
                ls = ":" if kind == "random" else "-"
                ax.plot(alphas, mean, color=colour, lw=2, marker="o", ms=3, ls=ls,
                        label=f"cross {kind}" + (" control" if kind == "random" else ""))
                ax.fill_between(alphas, lo, hi, color=colour, alpha=0.15, lw=0)
            ax.errorbar(alphas, w["effect"], yerr=error_bars(w["effect"], w["effect_ci"]),
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
                f"{_ci(s['random_within_effect'], s.get('random_within_effect_ci'))} | "
                f"{_ci(s['mean_raw_effect'], s['mean_raw_effect_ci'])} "
                f"({_ci(s['mean_raw_ratio'], s['mean_raw_ratio_ci'], '{:.2f}')}) | "
                f"{_ci(s['mean_rotated_effect'], s['mean_rotated_effect_ci'])} "
                f"({_ci(s['mean_rotated_ratio'], s['mean_rotated_ratio_ci'], '{:.2f}')}) | "
                f"{_ci(s['mean_random_effect'], s.get('mean_random_effect_ci'))} | "
                f"{counts('raw')} | {counts('rotated')} |")
        lines += self._fixed_report(result)
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
    return f"{fmt.format(x)} [{fmt.format(ci['ci_low'])}, {fmt.format(ci['ci_high'])}]"


def _lohi(ci: dict | None, value: float | None = None) -> tuple:
    """(ci_low, ci_high) of an interval dict; (value, value) without one."""
    if not ci:
        return value, value
    return ci["ci_low"], ci["ci_high"]


def fixed_overlap(v: torch.Tensor, basis: torch.Tensor, level: float) -> dict:
    """The fraction of ||v||^2 in the span of ``basis`` [d, k] (orthonormal), and what a random
    direction gives: for v uniform on the sphere, ||P v||^2 ~ Beta(k/2, (d - k)/2), mean k/d."""
    d, k = basis.shape
    norm2 = float(v.double().pow(2).sum())
    overlap = float((basis.T @ v.double()).pow(2).sum()) / norm2 if norm2 > 0 else None
    q = float(stats.beta.ppf(level, k / 2, (d - k) / 2)) if 0 < k < d else float(k == d)
    return {"fixed_overlap": overlap, "fixed_overlap_random": k / d,
            "fixed_overlap_random_q": q}
