"""What differs between families in the steering question, as swappable strategies.

The steering callback (:mod:`polymorph.analysis.steering`) is written once; two strategy
objects, chosen by config (``_target_`` nodes), say

* how vectors are built: :class:`LabelContrasts` (differences of mean activations between
  groups of positions defined by the Dyck labels, on the fit batch) or :class:`PromptContrasts`
  (differences of mean activations between two sets of prompts);
* how an effect is measured: :class:`HeadAccuracyDrop` (the drop in a head's accuracy on the
  positions a vector targets) or :class:`NextTokenKL` (how far the next-token distribution
  moves, KL(clean || steered)).

Both effects are sums over positions divided by a count of positions, computed per sequence,
so every effect, ratio and interval resamples whole sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from polymorph.align.outputs import KLReference
from polymorph.errors import PolymorphError
from polymorph.families.base import NO_TARGET

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteeringVector:
    """One direction in the anchor's frame.

    Attributes:
        name: the vector's name in results.json.
        direction: float64 [d], mean(plus group) - mean(minus group).
        sign: +1 (added) or -1 (subtracted): the delta at dose alpha is ``sign * alpha * v``.
        n_plus, n_minus: activation rows (or prompt positions) in each group.
        description: what the two groups are and what the vector is meant to do.
    """

    name: str
    direction: torch.Tensor
    sign: int
    n_plus: int
    n_minus: int
    description: str

    @property
    def norm(self) -> float:
        return float(self.direction.norm())


def diff_of_means(acts: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """float64 [d]: mean of ``acts[plus]`` minus mean of ``acts[minus]`` (boolean row masks)."""
    x = acts.double()
    return x[plus].mean(0) - x[minus].mean(0)


# -- vectors -----------------------------------------------------------------------------


def _bracket_kind(tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from polymorph.tasks.dyck import FIRST_BRACKET, LAST_BRACKET

    is_bracket = (tok >= FIRST_BRACKET) & (tok <= LAST_BRACKET)
    odd = (tok - FIRST_BRACKET).remainder(2) == 1
    return is_bracket & ~odd, is_bracket & odd  # (opener, closer)


# What each Dyck vector is: its groups, its sign, and the head and positions it targets.
DYCK_VECTORS: dict[str, dict] = {
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


class LabelContrasts:
    """Diff-of-means vectors between groups of positions of the Dyck labels.

    Built on the anchor's activations over the kept positions of the **fit** batch, so every
    effect is then scored on held-out sequences (the eval batch):

    * ``depth_4_to_5``: mean(depth == 5) - mean(depth == 4), added; targets the depth head on
      the positions whose depth label is 4;
    * ``suppress_invalid``: mean(valid == 1 & depth == 4) - mean(valid == 0 & depth == 4),
      subtracted; targets the valid head on the invalid positions;
    * ``closer``: mean(closer tokens) - mean(opener tokens), added; targets the tok head on the
      opener positions (the one head whose label is a function of the current token alone).
    """

    readout = "dyck_heads"

    def groups(self, labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        depth, valid = labels["depth"], labels["valid"]
        opener, closer = _bracket_kind(labels["tok"])
        return {
            "depth_4_to_5": (depth == 5, depth == 4),
            "suppress_invalid": ((valid == 1) & (depth == 4), (valid == 0) & (depth == 4)),
            "closer": (closer, opener),
        }

    def build(self, ctx, site: str, batch: str = "fit"
              ) -> tuple[dict[str, SteeringVector], dict[str, str]]:
        b = ctx.batches[batch]
        labels = ctx.readout.targets(b.tokens, b.mask)
        acts = ctx.acts[batch][ctx.anchor][site]
        vectors, skipped = {}, {}
        for name, (plus, minus) in self.groups(labels).items():
            spec = DYCK_VECTORS[name]
            empty = [d for d, m in ((spec["plus"], plus), (spec["minus"], minus)) if not m.any()]
            if empty:
                skipped[name] = f"no position with {' / '.join(empty)} in the {batch} batch"
                continue
            vectors[name] = SteeringVector(
                name, diff_of_means(acts, plus, minus), spec["sign"], int(plus.sum()),
                int(minus.sum()),
                f"mean(anchor activations where {spec['plus']}) - mean(where {spec['minus']}) "
                f"over the kept positions of the {batch} batch; "
                + ("added as +alpha * v" if spec["sign"] > 0 else "subtracted as -alpha * v")
                + f"; targeted head: {spec['head']}; targeted positions: {spec['targets']}")
        return vectors, skipped

    def target(self, name: str, labels: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        """The head and the row mask whose accuracy is vector ``name``'s effect."""
        opener, _ = _bracket_kind(labels["tok"])
        rows = {"depth_4_to_5": labels["depth"] == 4, "suppress_invalid": labels["valid"] == 1,
                "closer": opener}
        return DYCK_VECTORS[name]["head"], rows[name]


