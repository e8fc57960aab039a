"""steering: do steering vectors built on the anchor move the other seeds, raw or rotated?

METHOD.md, "Steering". Three diff-of-means vectors are built on the anchor's activations at one
residual site over the non-PAD positions of the analysis eval batch, then added as
``sign * alpha * v`` at every position of that site (a TransformerLens forward hook):

* ``depth_4_to_5``: mean(depth == 5) - mean(depth == 4), added; targets the depth head on the
  positions whose depth label is 4 (pushing 4 towards 5 makes it wrong);
* ``suppress_invalid``: mean(valid == 1 & depth == 4) - mean(valid == 0 & depth == 4),
  subtracted; targets the valid head on the positions labelled invalid (valid == 1);
* ``closer``: mean(closer tokens) - mean(opener tokens), added; targets the tok head on the
  opener positions. The vector is a token-identity direction (opener vs closer) and the tok head
  is the only head whose label is a function of the current token alone, so it is the head the
  vector speaks to directly; being a copy task it may be hard to move (a "none" regime then says
  so rather than hiding it behind another head's indirect response).

Effect of one steered run = baseline accuracy - steered accuracy of the targeted head on the
targeted positions (the drop in conditional accuracy; positive = the vector did its job). It is
measured on the anchor (within), on every other seed with the raw vector (unchanged coordinates,
the published protocol), on every other seed with the vector moved into that seed's frame by the
fitted rotation (polymorph's addition), and for a random vector of equal norm (the control) on
the anchor and on every other seed. Transfer ratio = cross effect / within effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from polymorph.align.haar import diagnose, haar_null
from polymorph.align.procrustes import Rotation
from polymorph.align.transfer import transfer_vector
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.errors import PolymorphError
from polymorph.models.dyck import split_logits
from polymorph.tasks.dyck import FIRST_BRACKET, HEADS, LAST_BRACKET, PAD, label_tokens

DEFAULT_SITE = "blocks.1.hook_resid_mid"
VECTORS = ("depth_4_to_5", "suppress_invalid", "closer")
# Transfer ratios inside this range at the reference alpha count as "clean" (symmetric in log
# scale: 0.67 ~ 1 / 1.5).
CLEAN_RANGE = (0.67, 1.5)
# A within effect must beat the random control by this much (accuracy, absolute) to be a real
# effect; below it the ratio is noise over noise and the regime is "none".
MIN_EFFECT = 0.01
REGIMES = ("clean", "partial", "inverted", "no_transfer", "none")
FIGURE_FILE = "steering_dose_response.png"

# What each vector is: the two groups whose means are subtracted, whether it is added (+1) or
# subtracted (-1), and the targeted head and positions.
SPECS: dict[str, dict] = {
    "depth_4_to_5": {
        "plus": "depth label == 5", "minus": "depth label == 4", "sign": 1, "head": "depth",
        "targets": "positions with depth label 4 (accuracy = depth head still predicts 4)",
    },
    "suppress_invalid": {
        "plus": "valid label == 1 (invalid prefix) and depth label == 4",
        "minus": "valid label == 0 (valid prefix) and depth label == 4", "sign": -1,
        "head": "valid",
        "targets": "positions with valid label 1, i.e. invalid prefixes (accuracy = valid head "
        "still predicts 'invalid')",
    },
    "closer": {
        "plus": "closer tokens ) ] }", "minus": "opener tokens ( [ {", "sign": 1, "head": "tok",
        "targets": "opener positions (accuracy = tok head still predicts the opener's own id)",
    },
}


def row_labels(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three labels at the non-PAD positions of ``tokens``, one row per position.

    Rows are ordered by sequence, then position: the order of
    :func:`polymorph.activations.collect_activations`, so row i here is activation row i.
    """
    batch = label_tokens(tokens)
    return {head: batch.labels[head][batch.mask] for head in HEADS}


