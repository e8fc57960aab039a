"""lm_steering: do text steering vectors built on the anchor move the other seeds, raw or rotated?

The PolyPythias counterpart of :mod:`polymorph.analysis.steering` (METHOD.md, "Steering"). Each
prompt set (``conf/steering_prompts/``) has positive and negative prompts; its vector is built on
the anchor at one residual site as

    v = mean_{positive prompts} m(p) - mean_{negative prompts} m(p),
    m(p) = mean of the anchor's activations over the positions of prompt p but the first.

Prompts are tokenised with the anchor's tokenizer without special tokens (``prepend_bos=False``
semantics, as the corpus windows are). Why every position and not only the final token:

* the vector is added at *every* position of the text it steers, so it should be the average
  difference the concept makes across positions, not its difference at one kind of position;
* a prompt gives ~5-15 rows instead of one, so ~200 rows per side instead of 12-20: at d=512 a
  mean of 16 rows is dominated by per-prompt noise;
* a final token is usually punctuation or the template's last word, so the template would pick
  the vector.

The first position is left out as the corpus batches leave it out (the same number of leading
positions as ``ctx.masks``): without a BOS the first token is the model's attention sink, whose
activations are tens of times larger than the others and would swamp the mean. Each prompt is
averaged first, then the prompts, so a long prompt weighs as much as a short one.

Steering adds ``alpha * v`` at every position at ``site`` (a TransformerLens forward hook) while
the model reads the first ``n_sequences`` windows of the eval batch (``ctx.score_batch``: the
fit batch only with ``analysis.score_on=fit``). Effect = mean over the kept
positions of KL(p_clean || p_steered) between the next-token distributions (nats): how far the
vector moves the model. Conditions per (set, alpha):

* within: the anchor with v;
* cross: another seed with v in unchanged coordinates (the published protocol);
* rotated: another seed with v moved into its frame by the fitted rotation,
  ``transfer_vector(v, ctx.rotation(anchor, b, site).inverse())``;
* random: a random Gaussian direction rescaled to ||v|| (one per set, seeded), on the anchor and
  on every other seed: the damage any push of that size does.

Transfer ratio = cross (or rotated) effect / within effect; regimes from
:func:`polymorph.analysis.steering.classify_regime` (clean / partial / inverted, plus
no_transfer and none). KL is a magnitude, not a direction: "inverted" (cross effect larger than
within) means the raw vector moves the other seed more than its own model, i.e. off-target damage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from polymorph.align.transfer import transfer_vector
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.lm_function_match import KLReference, kept_logits
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.analysis.steering import (
    CLEAN_RANGE,
    REGIMES,
    classify_regime,
    cosine,
    pick_reference_alpha,
    to_seed_frame,
    transfer_ratio,
)
from polymorph.errors import PolymorphError

log = logging.getLogger(__name__)

DEFAULT_SITE = "blocks.3.hook_resid_post"
SIDES = ("positive", "negative")
# A within effect must beat the random control by this much (nats of mean KL) to count as a
# real effect; below it the regime is "none" (the accuracy-based steering callback uses 0.01
# accuracy; a mean KL of 0.01 nats is a comparably small, just-measurable shift).
MIN_EFFECT = 0.01
FIGURE_FILE = "lm_steering_dose_response.png"


def validate_prompt_sets(prompt_sets) -> dict[str, dict]:
    """Plain dicts {name: {positive: [str], negative: [str], description: str}}; a clear error
    for anything missing or empty."""
    if not isinstance(prompt_sets, Mapping) and not hasattr(prompt_sets, "items"):
        raise PolymorphError("lm_steering.prompt_sets must map a name to {positive: [...], "
                             "negative: [...], description: ...}, got "
                             f"{type(prompt_sets).__name__}")
    if not prompt_sets:
        raise PolymorphError("lm_steering.prompt_sets is empty: give at least one set (see "
                             "conf/steering_prompts/english.yaml)")
    out = {}
    for name, spec in prompt_sets.items():
        if spec is None or not hasattr(spec, "get"):
            raise PolymorphError(f"prompt set {name!r} must be a mapping with positive, negative "
                                 f"and description, got {spec!r}")
        entry = {"description": str(spec.get("description") or "")}
        for side in SIDES:
            prompts = spec.get(side)
            if prompts is None or isinstance(prompts, str) or len(prompts) == 0:
                raise PolymorphError(f"prompt set {name!r} has no {side} prompts: give a "
                                     f"non-empty list under {name}.{side}")
            entry[side] = [str(p) for p in prompts]
        out[str(name)] = entry
    return out


def tokenize_prompts(tokenizer, prompts: list[str], skip: int, where: str) -> list[list[int]]:
    """Token ids of each prompt (no special tokens); each must have a position after ``skip``."""
    out = []
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if len(ids) <= skip:
            raise PolymorphError(
                f"{where}: prompt {prompt!r} tokenises to {len(ids)} token(s); the vector reads "
                f"positions after the first {skip} (the attention-sink position the corpus "
                f"batches skip too), so every prompt needs at least {skip + 1} tokens"
            )
        out.append(ids)
    return out


@torch.no_grad()
def prompt_means(model, ids: list[list[int]], site: str, skip: int, pad_id: int,
                 batch_size: int = 16) -> torch.Tensor:
    """Per prompt, the mean activation at ``site`` over its positions after ``skip``: float64
    [n_prompts, d]. Prompts are right-padded; the model is causal, so padding changes nothing."""
    device = next(model.parameters()).device
    means = []
    for start in range(0, len(ids), batch_size):
        group = ids[start : start + batch_size]
        width = max(len(x) for x in group)
        toks = torch.full((len(group), width), pad_id, dtype=torch.long)
        keep = torch.zeros((len(group), width), dtype=torch.bool)
        for i, x in enumerate(group):
            toks[i, : len(x)] = torch.tensor(x)
            keep[i, skip : len(x)] = True
        _, cache = model.run_with_cache(toks.to(device), names_filter=lambda n: n == site)
        acts = cache[site].double().cpu()
        w = keep.unsqueeze(-1).double()
        means.append((acts * w).sum(1) / w.sum(1))
    return torch.cat(means)


@dataclass(frozen=True)
class PromptVector:
    """One prompt set's direction in the anchor's frame (float64 [d])."""

    name: str
    direction: torch.Tensor
    n_positive_rows: int
    n_negative_rows: int

    @property
    def norm(self) -> float:
        return float(self.direction.norm())


def leading_skip(mask: torch.Tensor) -> int:
    """How many leading positions of a window the analysis leaves out (from ``ctx.masks``)."""
    row = mask[0]
    return int(row.long().argmax()) if bool(row.any()) else int(row.numel())


class LMSteering(AnalysisCallback):
    """Dose-response of prompt-set steering vectors, within the anchor and across seeds.

    Args:
        site: the residual hook to steer at; must be one of the analysis sites (rotations exist
            only there).
        prompt_sets: name -> {positive: [str], negative: [str], description: str}.
        alphas: the doses (multiples of v); one steered forward pass per dose, set, model and
            kind.
        random_seed: seeds the random control directions (one per set, in set order).
        n_sequences: steer the first n windows of the scored batch (None: all of it). Cost:
            one forward + one float64 KL per (set, alpha, kind, model) and window, measured at
            ~0.7 s per 256-token window for a pythia-70m-shaped model on one CPU thread; with 9
            seeds, 3 sets and 4 alphas that is 312 runs, ~30 min at n_sequences=8 and ~4 h for
            all 64 windows. Peak memory at batch_size 16: ~4 GB (the clean chunk's float64
            probabilities, 1.6 GB, plus two float32 logit chunks).
        reference_alpha: the dose at which regimes are judged (None: the alpha closest to 1).
    """

    name = "lm_steering"

    def __init__(self, site: str = DEFAULT_SITE, prompt_sets=None, alphas=(0.5, 1.0, 2.0, 4.0),
                 random_seed: int = 0, n_sequences: int | None = None,
                 reference_alpha: float | None = None) -> None:
        alphas = [float(a) for a in alphas]
        if not alphas or not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of finite doses, got {alphas}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas has duplicates: {alphas}")
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        if prompt_sets is None:
            raise PolymorphError("lm_steering needs prompt_sets (the polypythia preset takes them "
                                 "from conf/steering_prompts/english.yaml)")
        self.site = str(site)
        self.prompt_sets = validate_prompt_sets(prompt_sets)
        self.alphas = alphas
        self.random_seed = int(random_seed)
        self.n_sequences = None if n_sequences is None else int(n_sequences)
        self.reference_alpha = pick_reference_alpha(alphas, reference_alpha)

    # -- computation ---------------------------------------------------------------------

    def build_vectors(self, ctx) -> dict[str, PromptVector]:
        """Every set's diff-of-means vector on the anchor at ``self.site``."""
        model = ctx.models[ctx.anchor]
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise PolymorphError("lm_steering needs the anchor model's tokenizer (model.tokenizer)")
        skip = leading_skip(ctx.masks[ctx.score_batch])
        pad = tokenizer.pad_token_id
        pad = int((tokenizer.eos_token_id if pad is None else pad) or 0)  # never read: causal
        vectors = {}
        for name, spec in self.prompt_sets.items():
            means, rows = {}, {}
            for side in SIDES:
                ids = tokenize_prompts(tokenizer, spec[side], skip, f"prompt set {name!r} ({side})")
                means[side] = prompt_means(model, ids, self.site, skip, pad, ctx.batch_size)
                rows[side] = sum(len(x) - skip for x in ids)
            direction = means["positive"].mean(0) - means["negative"].mean(0)
            if not bool(direction.any()):
                log.warning("lm_steering: prompt set %r gives v = 0 at %s (its two sides "
                            "tokenise alike?): its effects will all be 0", name, self.site)
            vectors[name] = PromptVector(name, direction, rows["positive"], rows["negative"])
        return vectors

    def _random_directions(self, d: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.random_seed)
        return torch.randn(len(self.prompt_sets), d, generator=g, dtype=torch.float64)

    def run(self, ctx) -> dict:
        site, anchor = self.site, ctx.anchor
        if site not in ctx.sites:
            raise PolymorphError(
                f"lm_steering site {site} is not an analysis site, and rotations exist only "
                f"there; use one of {list(ctx.sites)} (analysis.callbacks.lm_steering.site=...) "
                "or add it to sites=[...]"
            )
        others = [s for s in ctx.seeds if s != anchor]
        vectors = self.build_vectors(ctx)
        d = next(iter(vectors.values())).direction.shape[0]
        random_dirs = self._random_directions(d)
        frames = {seed: to_seed_frame(ctx, anchor, seed, site) for seed in others}
        batch = ctx.score_batch
        act_norm = {seed: float(ctx.acts[batch][seed][site].double().norm(dim=1).mean())
                    for seed in ctx.seeds}

        # The delta of every (set, kind, alpha) condition, grouped by the model it runs on.
        deltas: dict[int, dict[tuple[str, str, int], torch.Tensor]] = {s: {} for s in ctx.seeds}
        for k, (name, vec) in enumerate(vectors.items()):
            r = random_dirs[k]
            rand = r * (vec.norm / float(r.norm()))
            for i, alpha in enumerate(self.alphas):
                deltas[anchor][(name, "within", i)] = alpha * vec.direction
                deltas[anchor][(name, "random_within", i)] = alpha * rand
                for seed in others:
                    moved = transfer_vector(vec.direction, frames[seed])
                    deltas[seed][(name, "cross", i)] = alpha * vec.direction
                    deltas[seed][(name, "rotated", i)] = alpha * moved
                    deltas[seed][(name, "random", i)] = alpha * rand

        tokens, mask = ctx.tokens[batch], ctx.masks[batch]
        if self.n_sequences is not None:
            tokens, mask = tokens[: self.n_sequences], mask[: self.n_sequences]
        kl = self._effects(ctx, deltas, tokens, mask)
        n_rows = int(mask.sum())

        out_sets = {}
        for name, vec in vectors.items():
            spec = self.prompt_sets[name]

            def series(seed, kind, name=name):
                return [kl[seed][(name, kind, i)] / n_rows for i in range(len(self.alphas))]

            w_eff, rw_eff = series(anchor, "within"), series(anchor, "random_within")
            entry = {
                "description": spec["description"],
                "n_positive": len(spec["positive"]), "n_negative": len(spec["negative"]),
                "n_positive_rows": vec.n_positive_rows, "n_negative_rows": vec.n_negative_rows,
                "norm": vec.norm,
                "relative_norm": vec.norm / act_norm[anchor] if act_norm[anchor] > 0 else None,
                "within": {"effect": w_eff, "random_effect": rw_eff},
                "cross": [],
            }
            for seed in others:
                row = {"seed": seed,
                       "relative_norm": vec.norm / act_norm[seed] if act_norm[seed] > 0 else None}
                for kind in ("cross", "rotated", "random"):
                    row[f"{kind}_effect"] = series(seed, kind)
                for kind in ("cross", "rotated"):
                    row[f"{kind}_ratio"] = [transfer_ratio(c, w)
                                            for c, w in zip(row[f"{kind}_effect"], w_eff)]
                    row[f"regime_{kind}"] = classify_regime(
                        self.alphas, w_eff, row[f"{kind}_effect"], rw_eff, self.reference_alpha,
                        min_effect=MIN_EFFECT)
                moved = transfer_vector(vec.direction, frames[seed])
                row["cos_raw_rotated"] = cosine(vec.direction, moved) if vec.norm > 0 else None
                entry["cross"].append(row)
            entry["summary"] = self._summary(entry)
            out_sets[name] = entry

        return {
            "site": site,
            "anchor": anchor,
            "seeds": list(others),
            "alphas": list(self.alphas),
            "reference_alpha": self.reference_alpha,
            "random_seed": self.random_seed,
            "n_sequences": int(tokens.shape[0]),
            "n_positions": n_rows,
            "batch": batch,
            "skip_positions": leading_skip(ctx.masks[batch]),
            "mean_activation_norm": {str(s): v for s, v in act_norm.items()},
            "sets": out_sets,
            "definitions": self._definitions(),
        }

    @torch.no_grad()
    def _effects(self, ctx, deltas, tokens, mask) -> dict[int, dict[tuple, float]]:
        """Sum over kept positions of KL(clean || steered) per (model, condition).

        Chunk by chunk (``ctx.batch_size`` windows): the clean distributions of a chunk are
        computed once and compared with every steered run of that model on the chunk, so at most
        one clean and one steered chunk are alive.
        """
        site = self.site
        sums = {seed: dict.fromkeys(conds, 0.0) for seed, conds in deltas.items()}
        work = [(seed, start) for seed in ctx.seeds
                for start in range(0, tokens.shape[0], ctx.batch_size)]
        for seed, start in ctx.progress(work, desc="lm_steering (seed, chunk)"):
            model = ctx.models[seed]
            stop = start + ctx.batch_size
            chunk, keep = tokens[start:stop], mask[start:stop]
            clean = KLReference(kept_logits(model, chunk, keep))
            for cond, delta in deltas[seed].items():
                add = delta.to(clean.logits.device, torch.float32)

                def steer(act, hook, add=add):
                    return act + add.to(act.dtype)

                steered = kept_logits(model, chunk, keep, fwd_hooks=[(site, steer)])
                sums[seed][cond] += clean.kl_sum(steered)
                del steered
        return sums

    def _summary(self, entry: dict) -> dict:
        i = self.alphas.index(self.reference_alpha)
        cross = entry["cross"]
        out = {
            "within_effect": entry["within"]["effect"][i],
            "random_within_effect": entry["within"]["random_effect"][i],
            "mean_cos_raw_rotated": _mean(r["cos_raw_rotated"] for r in cross),
        }
        for kind in ("cross", "rotated", "random"):
            out[f"mean_{kind}_effect"] = _mean(r[f"{kind}_effect"][i] for r in cross)
        for kind in ("cross", "rotated"):
            out[f"mean_{kind}_ratio"] = _mean(r[f"{kind}_ratio"][i] for r in cross)
            labels = [r[f"regime_{kind}"] for r in cross]
            out[f"regime_{kind}_counts"] = {g: labels.count(g) for g in REGIMES if g in labels}
        return out

    def _definitions(self) -> dict:
        lo, hi = CLEAN_RANGE
        return {
            "vector": "v = mean over positive prompts of m(p) - mean over negative prompts of "
            "m(p); m(p) = mean of the anchor's activations at the site over the positions of "
            "prompt p after the first skip_positions (the attention-sink position the corpus "
            "batches skip); prompts tokenised by the anchor's tokenizer with no special tokens "
            "(no BOS), each prompt averaged first, then the prompts",
            "steering": f"alpha * v' is added to the activation at {self.site} at every position "
            "(TransformerLens forward hook) of the first n_sequences windows of the scored "
            "batch; v' = v (within, cross), v @ R^T (rotated), or the set's random direction "
            "(random)",
            "effect": "mean over the kept positions (ctx.masks) of KL(p_clean || p_steered) = "
            "sum_v p_clean(v) (log p_clean(v) - log p_steered(v)) in nats, p = softmax of the "
            "next-token logits, float64 log-softmax; same model clean and steered",
            "within": "the anchor steered with v",
            "cross_effect": "another seed steered with v in unchanged coordinates (the published "
            "cross-seed protocol)",
            "rotated_effect": "another seed steered with v moved into its frame: "
            "transfer_vector(v, ctx.rotation(anchor, seed, site).inverse()) = v @ R^T, R mapping "
            "that seed's activations into the anchor's frame",
            "random_effect": "a random Gaussian direction rescaled to ||v|| (one per set, drawn "
            f"in set order from torch seed {self.random_seed}), on the anchor "
            "(within.random_effect) or on another seed (raw coordinates: a random direction is "
            "random in every frame)",
            "cross_ratio / rotated_ratio": "cross (rotated) effect / within effect at the same "
            "alpha; null where the within effect is 0",
            "regime": f"at the reference alpha {self.reference_alpha}, with W, C, Rw = within, "
            f"cross (or rotated), random-within effect: none if W <= max(Rw, 0) + {MIN_EFFECT}; "
            f"else inverted if C/W > {hi}; clean if {lo} <= C/W <= {hi}; partial if C/W < {lo} "
            "but the cross effect at some larger alpha reaches W; no_transfer otherwise "
            "(polymorph.analysis.steering.classify_regime)",
            "norm": "||v|| (L2, in the anchor's activation units)",
            "relative_norm": "||v|| / mean over the scored batch's kept positions of ||x|| at the "
            "site (anchor; per cross row: that seed); alpha * relative_norm is the push relative "
            "to a typical activation",
            "cos_raw_rotated": "cos(v, v @ R^T): how much the raw vector already points the way "
            "the rotated one does in the other seed's frame",
            "summary": "per set at the reference alpha: means over the other seeds and counts of "
            "regimes",
        }

    # -- outputs -----------------------------------------------------------------------

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for name, entry in result["sets"].items():
            s = entry["summary"]
            for key in ("within_effect", "random_within_effect", "mean_cross_effect",
                        "mean_rotated_effect", "mean_random_effect", "mean_cross_ratio",
                        "mean_rotated_ratio", "mean_cos_raw_rotated"):
                if s.get(key) is not None:
                    out[f"{name}/{key}"] = float(s[key])
            if entry["relative_norm"] is not None:
                out[f"{name}/relative_norm"] = float(entry["relative_norm"])
            n = len(entry["cross"])
            for kind in ("cross", "rotated"):
                if n:
                    clean = s[f"regime_{kind}_counts"].get("clean", 0)
                    out[f"{name}/fraction_clean_{kind}"] = clean / n
        return out

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        effects, transfer = [], []
        alphas, ref = result["alphas"], result["reference_alpha"]
        i_ref = alphas.index(ref)
        for name, entry in result["sets"].items():
            w = entry["within"]
            for i, a in enumerate(alphas):
                effects.append([name, result["anchor"], "within", a, w["effect"][i], None])
                effects.append([name, result["anchor"], "random_within", a, w["random_effect"][i],
                                None])
            for row in entry["cross"]:
                for kind in ("cross", "rotated", "random"):
                    ratios = row.get(f"{kind}_ratio", [None] * len(alphas))
                    for i, a in enumerate(alphas):
                        effects.append([name, row["seed"], kind, a, row[f"{kind}_effect"][i],
                                        ratios[i]])
                transfer.append([name, row["seed"], row["regime_cross"], row["regime_rotated"],
                                 row["cross_ratio"][i_ref], row["rotated_ratio"][i_ref],
                                 row["cos_raw_rotated"], entry["relative_norm"]])
        return {
            "lm_steering_effects": (["set", "seed", "kind", "alpha", "mean_kl", "ratio"], effects),
            "lm_steering_transfer": (["set", "seed", "regime_cross", "regime_rotated",
                                      f"cross_ratio@{ref}", f"rotated_ratio@{ref}",
                                      "cos_raw_rotated", "relative_norm"], transfer),
        }

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        names = list(result["sets"])
        if not names:
            return []
        alphas = result["alphas"]
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
        styles = {"cross": COLOURS["naive"], "rotated": COLOURS["rotated"],
                  "random": COLOURS["floor"]}
        for ax, name in zip(axes[0], names):
            entry = result["sets"][name]
            for row in entry["cross"]:
                for kind, colour in styles.items():
                    ax.plot(alphas, row[f"{kind}_effect"], color=colour, lw=0.8, alpha=0.45,
                            ls=":" if kind == "random" else "-")
            if entry["cross"]:
                for kind, colour in styles.items():
                    mean = [_mean(r[f"{kind}_effect"][i] for r in entry["cross"])
                            for i in range(len(alphas))]
                    ax.plot(alphas, mean, color=colour, lw=2, marker="o", ms=3,
                            ls=":" if kind == "random" else "-",
                            label=f"cross {kind}" if kind != "cross" else "cross (raw v)")
            ax.plot(alphas, entry["within"]["effect"], color="black", lw=2, marker="o", ms=3,
                    label="within")
            ax.plot(alphas, entry["within"]["random_effect"], color="black", lw=1, ls="--",
                    label="within random control")
            if all(a > 0 for a in alphas):
                ax.set_xscale("log", base=2)
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
            ax.set_xlabel("alpha")
            ax.set_ylabel("effect: mean KL(clean || steered) (nats)")
            rel = entry["relative_norm"]
            ax.set_title(f"{name}" + (f" (‖v‖ = {rel:.2f} mean ‖x‖)" if rel else ""),
                         fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"LM steering at {result['site']} (anchor seed {result['anchor']}; thin "
                     "lines: single seeds, thick: mean)", fontsize=9)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def report(self, ctx, result: dict, figures) -> str:
        ref = result["reference_alpha"]

        def f(x, fmt="{:.3g}"):
            return "n/a" if x is None else fmt.format(x)

        lines = [
            "## Steering transfer on text (`lm_steering`)",
            "",
            (
                f"Each prompt set's diff-of-means vector v is built on the anchor (seed "
                f"{result['anchor']}) at `{result['site']}` (mean over positive prompts minus "
                "mean over negative prompts, each prompt averaged over its positions after the "
                "first) and added as alpha·v at every position while the model reads "
                f"{result['n_sequences']} {result['batch']} windows. Effect = mean KL(clean || "
                "steered) of the next-token distribution (nats) over the kept positions. Cross = "
                "the same v on another seed (the published test); rotated = v moved into that "
                "seed's frame by the fitted rotation; random = a random direction of equal norm. "
                f"Ratios and regimes at alpha = {ref} (rule: results.json "
                "`lm_steering.definitions.regime`; with KL, 'inverted' means the raw vector "
                "moves the other seed more than its own model). ‖v‖ is given relative to the "
                "mean activation norm at the site. Means over the other seeds."
            ),
            "",
            "| set | ‖v‖ / mean ‖x‖ | within | random | cross (ratio) | rotated (ratio) "
            "| regimes cross | regimes rotated | cos(v, vR^T) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in result["sets"].items():
            s = entry["summary"]

            def counts(kind, s=s):
                return ", ".join(f"{k} {v}" for k, v in s[f"regime_{kind}_counts"].items()) or "-"

            lines.append(
                f"| {name} | {f(entry['relative_norm'], '{:.3f}')} | {f(s['within_effect'])} | "
                f"{f(s['random_within_effect'])} | {f(s['mean_cross_effect'])} "
                f"({f(s['mean_cross_ratio'], '{:.2f}')}) | {f(s['mean_rotated_effect'])} "
                f"({f(s['mean_rotated_ratio'], '{:.2f}')}) | {counts('cross')} | "
                f"{counts('rotated')} | {f(s['mean_cos_raw_rotated'], '{:.3f}')} |"
            )
        lines += [""] + [f"- `{name}`: {e['description']}" for name, e in result["sets"].items()
                         if e["description"]]
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        lines += [
            "",
            (
                "Caveats: KL measures how far the output moves, not whether it moves towards the "
                "concept, so the random control is the yardstick: a set whose within effect does "
                "not beat it by "
                f"{MIN_EFFECT} nats is regime 'none'. The vectors come from a dozen or two "
                "prompts per side and carry their template's quirks."
            ),
        ]
        return "\n".join(lines)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
