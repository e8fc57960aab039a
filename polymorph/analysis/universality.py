"""universality: do two seeds' SAE dictionaries contain the same directions, beyond chance?

Per (pair (a, b), site): for each decoder direction of SAE a, the max cosine over SAE b's
directions (mean, fraction above 0.5) and a one-to-one Hungarian matching's mean cosine, raw and
with b's dictionary rotated into a's frame by the fitted rotation
(:mod:`polymorph.align.universality`). Each is read between two references:

* **matched chance** (:func:`~polymorph.align.universality.matched_chance`): two random
  dictionaries of the same shapes whose rows are drawn from each real dictionary's own row
  second-moment matrix (b's rotated into a's frame for the rotated comparison). Trained rows live
  in the activation span, where random directions already agree far more than on the sphere;
  the isotropic value (rows uniform on the sphere) is kept, labelled as the lower bound it is.
* **SAE-seed ceiling**: SAE a against a second SAE trained on the same model, site and data,
  differing only in its initialisation seed (``conf/sae_ladder/ceiling.yaml``). Two SAEs of one
  model already disagree on many features, so a cross-model value means little until it is set
  next to this one. It is found on disk as the SAE config equal to the analysed one except for
  ``shared_init_seed``; where it is missing, the result says which command trains it and is
  marked partial.

Intervals: universality has no sequences to resample; per site, the means over seed pairs get a
percentile interval over the pairs (none with one pair). Pairs that share the anchor are not
independent, so that interval is indicative.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from polymorph.align.universality import chance_level, decoder_universality, matched_chance
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.intervals import (
    INTERVAL_DEFINITION,
    check_margin,
    check_n_boot,
    mean,
    pair_interval,
)
from polymorph.analysis.plots import plt, save
from polymorph.analysis.readings import between, fmt, fmt_ci, relation

METRICS = ("mean_max_cos", "hungarian_mean_cos", "frac_above_0_5")
KINDS = ("raw", "rotated", "matched_chance_raw", "matched_chance_rotated", "ceiling")
CEILING_LADDER = "sae_ladder=ceiling"


def _summary(u) -> dict:
    return u.to_dict(include_per_feature=False)  # per-feature lists stay out of results.json


def _chance(c) -> dict:
    keys = ("mean_max_cos", "mean_max_cos_std", "frac_above_0_5", "frac_above_0_5_std",
            "hungarian_mean_cos", "hungarian_mean_cos_std", "effective_dim_a", "effective_dim_b",
            "n_trials", "kind")
    return {k: getattr(c, k) for k in keys}


def find_ceiling_folder(layout, site: str, analysed: dict,
                        shared_init_seed: int | None = None) -> Path | None:
    """The folder of the SAE that equals ``analysed`` (an SAE config dict) except for
    ``shared_init_seed``, at ``site`` of one run; None if there is none.

    ``shared_init_seed`` given: exactly that config (its folder name is its config id).
    None: any finished SAE folder of the site whose config differs only there (the smallest such
    ``shared_init_seed`` if there are several).
    """
    from polymorph.files import read_json
    from polymorph.sae.config import SAETrainConfig, config_id

    base = SAETrainConfig.from_dict(analysed)
    if shared_init_seed is not None:
        if int(shared_init_seed) == base.shared_init_seed:
            return None
        folder = layout.sae_dir(site, config_id(
            dataclasses.replace(base, shared_init_seed=int(shared_init_seed))))
        return folder if (folder / "cfg.json").is_file() else None
    root = layout.saes / site
    if not root.is_dir():
        return None
    found = []
    for folder in sorted(root.iterdir()):
        meta = folder / "polymorph.json"
        if not (folder / "cfg.json").is_file() or not meta.is_file():
            continue
        try:
            other = SAETrainConfig.from_dict(read_json(meta).get("sae_config", {}))
        except (ValueError, OSError):
            continue
        if other.shared_init_seed != base.shared_init_seed and dataclasses.replace(
                other, shared_init_seed=base.shared_init_seed) == base:
            found.append((other.shared_init_seed, folder))
    return min(found)[1] if found else None


class Universality(AnalysisCallback):
    """Decoder universality against matched chance and the SAE-seed ceiling.

    Args:
        chance_trials: random dictionary pairs per matched-chance estimate (per pair and site);
            0 switches matched chance off (the reading then has no chance to compare with).
        chance_seed: seeds the random dictionaries.
        hungarian: also the one-to-one matching (O(n^3) per comparison; false: NaN).
        ceiling: look for the SAE-seed ceiling (a missing one makes the results partial).
        ceiling_shared_init_seed: the ceiling SAE's ``shared_init_seed`` (None: any SAE on disk
            whose config differs from the analysed one only there).
        margin: differences smaller than this (cosine units, in [0, 1]) read as "at".
        n_boot, level, boot_seed: the interval over pairs (n_boot >= 100).
    """

    name = "universality"

    def __init__(self, chance_trials: int = 3, chance_seed: int = 0, hungarian: bool = True,
                 ceiling: bool = True, ceiling_shared_init_seed: int | None = None,
                 margin: float = 0.01, n_boot: int = 1000, level: float = 0.95,
                 boot_seed: int = 0) -> None:
        if int(chance_trials) < 0:
            raise ValueError(f"chance_trials={chance_trials} must be >= 0 (0: no matched chance)")
        self.chance_trials = int(chance_trials)
        self.chance_seed = int(chance_seed)
        self.hungarian = bool(hungarian)
        self.ceiling = bool(ceiling)
        self.ceiling_shared_init_seed = (None if ceiling_shared_init_seed is None
                                         else int(ceiling_shared_init_seed))
        self.margin = check_margin(margin)
        self.n_boot = check_n_boot(n_boot)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
        self.level = float(level)
        self.boot_seed = int(boot_seed)

    # -- computation ---------------------------------------------------------------------

    def _ceilings(self, ctx, seeds: list[int]) -> tuple[dict, list[str]]:
        """(seed, site) -> (ceiling universality dict, its config id); and what is missing."""
        from polymorph.sae.io import load_sae

        out: dict = {}
        lacking: dict[int, list[str]] = {}
        for seed in seeds:
            for site in ctx.sites:
                saved = ctx.saes.get(seed, {}).get(site)
                if saved is None:
                    continue
                analysed = saved.metadata.get("sae_config")
                folder = None if not analysed else find_ceiling_folder(
                    ctx.runs[seed], site, analysed, self.ceiling_shared_init_seed)
                if folder is None:
                    lacking.setdefault(seed, []).append(site)
                    continue
                other = load_sae(folder)
                u = decoder_universality(saved.sae.W_dec.detach(), other.sae.W_dec.detach(),
                                         hungarian=self.hungarian)
                out[(seed, site)] = {**{k: getattr(u, k) for k in METRICS},
                                     "config_id": folder.name}
        missing = []
        if lacking:
            seeds_txt = ",".join(str(s) for s in sorted(lacking))
            sites = sorted({s for v in lacking.values() for s in v})
            missing.append(
                f"no SAE-seed ceiling for seed(s) {seeds_txt} at {', '.join(sites)} (a second SAE "
                f"of the analysed config {ctx.sae_config_id} differing only in "
                f"shared_init_seed); train it with `{ctx.train_command} seed={seeds_txt} "
                f"stage=sae {CEILING_LADDER}` (plus the sae overrides of this analysis)")
        return out, missing

    def run(self, ctx) -> dict:
        rows, skipped = [], []
        self._hist = {}
        work = [(p, s) for p in ctx.pairs for s in ctx.sites]
        ceilings, missing = ({}, [])
        if self.ceiling:
            ceilings, missing = self._ceilings(ctx, sorted({a for a, _ in ctx.pairs}))
        isotropic: dict = {}
        for (a, b), site in ctx.progress(work, desc="universality (pair, site)"):
            sa, sb = ctx.saes.get(a, {}).get(site), ctx.saes.get(b, {}).get(site)
            if sa is None or sb is None:
                skipped.append(f"pair {a},{b} at {site}: SAE missing")
                continue
            dec_a, dec_b = sa.sae.W_dec.detach(), sb.sae.W_dec.detach()
            rotation = ctx.rotation(a, b, site)
            raw = decoder_universality(dec_a, dec_b, hungarian=self.hungarian)
            rot = decoder_universality(dec_a, dec_b, rotation=rotation, hungarian=self.hungarian)
            row = {"pair": [a, b], "site": site, "raw": _summary(raw), "rotated": _summary(rot)}
            if self.chance_trials:
                for kind, r in (("matched_chance_raw", None), ("matched_chance_rotated", rotation)):
                    row[kind] = _chance(matched_chance(
                        dec_a, dec_b, rotation=r, n_trials=self.chance_trials,
                        seed=self.chance_seed, hungarian=self.hungarian))
            shape = (int(dec_a.shape[1]), int(dec_a.shape[0]), int(dec_b.shape[0]))
            if shape not in isotropic:
                isotropic[shape] = chance_level(*shape, seed=self.chance_seed,
                                                n_trials=max(1, self.chance_trials),
                                                hungarian=self.hungarian)
            row["isotropic_chance"] = {k: getattr(isotropic[shape], k) for k in METRICS}
            row["ceiling"] = ceilings.get((a, site))
            chance = row.get("matched_chance_rotated")
            row["position"] = {
                m: self._position(row["rotated"][m], chance and chance[m],
                                  row["ceiling"] and row["ceiling"][m]) for m in METRICS}
            rows.append(row)
            self._hist[(a, b, site)] = (raw.max_cos, rot.max_cos)
        per_site = {site: self._site_summary([r for r in rows if r["site"] == site])
                    for site in ctx.sites}
        per_site = {s: v for s, v in per_site.items() if v is not None}
        init = {s: ctx.run_configs[s].get("sae", {}) for s in ctx.seeds}
        return {
            "definitions": self._definitions(),
            "sae_config_id": ctx.sae_config_id,
            "sae_init_seed_setting": {str(s): (dict(c).get("init_seed") if c else None)
                                      for s, c in init.items()},
            "margin": self.margin,
            "rows": rows,
            "per_site": per_site,
            "isotropic_chance": [{"d": d, "n_a": n_a, "n_b": n_b, **_chance(c)}
                                 for (d, n_a, n_b), c in isotropic.items()],
            "skipped": skipped,
            "missing": missing,
        }

    def _position(self, value, chance, ceiling) -> float | None:
        """Where value lies from chance (0) to the ceiling (1); only where the ceiling clears
        chance by the margin (otherwise the scale is noise)."""
        if chance is None or ceiling is None or ceiling - chance <= self.margin:
            return None
        return between(value, chance, ceiling)

    def _site_summary(self, rows: list[dict]) -> dict | None:
        if not rows:
            return None
        out: dict = {"n_pairs": len(rows)}
        seed = self.boot_seed

        def add(key: str, values: list):
            vals = [v for v in values if v is not None]
            out[key] = mean(vals)
            out[f"{key}_ci"] = pair_interval(vals, self.n_boot, self.level, seed) \
                if len(vals) == len(values) else None

        for metric in METRICS:
            for kind in KINDS:
                vals = [r[kind][metric] if r.get(kind) else None for r in rows]
                if any(v is not None for v in vals):
                    add(f"{kind}_{metric}", vals)
            out[f"isotropic_chance_{metric}"] = mean(r["isotropic_chance"][metric] for r in rows)
            if all(r.get("matched_chance_rotated") for r in rows):
                add(f"excess_over_matched_chance_{metric}",
                    [r["rotated"][metric] - r["matched_chance_rotated"][metric] for r in rows])
            with_ceiling = [r for r in rows if r.get("ceiling")]
            if with_ceiling:
                add(f"ceiling_minus_rotated_{metric}",
                    [r["ceiling"][metric] - r["rotated"][metric] for r in with_ceiling])
            out[f"position_{metric}"] = self._position(
                out.get(f"rotated_{metric}"), out.get(f"matched_chance_rotated_{metric}"),
                out.get(f"ceiling_{metric}"))
            out.setdefault("relation_to_matched_chance", {})[metric] = relation(
                out.get(f"excess_over_matched_chance_{metric}"),
                out.get(f"excess_over_matched_chance_{metric}_ci"), 0.0, self.margin)
            # "below the ceiling" = the ceiling exceeds the rotated value
            above = relation(out.get(f"ceiling_minus_rotated_{metric}"),
                             out.get(f"ceiling_minus_rotated_{metric}_ci"), 0.0, self.margin)
            out.setdefault("relation_to_ceiling", {})[metric] = {
                "above": "below", "below": "above", "at": "at"}.get(above)
        return out

    def _definitions(self) -> dict:
        return {
            "mean_max_cos": "mean over SAE a's decoder directions of the max cosine over SAE b's "
            "decoder directions (the published universality number)",
            "frac_above_0_5": "fraction of SAE a's directions whose max cosine exceeds 0.5",
            "hungarian_mean_cos": "mean cosine of the one-to-one matching (Hungarian algorithm) "
            "that maximises the total cosine (NaN with hungarian=false)",
            "hist_counts": "histogram of the per-feature max cosine on [-1, 1] (hist_edges)",
            "raw": "SAE b's decoder directions as they are",
            "rotated": "SAE b's decoder directions multiplied by the fitted rotation (b -> a)",
            "matched_chance_raw / matched_chance_rotated": "matched chance (the chance level): "
            "the same metrics for two random dictionaries of the same shapes, rows drawn from "
            "N(0, C) with C each real dictionary's row second-moment matrix (unit rows, dead rows "
            "left out), b's rotated into a's frame for the rotated comparison, then "
            f"unit-normalised; mean over {self.chance_trials} trial(s), *_std their spread",
            "effective_dim_a / effective_dim_b": "participation ratio tr(C)^2 / tr(C^2) of each "
            "dictionary's row second moment (d for isotropic rows)",
            "n_trials": "random dictionary pairs behind a chance value",
            "isotropic_chance": "the same metrics for rows uniform on the sphere of all d "
            "dimensions: a LOWER BOUND, not chance (trained rows live in the activation span)",
            "n_a / n_b": "dictionary sizes",
            "ceiling": "SAE-seed ceiling: SAE a against a second SAE of the same model, site and "
            "data whose config differs only in shared_init_seed (config_id); how much two SAEs "
            "of one model agree",
            "position": "(rotated - matched_chance_rotated) / (ceiling - matched_chance_rotated): "
            "0 at matched chance, 1 at the SAE-seed ceiling; null unless the ceiling clears "
            "chance by the margin",
            "excess_over_matched_chance": "rotated minus matched_chance_rotated, per pair",
            "ceiling_minus_rotated": "ceiling minus rotated, per pair (pairs with a ceiling)",
            "per_site": "means over the pairs of each site (ceiling: seed a's, per pair); *_ci: "
            "interval over the pairs (none with one pair; pairs sharing the anchor are not "
            "independent, so it is indicative)",
            "relation_to_matched_chance / relation_to_ceiling": "above, at or below: the "
            "interval of the difference (or its value with one pair) lies more than margin above "
            "0, more than margin below, or neither",
            "margin": "the practical-equivalence margin of those relations (cosine units)",
            **INTERVAL_DEFINITION,
        }

    # -- outputs -------------------------------------------------------------------------

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for site, s in result["per_site"].items():
            for key in ("raw_mean_max_cos", "rotated_mean_max_cos",
                        "matched_chance_rotated_mean_max_cos", "ceiling_mean_max_cos",
                        "rotated_hungarian_mean_cos", "matched_chance_rotated_hungarian_mean_cos",
                        "ceiling_hungarian_mean_cos", "position_mean_max_cos"):
                if s.get(key) is not None:
                    out[f"{site}/{key}"] = float(s[key])
        return out

    def tables(self, result: dict):
        cols = ["seed_a", "seed_b", "site"] + [f"{k}_{m}" for k in KINDS for m in METRICS]
        rows = [[r["pair"][0], r["pair"][1], r["site"]]
                + [(r.get(k) or {}).get(m) for k in KINDS for m in METRICS]
                for r in result["rows"]]
        return {"universality": (cols, rows)}

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        if not getattr(self, "_hist", None):
            return []
        sites = [s for s in ctx.sites if s in result["per_site"]]
        fig, axes = plt.subplots(1, len(sites), figsize=(3.4 * len(sites), 3.1), squeeze=False)
        for ax, site in zip(axes[0], sites):
            for (a, b, s), (raw, rot) in self._hist.items():
                if s != site:
                    continue
                ax.hist(raw.numpy(), bins=40, range=(0, 1), alpha=0.5, color="#c92a2a",
                        label="raw")
                ax.hist(rot.numpy(), bins=40, range=(0, 1), alpha=0.5, color="#1c7ed6",
                        label="rotated")
                break  # first pair per site keeps the panel readable
            s = result["per_site"][site]
            for key, colour, label in (
                    ("matched_chance_rotated_mean_max_cos", "black", "matched chance"),
                    ("isotropic_chance_mean_max_cos", "#adb5bd", "isotropic (lower bound)"),
                    ("ceiling_mean_max_cos", "#2b8a3e", "SAE-seed ceiling")):
                if s.get(key) is not None:
                    ax.axvline(s[key], color=colour, ls="--", lw=1.2, label=label)
            ax.set_title(site.replace("blocks.", "").replace("hook_resid_", ""), fontsize=9)
            ax.set_xlabel("max cosine (per feature of SAE a)")
        axes[0][0].legend(fontsize=6)
        fig.suptitle("decoder universality: histogram of one pair, lines = means over pairs",
                     fontsize=9)
        return [save(fig, fig_dir / "universality_max_cosine.png")]

    def reading(self, site: str, s: dict) -> str:
        """One sentence per site, generated from the comparisons."""
        parts = []
        for metric, label in (("mean_max_cos", "max-cosine"), ("hungarian_mean_cos",
                                                               "Hungarian")):
            rot = s.get(f"rotated_{metric}")
            if rot is None:
                continue
            text = f"rotated {label} {fmt_ci(rot, s.get(f'rotated_{metric}_ci'))}"
            chance = s.get(f"matched_chance_rotated_{metric}")
            rel = s["relation_to_matched_chance"].get(metric)
            if chance is not None and rel:
                text += f": {rel} matched chance {fmt(chance)}"
            else:
                text += ": no matched chance (chance_trials=0)"
            ceiling = s.get(f"ceiling_{metric}")
            rel_c = s["relation_to_ceiling"].get(metric)
            if ceiling is not None and rel_c:
                text += f", {rel_c} the SAE-seed ceiling {fmt(ceiling)}"
                pos = s.get(f"position_{metric}")
                if pos is not None:
                    text += f" ({pos:.2f} of the way from chance to the ceiling)"
            else:
                text += ", no SAE-seed ceiling to compare with"
            parts.append(text)
        if not parts:
            return ""
        iso = s.get("isotropic_chance_mean_max_cos")
        return (f"`{site}`: " + "; ".join(parts)
                + (f" (isotropic lower bound of max-cosine {fmt(iso)})." if iso is not None
                   else "."))

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Decoder universality (`universality`)",
            "",
            "Mean max-cosine of SAE a's decoder directions over SAE b's, and the Hungarian "
            "one-to-one mean cosine: raw, with b rotated into a's frame, the matched chance of "
            "the rotated comparison (random dictionaries with each real dictionary's row "
            "covariance), the isotropic value (rows uniform on the sphere: a lower bound, not "
            "chance) and the SAE-seed ceiling (SAE a against a second SAE of the same model "
            "differing only in its init seed). Means over pairs, with intervals over the pairs "
            "where there are several; fraction above 0.5 in results.json.",
            "",
            "| site | max-cos raw | rotated | matched chance | isotropic | SAE-seed ceiling | "
            "Hungarian rotated | matched chance | ceiling |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for site, s in result["per_site"].items():
            cells = [fmt_ci(s.get("raw_mean_max_cos"), s.get("raw_mean_max_cos_ci")),
                     fmt_ci(s.get("rotated_mean_max_cos"), s.get("rotated_mean_max_cos_ci")),
                     fmt_ci(s.get("matched_chance_rotated_mean_max_cos"),
                            s.get("matched_chance_rotated_mean_max_cos_ci")),
                     fmt(s.get("isotropic_chance_mean_max_cos")),
                     fmt_ci(s.get("ceiling_mean_max_cos"), s.get("ceiling_mean_max_cos_ci")),
                     fmt_ci(s.get("rotated_hungarian_mean_cos"),
                            s.get("rotated_hungarian_mean_cos_ci")),
                     fmt_ci(s.get("matched_chance_rotated_hungarian_mean_cos"),
                            s.get("matched_chance_rotated_hungarian_mean_cos_ci")),
                     fmt_ci(s.get("ceiling_hungarian_mean_cos"),
                            s.get("ceiling_hungarian_mean_cos_ci"))]
            lines.append(f"| `{site}` | " + " | ".join(cells) + " |")
        readings = [self.reading(site, s) for site, s in result["per_site"].items()]
        lines += ["", f"Reading (margin {result['margin']:g}): "
                  + " ".join(r for r in readings if r)]
        if result.get("missing"):
            lines += ["", "**Missing:** " + "; ".join(result["missing"])]
        if result["skipped"]:
            lines += ["", "Skipped: " + "; ".join(result["skipped"])]
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)