def _bracket_kind(tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    is_bracket = (tok >= FIRST_BRACKET) & (tok <= LAST_BRACKET)
    odd = (tok - FIRST_BRACKET).remainder(2) == 1
    return is_bracket & ~odd, is_bracket & odd  # (opener, closer)


def vector_groups(labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per vector, the (plus, minus) row masks whose activation means are subtracted."""
    depth, valid = labels["depth"], labels["valid"]
    opener, closer = _bracket_kind(labels["tok"])
    return {
        "depth_4_to_5": (depth == 5, depth == 4),
        "suppress_invalid": ((valid == 1) & (depth == 4), (valid == 0) & (depth == 4)),
        "closer": (closer, opener),
    }


def target_masks(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per vector, the row mask of the positions whose targeted-head accuracy is the effect."""
    opener, _ = _bracket_kind(labels["tok"])
    return {
        "depth_4_to_5": labels["depth"] == 4,
        "suppress_invalid": labels["valid"] == 1,
        "closer": opener,
    }


@dataclass(frozen=True)
class SteeringVector:
    """One diff-of-means direction in the anchor's frame.

    ``direction`` = mean(acts[plus]) - mean(acts[minus]) (float64 [d]); the steering delta at
    alpha is ``sign * alpha * direction``.
    """

    name: str
    direction: torch.Tensor
    sign: int
    head: str
    n_plus: int
    n_minus: int

    @property
    def norm(self) -> float:
        return float(self.direction.norm())


def build_vectors(acts: torch.Tensor, labels: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, SteeringVector], dict[str, str]]:
    """The three steering vectors from activations [n, d] and row-aligned labels.

    Returns (vectors, skipped): a vector with an empty group (e.g. no depth-5 position in the
    batch) is not built; ``skipped[name]`` says which group was empty.
    """
    n = acts.shape[0]
    if any(v.shape[0] != n for v in labels.values()):
        raise ValueError(f"activations have {n} rows but the labels have "
                         f"{[v.shape[0] for v in labels.values()]}: they must be the same "
                         "non-PAD positions in the same order")
    vectors, skipped = {}, {}
    for name, (plus, minus) in vector_groups(labels).items():
        spec = SPECS[name]
        empty = [desc for desc, m in ((spec["plus"], plus), (spec["minus"], minus)) if not m.any()]
        if empty:
            skipped[name] = f"no position with {' / '.join(empty)} in the eval batch"
            continue
        x = acts.double()
        direction = x[plus].mean(0) - x[minus].mean(0)
        vectors[name] = SteeringVector(name, direction, spec["sign"], spec["head"],
                                       int(plus.sum()), int(minus.sum()))
    return vectors, skipped


@torch.no_grad()
def head_predictions(model, tokens: torch.Tensor, site: str | None = None,
                     delta: torch.Tensor | None = None, batch_size: int = 512
                     ) -> dict[str, torch.Tensor]:
    """Argmax class of every head at the non-PAD positions, optionally steered.

    With ``delta`` ([d]), ``delta`` is added to the activation at hook ``site`` at every position
    (PAD included: the model is causal and PAD only trails, so that changes no scored position).
    Returns head -> long [n_rows], rows in :func:`row_labels` order.
    """
    device = next(model.parameters()).device
    hooks = []
    if delta is not None:
        add = delta.detach().to(device, torch.float32)

        def steer(act, hook):
            return act + add.to(act.dtype)

        hooks = [(site, steer)]
    out: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start : start + batch_size]
        mask = chunk != PAD
        width = int(mask.sum(1).max())
        logits = model.run_with_hooks(chunk[:, :width].to(device), fwd_hooks=hooks)
        heads = split_logits(logits)
        keep = mask[:, :width].to(device)
        for head in HEADS:
            out[head].append(heads[head][keep].argmax(-1).cpu())
    return {h: torch.cat(v) for h, v in out.items()}