def validate_prompt_sets(prompt_sets) -> dict[str, dict]:
    """Plain dicts {name: {positive: [str], negative: [str], description: str}}; a clear error
    for anything missing or empty."""
    if prompt_sets is None or not hasattr(prompt_sets, "items"):
        raise PolymorphError("steering.vectors.prompt_sets must map a name to {positive: [...], "
                             "negative: [...], description: ...} (see "
                             "conf/steering_prompts/english.yaml)")
    if not prompt_sets:
        raise PolymorphError("steering.vectors.prompt_sets is empty: give at least one set (see "
                             "conf/steering_prompts/english.yaml)")
    out = {}
    for name, spec in prompt_sets.items():
        if spec is None or not isinstance(spec, Mapping) and not hasattr(spec, "get"):
            raise PolymorphError(f"prompt set {name!r} must be a mapping with positive, negative "
                                 f"and description, got {spec!r}")
        entry = {"description": str(spec.get("description") or "")}
        for side in ("positive", "negative"):
            prompts = spec.get(side)
            if prompts is None or isinstance(prompts, str) or len(prompts) == 0:
                raise PolymorphError(f"prompt set {name!r} has no {side} prompts: give a "
                                     f"non-empty list under {name}.{side}")
            entry[side] = [str(p) for p in prompts]
        out[str(name)] = entry
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


class PromptContrasts:
    """Diff-of-means vectors between a positive and a negative set of prompts.

    v = mean over positive prompts of m(p) - mean over negative prompts of m(p), with m(p) the
    mean of the anchor's activations over the positions of prompt p after the first few (as
    many as the corpus batches skip: without a BOS the first token is the attention sink, whose
    activations would swamp the mean). Each prompt is averaged first, then the prompts, so a
    long prompt weighs as much as a short one. Every position, not only the last, because the
    vector is added at every position of the text it steers, and a final token is usually
    punctuation of the template.

    Args:
        prompt_sets: name -> {positive: [str], negative: [str], description: str}
            (``conf/steering_prompts/``).
    """

    readout = "next_token"

    def __init__(self, prompt_sets=None) -> None:
        self.prompt_sets = validate_prompt_sets(prompt_sets)

    def build(self, ctx, site: str, batch: str = "fit"
              ) -> tuple[dict[str, SteeringVector], dict[str, str]]:
        model = ctx.models[ctx.anchor]
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise PolymorphError("prompt steering needs the anchor model's tokenizer")
        row = ctx.batches[batch].mask[0]
        skip = int(row.long().argmax()) if bool(row.any()) else int(row.numel())
        pad = tokenizer.pad_token_id
        pad = int((tokenizer.eos_token_id if pad is None else pad) or 0)  # never read: causal
        vectors = {}
        for name, spec in self.prompt_sets.items():
            means, rows = {}, {}
            for side in ("positive", "negative"):
                ids = []
                for prompt in spec[side]:
                    toks = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                    if len(toks) <= skip:
                        raise PolymorphError(
                            f"prompt set {name!r} ({side}): prompt {prompt!r} tokenises to "
                            f"{len(toks)} token(s); the vector reads positions after the first "
                            f"{skip}, so every prompt needs at least {skip + 1} tokens")
                    ids.append(toks)
                means[side] = prompt_means(model, ids, site, skip, pad, ctx.batch_size)
                rows[side] = sum(len(x) - skip for x in ids)
            direction = means["positive"].mean(0) - means["negative"].mean(0)
            if not bool(direction.any()):
                log.warning("steering: prompt set %r gives v = 0 at %s", name, site)
            vectors[name] = SteeringVector(
                name, direction, 1, rows["positive"], rows["negative"],
                f"{spec['description']}: mean over its positive prompts of m(p) - mean over its "
                f"negative prompts of m(p), m(p) = mean anchor activation over the positions of "
                f"prompt p after the first {skip}; added as +alpha * v")
        return vectors, {}

    def target(self, name: str, labels: dict[str, torch.Tensor]) -> tuple[str, None]:
        return "next_token", None


# -- effects -----------------------------------------------------------------------------


class HeadAccuracyDrop:
    """Effect = baseline accuracy - steered accuracy of the targeted head on the targeted
    positions (the drop in conditional accuracy; positive = the vector did its job)."""

    readout = "dyck_heads"
    units = "accuracy"
    definition = ("baseline accuracy - steered accuracy of the vector's targeted head on its "
                  "targeted positions of the steered sequences (the drop in conditional "
                  "accuracy; positive = the vector did what it is for)")

    def prepare(self, clean: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        return {h: (x.argmax(-1).cpu() == labels[h]) for h, x in clean.items()}

    def rows(self, state, steered: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
             head: str, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row (numerator, denominator) of the effect."""
        now = steered[head].argmax(-1).cpu() == labels[head]
        keep = (labels[head] != NO_TARGET) if rows is None else rows
        drop = (state[head].double() - now.double()) * keep.double()
        return drop, keep.double()


class NextTokenKL:
    """Effect = mean over the kept positions of KL(p_clean || p_steered) in nats: how far the
    vector moves the model's next-token distribution (a magnitude, not a direction)."""

    readout = "next_token"
    units = "nats"
    definition = ("mean over the kept positions of the steered sequences of KL(p_clean || "
                  "p_steered) = sum_v p_clean(v) (log p_clean(v) - log p_steered(v)) in nats, p "
                  "= softmax of the next-token logits; same model clean and steered")

    def prepare(self, clean: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        return {h: KLReference(x) for h, x in clean.items()}

    def rows(self, state, steered: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
             head: str, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        kl = state[head].kl_rows(steered[head])
        keep = torch.ones_like(kl) if rows is None else rows.double()
        return kl * keep, keep