def accuracy(preds: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the masked rows where ``preds == labels`` (NaN for an empty mask)."""
    if not mask.any():
        return float("nan")
    return float((preds[mask] == labels[mask]).double().mean())


def transfer_ratio(cross: float, within: float, eps: float = 1e-12) -> float | None:
    """cross / within, or None when the within effect is (numerically) zero."""
    if abs(within) <= eps or not (math.isfinite(cross) and math.isfinite(within)):
        return None
    return cross / within


def classify_regime(alphas: list[float], within: list[float], cross: list[float],
                    random_within: list[float], reference_alpha: float,
                    clean_range: tuple[float, float] = CLEAN_RANGE,
                    min_effect: float = MIN_EFFECT) -> str:
    """The transfer regime of one vector on one seed (lists are per alpha, aligned with alphas).

    With W, C, Rw the within, cross and random-within effects at the reference alpha:
      * ``none``: W <= max(Rw, 0) + min_effect (the vector does not beat a random one of the
        same norm on its own model, so there is nothing to transfer);
      * ``inverted``: C / W > clean_range[1] (cross effect larger than within);
      * ``clean``: clean_range[0] <= C / W <= clean_range[1];
      * ``partial``: C / W < clean_range[0], but at some larger alpha the cross effect reaches W
        (a larger dose is needed);
      * ``no_transfer``: C / W < clean_range[0] and no tested larger alpha reaches W.
    """
    i = alphas.index(reference_alpha)
    w = within[i]
    if not w > max(random_within[i], 0.0) + min_effect:
        return "none"
    ratio = cross[i] / w
    low, high = clean_range
    if ratio > high:
        return "inverted"
    if ratio >= low:
        return "clean"
    if any(c >= w for a, c in zip(alphas, cross) if a > reference_alpha):
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


def to_seed_frame(ctx, anchor: int, seed: int, site: str) -> Rotation:
    """The rotation mapping the anchor's frame into ``seed``'s frame at ``site``."""
    if (anchor, seed, site) in ctx.rotations:
        return ctx.rotation(anchor, seed, site).inverse()
    if (seed, anchor, site) in ctx.rotations:
        return ctx.rotation(seed, anchor, site)
    raise PolymorphError(f"no rotation between seeds {anchor} and {seed} at {site}; the analysis "
                         "context fits one per pair and site")


def fixed_overlap(v: torch.Tensor, projector: torch.Tensor) -> float:
    """||P v|| / ||v||: the fraction of v's length inside the near-fixed subspace of R."""
    v = v.double()
    return float((projector.double() @ v).norm() / v.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


class Steering(AnalysisCallback):
    """Dose-response of three steering vectors, within the anchor and across seeds.

    Args:
        site: the residual hook to steer at; must be one of the analysis sites (rotations exist
            only there).
        alphas: the doses; each is one steered forward pass per vector and model.
        random_seed: seeds the random control directions (one per vector, drawn in VECTORS
            order, rescaled to the vector's norm).
        reference_alpha: the dose at which the regime is judged (None: the alpha closest to 1).
        n_sequences: steer on the first n sequences of the eval batch only (None: all of it);
            the vectors are always built on the whole eval batch.
        batch_size: sequences per forward pass.
    """

    name = "steering"

    def __init__(self, site: str = DEFAULT_SITE, alphas=(0.5, 1.0, 2.0, 4.0), random_seed: int = 0,
                 reference_alpha: float | None = None, n_sequences: int | None = None,
                 batch_size: int = 512) -> None:
        alphas = [float(a) for a in alphas]
        if not alphas or not all(math.isfinite(a) for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of finite doses, got {alphas}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas has duplicates: {alphas}")
        if n_sequences is not None and int(n_sequences) < 1:
            raise ValueError(f"n_sequences must be None (all) or >= 1, got {n_sequences}")
        self.site = str(site)
        self.alphas = alphas
        self.random_seed = int(random_seed)
        self.reference_alpha = pick_reference_alpha(alphas, reference_alpha)
        self.n_sequences = None if n_sequences is None else int(n_sequences)
        self.batch_size = int(batch_size)

    # -- computation ---------------------------------------------------------------------

    def _random_directions(self, d: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.random_seed)
        return torch.randn(len(VECTORS), d, generator=g, dtype=torch.float64)

    def run(self, ctx) -> dict:
        site, anchor = self.site, ctx.anchor
        if site not in ctx.sites:
            raise PolymorphError(
                f"steering site {site} is not an analysis site, and rotations exist only there; "
                f"use one of {list(ctx.sites)} (analysis.callbacks.steering.site=...) or add it to "
                "sites=[...]"
            )
        others = [s for s in ctx.seeds if s != anchor]
        acts = ctx.acts["eval"][anchor][site]
        vectors, skipped = build_vectors(acts, row_labels(ctx.tokens["eval"]))
        tokens = ctx.tokens["eval"]
        if self.n_sequences is not None:
            tokens = tokens[: self.n_sequences]
        labels = row_labels(tokens)
        targets = target_masks(labels)
        d = acts.shape[1]
        random_dirs = self._random_directions(d)

        # Per other seed: the anchor -> seed map and R's near-fixed subspace.
        n_null = int(ctx.cfg.analysis.haar_null_samples)
        frames, diags = {}, {}
        for seed in others:
            frames[seed] = to_seed_frame(ctx, anchor, seed, site)
            null = haar_null(d, frames[seed].group, n_null)
            diags[seed] = diagnose(frames[seed].matrix, null)

        def predict(seed, delta=None):
            return head_predictions(ctx.models[seed], tokens, site, delta, self.batch_size)

        baseline = {seed: predict(seed) for seed in ctx.progress(ctx.seeds,
                                                                  desc="steering baselines")}
        work = []  # (vector, seed, kind, alpha index)
        for name in vectors:
            for i in range(len(self.alphas)):
                work += [(name, anchor, "within", i), (name, anchor, "random_within", i)]
                for seed in others:
                    work += [(name, seed, k, i) for k in ("raw", "rotated", "random")]
        acc: dict[tuple, float] = {}
        for name, seed, kind, i in ctx.progress(work, desc="steering (vector, seed, alpha)"):
            vec = vectors[name]
            if kind in ("within", "raw"):
                direction = vec.direction
            elif kind == "rotated":
                direction = transfer_vector(vec.direction, frames[seed])
            else:
                r = random_dirs[VECTORS.index(name)]
                direction = r * (vec.norm / float(r.norm()))
            delta = vec.sign * self.alphas[i] * direction
            preds = predict(seed, delta)
            acc[(name, seed, kind, i)] = accuracy(preds[vec.head], labels[vec.head],
                                                  targets[name])

        out_vectors = {}
        for name in VECTORS:
            spec = SPECS[name]
            entry = {"skipped": skipped.get(name), **spec}
            if name not in vectors:
                out_vectors[name] = entry
                continue
            vec, mask = vectors[name], targets[name]
            base = {s: accuracy(baseline[s][vec.head], labels[vec.head], mask) for s in ctx.seeds}

            def series(seed, kind, name=name, base=base):
                accs = [acc[(name, seed, kind, i)] for i in range(len(self.alphas))]
                return accs, [base[seed] - a for a in accs]

            w_acc, w_eff = series(anchor, "within")
            rw_acc, rw_eff = series(anchor, "random_within")
            entry.update({
                "norm": vec.norm, "n_plus": vec.n_plus, "n_minus": vec.n_minus,
                "n_targets": int(mask.sum()),
                "within": {"baseline_accuracy": base[anchor], "accuracy": w_acc,
                           "effect": w_eff, "random_accuracy": rw_acc, "random_effect": rw_eff},
                "cross": [],
            })
            for seed in others:
                row = {"seed": seed, "baseline_accuracy": base[seed]}
                for kind in ("raw", "rotated", "random"):
                    row[f"{kind}_accuracy"], row[f"{kind}_effect"] = series(seed, kind)
                for kind in ("raw", "rotated"):
                    row[f"{kind}_ratio"] = [transfer_ratio(c, w)
                                            for c, w in zip(row[f"{kind}_effect"], w_eff)]
                    row[f"regime_{kind}"] = classify_regime(
                        self.alphas, w_eff, row[f"{kind}_effect"], rw_eff, self.reference_alpha)
                moved = transfer_vector(vec.direction, frames[seed])
                diag = diags[seed]
                row.update({
                    "fixed_overlap": fixed_overlap(vec.direction, diag.fixed_projector),
                    "fixed_dim_estimate": diag.fixed_dim_estimate,
                    "fixed_overlap_random_expected": math.sqrt(diag.fixed_dim_estimate / d),
                    "cos_raw_rotated": cosine(vec.direction, moved),
                })
                entry["cross"].append(row)
            entry["summary"] = self._summary(entry)
            out_vectors[name] = entry

        return {
            "site": site,
            "anchor": anchor,
            "seeds": list(others),
            "alphas": list(self.alphas),
            "reference_alpha": self.reference_alpha,
            "random_seed": self.random_seed,
            "n_sequences": int(tokens.shape[0]),
            "vectors": out_vectors,
            "skipped": [f"{k}: {v}" for k, v in skipped.items()],
            "definitions": self._definitions(ctx, d),
        }

    def _summary(self, entry: dict) -> dict:
        i = self.alphas.index(self.reference_alpha)
        cross = entry["cross"]
        out = {
            "within_effect": entry["within"]["effect"][i],
            "random_within_effect": entry["within"]["random_effect"][i],
            "mean_fixed_overlap": _mean(r["fixed_overlap"] for r in cross),
            "mean_cos_raw_rotated": _mean(r["cos_raw_rotated"] for r in cross),
        }
        for kind in ("raw", "rotated", "random"):
            out[f"mean_{kind}_effect"] = _mean(r[f"{kind}_effect"][i] for r in cross)
        for kind in ("raw", "rotated"):
            out[f"mean_{kind}_ratio"] = _mean(r[f"{kind}_ratio"][i] for r in cross)
            labels = [r[f"regime_{kind}"] for r in cross]
            out[f"regime_{kind}_counts"] = {g: labels.count(g) for g in REGIMES if g in labels}
        return out

    def _definitions(self, ctx, d: int) -> dict:
        lo, hi = CLEAN_RANGE
        return {
            "vectors": {
                name: f"mean(anchor acts where {s['plus']}) - mean(where {s['minus']}) over the "
                "non-PAD positions of the whole eval batch; "
                + ("added as +alpha * v" if s["sign"] > 0 else "subtracted as -alpha * v")
                + f"; targeted head: {s['head']}; targeted positions: {s['targets']}"
                for name, s in SPECS.items()
            },
            "steering": f"the delta is added to the activation at {self.site} at every position "
            "(TransformerLens forward hook); one forward pass per (vector, model, alpha, kind)",
            "accuracy": "fraction of the targeted positions (of the steered sequences) where the "
            "targeted head's argmax equals its label (conditional accuracy)",
            "baseline_accuracy": "the same accuracy of the unsteered model",
            "effect": "baseline_accuracy - steered accuracy (drop in conditional accuracy; "
            "positive = the steering did what the vector is for); within: on the anchor",
            "raw_effect": "effect on another seed of the anchor's vector in unchanged coordinates "
            "(the published cross effect)",
            "rotated_effect": "effect on another seed of the anchor's vector mapped into that "
            "seed's frame, v @ R^T (R maps the seed's activations into the anchor's frame; "
            "polymorph.align.transfer_vector(v, rotation.inverse()))",
            "random_effect": "effect of a random Gaussian direction rescaled to ||v|| (one per "
            f"vector, torch seed {self.random_seed}), on the anchor (within.random_effect) or "
            "on another seed, in raw coordinates (a random direction is random in every frame)",
            "raw_ratio / rotated_ratio": "transfer ratio = cross effect / within effect at the "
            "same alpha; null where the within effect is 0",
            "regime": f"judged at the reference alpha {self.reference_alpha} with W, C, Rw = "
            f"within, cross, random-within effect: none if W <= max(Rw, 0) + {MIN_EFFECT}; else "
            f"inverted if C/W > {hi}; clean if {lo} <= C/W <= {hi}; partial if C/W < {lo} but "
            f"the cross effect at some larger alpha reaches W; no_transfer otherwise. Published "
            "regimes: clean, partial, inverted",
            "fixed_overlap": "||P v|| / ||v|| with P the orthogonal projector onto the near-fixed "
            "subspace of the anchor<->seed rotation R (polymorph.align.haar.diagnose against a "
            f"Haar null of d={d}, {int(ctx.cfg.analysis.haar_null_samples)} draws): the part "
            "of v that R leaves in place, so the raw vector already transfers",
            "fixed_dim_estimate": "dimension of that near-fixed subspace (excess over Haar)",
            "fixed_overlap_random_expected": "sqrt(fixed_dim_estimate / d): the expected overlap "
            "of a random direction, for comparison",
            "cos_raw_rotated": "cosine between v and v @ R^T: how much the raw vector already "
            "points the right way in the other seed's frame",
            "n_targets": "number of targeted positions in the steered sequences",
            "summary": "per vector at the reference alpha: means over the other seeds and counts "
            "of regimes",
        }

    # -- outputs -----------------------------------------------------------------------

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for name, entry in result["vectors"].items():
            if entry.get("skipped"):
                continue
            s = entry["summary"]
            for key in ("within_effect", "random_within_effect", "mean_raw_effect",
                        "mean_rotated_effect", "mean_raw_ratio", "mean_rotated_ratio",
                        "mean_fixed_overlap", "mean_cos_raw_rotated"):
                if s.get(key) is not None:
                    out[f"{name}/{key}"] = float(s[key])
            n = len(entry["cross"])
            for kind in ("raw", "rotated"):
                if n:
                    clean = s[f"regime_{kind}_counts"].get("clean", 0)
                    out[f"{name}/fraction_clean_{kind}"] = clean / n
        return out

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        effects, transfer = [], []
        alphas, ref = result["alphas"], result["reference_alpha"]
        i_ref = alphas.index(ref)
        for name, entry in result["vectors"].items():
            if entry.get("skipped"):
                continue
            w = entry["within"]
            for i, a in enumerate(alphas):
                effects.append([name, result["anchor"], "within", a, w["accuracy"][i],
                                w["effect"][i], None])
                effects.append([name, result["anchor"], "random_within", a,
                                w["random_accuracy"][i], w["random_effect"][i], None])
            for row in entry["cross"]:
                for kind in ("raw", "rotated", "random"):
                    for i, a in enumerate(alphas):
                        ratio = row.get(f"{kind}_ratio", [None] * len(alphas))[i]
                        effects.append([name, row["seed"], f"cross_{kind}", a,
                                        row[f"{kind}_accuracy"][i], row[f"{kind}_effect"][i],
                                        ratio])
                transfer.append([name, row["seed"], row["regime_raw"], row["regime_rotated"],
                                 row["raw_ratio"][i_ref], row["rotated_ratio"][i_ref],
                                 row["fixed_overlap"], row["fixed_dim_estimate"],
                                 row["cos_raw_rotated"]])
        return {
            "steering_effects": (["vector", "seed", "kind", "alpha", "accuracy", "effect",
                                  "ratio"], effects),
            "steering_transfer": (["vector", "seed", "regime_raw", "regime_rotated",
                                   f"raw_ratio@{ref}", f"rotated_ratio@{ref}", "fixed_overlap",
                                   "fixed_dim_estimate", "cos_raw_rotated"], transfer),
        }

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        names = [n for n, e in result["vectors"].items() if not e.get("skipped")]
        if not names:
            return []
        alphas = result["alphas"]
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
        styles = {"raw": COLOURS["naive"], "rotated": COLOURS["rotated"],
                  "random": COLOURS["floor"]}
        for ax, name in zip(axes[0], names):
            entry = result["vectors"][name]
            w = entry["within"]
            for row in entry["cross"]:
                for kind, colour in styles.items():
                    ax.plot(alphas, row[f"{kind}_effect"], color=colour, lw=0.8, alpha=0.45,
                            ls=":" if kind == "random" else "-")
            for kind, colour in styles.items():
                mean = [_mean(r[f"{kind}_effect"][i] for r in entry["cross"])
                        for i in range(len(alphas))]
                if entry["cross"]:
                    ax.plot(alphas, mean, color=colour, lw=2, marker="o", ms=3,
                            ls=":" if kind == "random" else "-",
                            label=f"cross {kind}" + (" control" if kind == "random" else ""))
            ax.plot(alphas, w["effect"], color="black", lw=2, marker="o", ms=3, label="within")
            ax.plot(alphas, w["random_effect"], color="black", lw=1, ls="--",
                    label="within random control")
            ax.axhline(0, color="grey", lw=0.6)
            if all(a > 0 for a in alphas):
                ax.set_xscale("log", base=2)
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
            ax.set_xlabel("alpha")
            ax.set_ylabel(f"effect: drop in {entry['head']}-head accuracy")
            ax.set_title(f"{name} ({entry['head']} head)", fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"steering at {result['site']} (anchor seed {result['anchor']}; thin lines: "
                     "single seeds, thick: mean)", fontsize=9)
        return [save(fig, fig_dir / FIGURE_FILE)]

    def report(self, ctx, result: dict, figures) -> str:
        ref = result["reference_alpha"]
        lines = [
            "## Steering transfer (`steering`)",
            "",
            (
                f"Diff-of-means vectors built on the anchor (seed {result['anchor']}) at "
                f"`{result['site']}`, added as ±alpha·v at every position. Effect = drop in the "
                "targeted head's accuracy on the targeted positions. Cross raw = the same vector "
                "on another seed (the published test); cross rotated = the vector moved into "
                "that seed's frame by the fitted rotation; random = a random direction of equal "
                f"norm. Ratios and regimes at alpha = {ref} (regime rule in results.json "
                "`steering.definitions.regime`). Overlap = ||Pv||/||v|| with the near-fixed "
                "subspace of R; cos = cos(v, v R^T). Means over the other seeds."
            ),
            "",
            (
                "| vector | head | within | random | cross raw (ratio) | cross rotated (ratio) "
                "| regimes raw | regimes rotated | overlap | cos |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]

        def f(x, fmt="{:+.3f}"):
            return "n/a" if x is None else fmt.format(x)

        for name, entry in result["vectors"].items():
            if entry.get("skipped"):
                lines.append(f"| {name} | {entry['head']} | skipped: {entry['skipped']} "
                             "| | | | | | | |")
                continue
            s = entry["summary"]

            def counts(kind, s=s):
                return ", ".join(f"{k} {v}" for k, v in s[f"regime_{kind}_counts"].items()) or "-"

            lines.append(
                f"| {name} | {entry['head']} | {f(s['within_effect'])} | "
                f"{f(s['random_within_effect'])} | {f(s['mean_raw_effect'])} "
                f"({f(s['mean_raw_ratio'], '{:.2f}')}) | {f(s['mean_rotated_effect'])} "
                f"({f(s['mean_rotated_ratio'], '{:.2f}')}) | {counts('raw')} | "
                f"{counts('rotated')} | {f(s['mean_fixed_overlap'], '{:.3f}')} | "
                f"{f(s['mean_cos_raw_rotated'], '{:.3f}')} |"
            )
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        lines += [
            "",
            (
                "Caveats: effects are measured on the analysis eval batch the vectors were built "
                f"on ({result['n_sequences']} sequences steered), so the within effect is "
                "in-sample. A ratio is noisy when the within effect is small; the regime is "
                "'none' when the vector does not beat the random control on the anchor by "
                f"{MIN_EFFECT}. The overlap uses the near-fixed subspace estimated from R's "
                "eigen-angles; where the activations span fewer than d directions, R (and so "
                "that subspace) is not determined outside their span."
            ),
        ]
        if result["skipped"]:
            lines += ["", "Skipped: " + "; ".join(result["skipped"])]
        return "\n".join(lines)
