"""sparsity: does SAE transfer survive sparsity? Every SAE configuration in the runs, against L0.

Dense codes (ReLU+L1 at the published coefficient fires ~40-70% of the features on every token)
reconstruct almost anything in the activation span, so "the rotated SAE reconstructs the other
seed" may say little about features. This callback repeats the transfer and universality
measurements for *every* SAE configuration found in the runs (``saes/<site>/<config id>/``, e.g.
a ladder from ``train.py stage=sae sae_ladder=sparsity``) and sets them against each
configuration's sparsity.

Per (configuration, site), all on the scored batch (held out unless ``analysis.score_on=fit``):

* ``l0`` and ``dead_fraction`` of the anchor's SAE on the anchor's activations;
* self / naive / rotated / floor EV (both definitions), as in ``sae_transfer``, mean over pairs;
* firing overlap (``sae_transfer.firing_overlap``), raw and rotated;
* decoder universality (``align.universality.decoder_universality``: max-cosine mean,
  fraction > 0.5, Hungarian mean), raw and rotated, with the matched chance of the rotated
  comparison (random dictionaries with each real dictionary's row second moment,
  ``align.universality.matched_chance``), the isotropic value of random unit dictionaries of the
  same size (a lower bound, not chance), and the ``sae.init_seed`` setting (a shared init plus
  dead features inflates matches: a dead feature keeps its initial decoder row in every seed).

An SAE-seed ceiling configuration (``sae_ladder=ceiling``: the analysed config with another
``shared_init_seed``) is not a sparsity rung: ``universality`` reads it, this callback leaves it
out and notes it.

Configurations are analysed where every analysed seed has them; every missing
(seed, configuration, site) is listed in ``missing`` (which marks the analysis partial).
"""

from __future__ import annotations

import math
from pathlib import Path

from polymorph.align.metrics import EV_DEFINITIONS, explained_variance
from polymorph.align.universality import chance_level, decoder_universality, matched_chance
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.plots import COLOURS, plt, save
from polymorph.analysis.sae_transfer import (
    firing_overlap,
    sae_codes_and_reconstruction,
    standardised_codes,
)

KINDS = ("self", "naive", "rotated", "floor")
DEFINITIONS = ("ev_standard", "ev_published")
UNIV_KEYS = ("mean_max_cos", "frac_above_0_5", "hungarian_mean_cos")
MARKERS = {"relu_l1": "o", "topk": "s"}


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def discover(ctx) -> tuple[dict[str, list[str]], list[dict]]:
    """Per site, the SAE config ids every analysed seed has; and the missing (seed, id, site).

    A config counts as present for a seed if its folder holds an SAE (``cfg.json``).
    """
    found: dict[str, dict[int, set[str]]] = {}
    for site in ctx.sites:
        found[site] = {}
        for seed in ctx.seeds:
            folder = ctx.runs[seed].saes / site
            ids = set()
            if folder.is_dir():
                ids = {p.name for p in folder.iterdir() if (p / "cfg.json").is_file()}
            found[site][seed] = ids
    shared, missing = {}, []
    for site, per_seed in found.items():
        union = set().union(*per_seed.values())
        common = set.intersection(*per_seed.values()) if per_seed else set()
        shared[site] = sorted(common)
        for cid in sorted(union - common):
            for seed in ctx.seeds:
                if cid not in per_seed[seed]:
                    missing.append({"seed": seed, "config_id": cid, "site": site})
    return shared, missing


class Sparsity(AnalysisCallback):
    name = "sparsity"

    """Args:
        sites: sites to analyse (None: every analysis site).
        hungarian: also compute the one-to-one decoder matching (O(n^3) per pair).
        chance_trials: Monte-Carlo draws for the random-dictionary chance level.
        min_configs: sites with fewer shared SAE configurations have no sweep and are skipped.
        keep_fraction: rotated EV as a fraction of self EV (ev_standard) below which the
            reading calls transfer lost.
        usable_self_ev: an SAE whose self EV (ev_standard) is below this does not reconstruct
            its own seed, so its rotated/self ratio says nothing: the reading leaves it out.
        sparse_l0: families are compared on their configurations at or below this L0 only
            (dense codes transfer trivially).
    """

    def __init__(self, sites: list[str] | None = None, hungarian: bool = True,
                 chance_trials: int = 3, min_configs: int = 2, keep_fraction: float = 0.9,
                 usable_self_ev: float = 0.5, sparse_l0: float = 32) -> None:
        if not 0 < float(keep_fraction) <= 1:
            raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
        self.keep_fraction = float(keep_fraction)
        self.usable_self_ev = float(usable_self_ev)
        self.sparse_l0 = float(sparse_l0)
        self.sites = list(sites) if sites else None
        # A site with fewer shared configs than this has no sweep to show: sae_transfer and
        # universality already report its one config, so it is skipped (and says so) rather
        # than computed twice (~0.75 s per pair and site at d=64, x8).
        self.min_configs = int(min_configs)
        self.hungarian = bool(hungarian)
        self.chance_trials = int(chance_trials)

    # ------------------------------------------------------------------ compute

    def run(self, ctx) -> dict:
        from polymorph.sae.io import load_sae

        shared, missing = discover(ctx)
        sites = [s for s in ctx.sites if self.sites is None or s in self.sites]
        ceilings = self._ceiling_configs(ctx, shared, sites)
        notes = [f"{s}: {cid} differs from the analysed SAE config only in shared_init_seed "
                 "(the SAE-seed ceiling, read by universality): not a rung of the sweep"
                 for s, cids in ceilings.items() for cid in cids]
        shared = {s: [c for c in ids if c not in ceilings.get(s, ())]
                  for s, ids in shared.items()}
        missing = [m for m in missing if m["config_id"] not in ceilings.get(m["site"], ())]
        trained = {s: set(shared[s]) | {m["config_id"] for m in missing if m["site"] == s}
                   for s in sites}  # every config any seed has at the site
        too_few = [s for s in sites if len(trained[s]) < self.min_configs]
        notes += [
            f"{s}: {len(trained[s])} SAE configuration(s), fewer than min_configs="
            f"{self.min_configs}: no sweep to analyse (train a ladder with python "
            f"train.py -m seed=... stage=sae sae_ladder=sparsity)" for s in too_few
        ]
        sites = [s for s in sites if s not in too_few]
        work = [(cid, site) for site in sites for cid in shared[site]]
        floors: dict = {}
        chance: dict = {}
        configs, unreadable = [], []
        for cid, site in ctx.progress(work, desc="sparsity (config, site)"):
            try:
                saes = {s: self._sae(ctx, s, site, cid, load_sae) for s in ctx.seeds}
            except (FileNotFoundError, ValueError) as err:
                unreadable.append(f"{cid} at {site}: {err}")
                continue
            entry = self._config(ctx, cid, site, saes, floors)
            d, n = int(entry["d_in"]), int(entry["d_sae"])
            if (d, n) not in chance:
                chance[(d, n)] = chance_level(d, n, n, n_trials=max(1, self.chance_trials),
                                              hungarian=self.hungarian).to_dict()
            configs.append(entry)
        configs.sort(key=lambda e: (sites.index(e["site"]), e["l0"]))
        missing_text = [
            f"seed {m['seed']}: no SAE {m['config_id']} at {m['site']} (the other seeds have it; "
            "train it with the same sae / sae_ladder overrides)" for m in missing
        ] + [f"unreadable SAE {u}" for u in unreadable]
        return {
            "definitions": self._definitions(ctx),
            "sites": sites,
            "order": {s: [e["config_id"] for e in configs if e["site"] == s] for s in sites},
            "configs": configs,
            "chance": [{"d_in": d, "d_sae": n, **v} for (d, n), v in chance.items()],
            "missing_pairs": missing,
            "missing": missing_text,
            "notes": notes,
        }

    @staticmethod
    def _ceiling_configs(ctx, shared: dict, sites: list[str]) -> dict[str, list[str]]:
        """Per site, the shared config ids that equal the analysed config except for
        shared_init_seed (the anchor's polymorph.json tells)."""
        from polymorph.files import read_json

        out: dict[str, list[str]] = {}
        for site in sites:
            analysed = ctx.saes.get(ctx.anchor, {}).get(site)
            if analysed is None or not analysed.metadata.get("sae_config"):
                continue
            base = dict(analysed.metadata["sae_config"])
            for cid in shared[site]:
                meta = ctx.runs[ctx.anchor].sae_dir(site, cid) / "polymorph.json"
                try:
                    other = dict(read_json(meta).get("sae_config", {}))
                except (OSError, ValueError):
                    continue
                if other.get("shared_init_seed") != base.get("shared_init_seed") and {
                        **other, "shared_init_seed": base.get("shared_init_seed")} == base:
                    out.setdefault(site, []).append(cid)
        return out

    @staticmethod
    def _sae(ctx, seed: int, site: str, cid: str, load_sae):
        if cid == ctx.sae_config_id and site in ctx.saes.get(seed, {}):
            return ctx.saes[seed][site]  # already loaded by the context
        return load_sae(ctx.runs[seed].saes / site / cid)

    def _config(self, ctx, cid: str, site: str, saes: dict, floors: dict) -> dict:
        anchor_sae = saes[ctx.anchor]
        sae_cfg = anchor_sae.metadata.get("sae_config", {})
        modes = sorted({str(s.metadata.get("sae_config", {}).get("init_seed")) for s in saes.values()})
        init_ints = {s.metadata.get("init_seed") for s in saes.values()}
        own: dict = {}

        def own_codes(a: int) -> dict:
            if a not in own:
                codes_a, rec_a = sae_codes_and_reconstruction(saes[a].sae, ctx.scoring_acts(a, site))
                active = codes_a != 0
                own[a] = {
                    "std": standardised_codes(codes_a),
                    "rec": rec_a,
                    "l0": float(active.sum(1).double().mean()),
                    "dead": float((~active.any(0)).double().mean()),
                }
            return own[a]

        anchor_own = own_codes(ctx.anchor)
        pair_rows = []
        for a, b in ctx.pairs:
            sae = saes[a].sae
            x_a, x_b = ctx.scoring_acts(a, site), ctx.scoring_acts(b, site)
            own_codes(a)
            if (a, site) not in floors:
                floors[(a, site)] = explained_variance(
                    x_a.double().mean(0, keepdim=True).expand_as(x_a), x_a)
            rotation = ctx.rotation(a, b, site)
            x_b_in_a = rotation.apply(x_b).float()
            codes_naive, rec_naive = sae_codes_and_reconstruction(sae, x_b)
            codes_rot, rec_rot = sae_codes_and_reconstruction(sae, x_b_in_a)
            row: dict = {"pair": [a, b]}
            evs = {
                "self": explained_variance(own[a]["rec"], x_a),
                "naive": explained_variance(rec_naive, x_b),
                "rotated": explained_variance(rec_rot, x_b_in_a),
                "floor": floors[(a, site)],
            }
            for kind, values in evs.items():
                for definition in DEFINITIONS:
                    row[f"{kind}_{definition}"] = values[definition]
            row["firing_overlap_raw"] = firing_overlap(own[a]["std"], codes_naive)["mean_pearson"]
            row["firing_overlap_rotated"] = firing_overlap(own[a]["std"], codes_rot)["mean_pearson"]
            dec_a, dec_b = saes[a].sae.W_dec.detach(), saes[b].sae.W_dec.detach()
            for kind, rot in (("raw", None), ("rotated", rotation)):
                u = decoder_universality(dec_a, dec_b, rotation=rot, hungarian=self.hungarian)
                for key in UNIV_KEYS:
                    row[f"{key}_{kind}"] = getattr(u, key)
            if self.chance_trials:
                chance = matched_chance(dec_a, dec_b, rotation=rotation,
                                        n_trials=self.chance_trials, hungarian=self.hungarian)
                for key in UNIV_KEYS:
                    row[f"matched_chance_{key}_rotated"] = getattr(chance, key)
            pair_rows.append(row)
        entry: dict = {
            "config_id": cid,
            "site": site,
            "architecture": sae_cfg.get("architecture"),
            "expansion": sae_cfg.get("expansion"),
            "l1_coefficient": sae_cfg.get("l1_coefficient"),
            "k": sae_cfg.get("k"),
            "steps": sae_cfg.get("steps"),
            "d_in": int(anchor_sae.sae.cfg.d_in),
            "d_sae": int(anchor_sae.sae.cfg.d_sae),
            "init_seed_setting": modes[0] if len(modes) == 1 else modes,
            "init_seeds_identical": len(init_ints) == 1,
            "l0": anchor_own["l0"],
            "dead_fraction": anchor_own["dead"],
            "l0_train_mean": _mean(s.metrics.get("l0") for s in saes.values()),
        }
        keys = [k for k in pair_rows[0] if k != "pair"] if pair_rows else []
        for key in keys:
            entry[key] = _mean(r[key] for r in pair_rows)
        if pair_rows:
            entry["rotated_over_self"] = entry["rotated_ev_standard"] / entry["self_ev_standard"]
        entry["pairs"] = pair_rows
        return entry

    def _definitions(self, ctx) -> dict:
        return {
            **EV_DEFINITIONS,
            "configuration": "one SAE config id (saes/<site>/<config id>/), analysed per site where "
            "every analysed seed has it",
            "l0": "anchor's SAE on the anchor's scored activations: mean over rows of the number of "
            "non-zero features",
            "dead_fraction": "fraction of the anchor SAE's features that are zero on every row of the "
            f"anchor's {ctx.score_batch} batch (never fire on the scoring batch)",
            "l0_train_mean": "L0 in each seed's metrics.json (its SAE training activations), mean over "
            "seeds",
            "self": "SAE of seed a on seed a's own activations",
            "naive": "SAE of seed a on seed b's activations, unchanged",
            "rotated": "SAE of seed a on seed b's activations mapped into a's frame by the fitted "
            "rotation (EV computed in a's frame)",
            "floor": "predict the per-dimension mean of seed a's activations",
            "rotated_over_self": "rotated_ev_standard / self_ev_standard (pair means)",
            "firing_overlap_raw / _rotated": "mean over features of the Pearson correlation (over rows) "
            "of SAE a's activation on a versus on b (raw / rotated); features constant on either side "
            "excluded",
            "mean_max_cos / frac_above_0_5 / hungarian_mean_cos": "decoder universality of SAE a "
            "against SAE b (polymorph.align.universality): mean max cosine, fraction > 0.5, "
            "one-to-one Hungarian mean cosine; _rotated: b's decoder rotated into a's frame first",
            "matched_chance": "matched chance of the rotated comparison: the same universality "
            "numbers for random dictionaries of the same shapes whose rows are drawn from each real "
            "dictionary's row second-moment matrix (b's rotated into a's frame), "
            "align.universality.matched_chance, mean over chance_trials",
            "chance": "ISOTROPIC random unit dictionaries of the same size (rows uniform on the "
            "sphere, Monte Carlo): a lower bound, not chance (trained rows live in the activation "
            "span); kind says so",
            "d_sae_a / d_sae_b / n_trials / effective_dim_a / effective_dim_b": "sizes, trials and "
            "participation ratios of the chance dictionaries",
            "init_seed_setting": "the sae.init_seed mode the SAEs were trained with; shared + dead "
            "features inflates decoder matches (a dead feature keeps its initial row in every seed)",
            "pairs": "per-pair values; the configuration's numbers are means over pairs",
            "order": "per site, configuration ids from the sparsest (lowest l0) to the densest",
            "scored_on": f"the {ctx.score_batch} batch",
        }

    # ------------------------------------------------------------------ output

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        sites = [s for s in result["sites"] if any(e["site"] == s for e in result["configs"])]
        if not sites:
            return []
        fig, axes = plt.subplots(len(sites), 3, figsize=(14, 3.3 * len(sites)), squeeze=False)
        for row_axes, site in zip(axes, sites):
            entries = [e for e in result["configs"] if e["site"] == site]
            ax_ev, ax_match, ax_dead = row_axes
            for arch in sorted({e["architecture"] for e in entries}):
                fam = sorted((e for e in entries if e["architecture"] == arch), key=lambda e: e["l0"])
                l0s = [max(e["l0"], 1e-2) for e in fam]
                m = MARKERS.get(arch, "^")
                for kind in KINDS:
                    ax_ev.plot(l0s, [e[f"{kind}_ev_standard"] for e in fam], marker=m, ms=5,
                               color=COLOURS[kind if kind != "self" else "ceiling"],
                               label=f"{kind} ({arch})", ls="-" if arch == "relu_l1" else "--")
                for key, colour, label in (
                    ("firing_overlap_rotated", "#1c7ed6", "firing overlap rot"),
                    ("firing_overlap_raw", "#c92a2a", "firing overlap raw"),
                    ("hungarian_mean_cos_rotated", "#7048e8", "Hungarian rot"),
                    ("hungarian_mean_cos_raw", "#e599f7", "Hungarian raw"),
                    ("mean_max_cos_rotated", "#f08c00", "max-cos rot"),
                ):
                    ax_match.plot(l0s, [e[key] for e in fam], marker=m, ms=5, color=colour,
                                  label=f"{label} ({arch})", ls="-" if arch == "relu_l1" else "--")
                ax_dead.plot(l0s, [e["dead_fraction"] for e in fam], marker=m, ms=5,
                             color="#495057", label=arch, ls="-" if arch == "relu_l1" else "--")
            for c in result["chance"][:1]:
                ax_match.axhline(c["hungarian_mean_cos"], color="#adb5bd", ls=":", lw=1,
                                 label="Hungarian, isotropic lower bound")
            for arch in sorted({e["architecture"] for e in entries}):
                fam = sorted((e for e in entries if e["architecture"] == arch),
                             key=lambda e: e["l0"])
                if all(e.get("matched_chance_hungarian_mean_cos_rotated") is not None
                       for e in fam):
                    ax_match.plot([max(e["l0"], 1e-2) for e in fam],
                                  [e["matched_chance_hungarian_mean_cos_rotated"] for e in fam],
                                  color="#7048e8", ls=":", lw=1,
                                  label=f"Hungarian rot, matched chance ({arch})")
            init = sorted({str(e["init_seed_setting"]) for e in entries})
            short = site.replace("blocks.", "").replace("hook_resid_", "")
            for ax, title, ylabel in (
                (ax_ev, f"{short}: EV vs L0, mean over pairs (solid/o: relu_l1, dashed/s: topk)",
                 f"EV (ev_standard, {ctx.score_batch})"),
                (ax_match, f"{short}: overlap / universality vs L0", "correlation / cosine"),
                (ax_dead, f"{short}: dead features vs L0 (sae.init_seed: {', '.join(init)})",
                 "dead fraction"),
            ):
                ax.set_xscale("log")
                ax.set_xlabel("L0 (anchor, log)")
                ax.set_ylabel(ylabel)
                ax.set_title(title, fontsize=9)
            lo = min(e[f"{k}_ev_standard"] for e in entries for k in KINDS)
            ax_ev.set_ylim(max(lo - 0.05, -1.0), 1.02)
            ax_dead.set_ylim(-0.02, 1.02)
        n_fams = [len({e["architecture"] for e in result["configs"] if e["site"] == s}) for s in sites]
        for ax in axes[n_fams.index(max(n_fams))]:  # legend where every family appears
            ax.legend(fontsize=6)
        return [save(fig, fig_dir / "sparsity.png")]

    def reading(self, result: dict) -> str:
        """One paragraph generated from the numbers."""
        parts = []
        unusable = [e for e in result["configs"] if not e["self_ev_standard"] >= self.usable_self_ev]
        if unusable:
            parts.append(
                f"{len(unusable)} configuration-site(s) reconstruct their own seed with self EV < "
                f"{self.usable_self_ev:g} ("
                + ", ".join(f"{e['config_id']} at `{e['site']}`: L0 {e['l0']:.1f}, self EV "
                            f"{e['self_ev_standard']:.3f}" for e in unusable)
                + "): they are not working SAEs, so the reading below leaves them out."
            )
        usable = [e for e in result["configs"] if e not in unusable]
        for site in result["sites"]:
            entries = [e for e in usable if e["site"] == site]
            if not entries:
                continue
            lost = [e for e in entries if e.get("rotated_over_self", 1.0) < self.keep_fraction]
            worst = min(entries, key=lambda e: e.get("rotated_over_self", 1.0))
            sparse = entries[0]
            text = (
                f"At `{site}`, {len(entries)} configuration(s) span L0 {entries[0]['l0']:.1f} to "
                f"{entries[-1]['l0']:.1f}; rotated EV / self EV is {worst['rotated_over_self']:.3f} "
                f"at worst ({worst['config_id']}, L0 {worst['l0']:.1f}) and "
                f"{sparse['rotated_over_self']:.3f} for the sparsest; "
            )
            if lost:
                text += (
                    f"it falls below {self.keep_fraction:g} for {len(lost)} configuration(s) "
                    f"(L0 <= {max(e['l0'] for e in lost):.1f}). "
                )
            else:
                text += f"it stays above {self.keep_fraction:g} for every configuration. "
            text += (
                f"Rotated firing overlap goes from {sparse['firing_overlap_rotated']:.3f} (sparsest) "
                f"to {entries[-1]['firing_overlap_rotated']:.3f} (densest); Hungarian decoder match "
                f"(rotated) from {sparse['hungarian_mean_cos_rotated']:.3f} to "
                f"{entries[-1]['hungarian_mean_cos_rotated']:.3f}."
            )
            parts.append(text)
        fams = {}
        for e in usable:
            if e["l0"] <= self.sparse_l0:
                fams.setdefault(e["architecture"], []).append(e)
        if fams:
            means = {a: _mean(e.get("rotated_over_self") for e in es) for a, es in fams.items()}
            best = max(means, key=means.get)
            parts.append(
                f"Among working configurations with L0 <= {self.sparse_l0}, mean rotated/self EV by "
                "family: "
                + ", ".join(f"{a} {v:.3f} ({len(fams[a])} config-sites)" for a, v in means.items())
                + (f"; {best} keeps transfer best on this measure." if len(fams) > 1 else
                   "; no other family has a working configuration that sparse.")
            )
        raw_beats = [e for e in result["configs"]
                     if e["hungarian_mean_cos_raw"] > e["hungarian_mean_cos_rotated"]]
        if raw_beats:
            shared = [e for e in raw_beats if e["init_seeds_identical"]]
            parts.append(
                f"In {len(raw_beats)} of {len(result['configs'])} configuration-sites the raw "
                "(unrotated) decoders match better one-to-one than the rotated ones, so something "
                "other than the fitted rotation makes those dictionaries alike"
                + (f"; {len(shared)} of them share one SAE init seed across models, the likely "
                   "cause." if shared else ".")
            )
        inflated = [e for e in result["configs"]
                    if e["init_seeds_identical"] and e["dead_fraction"] > 0.05]
        if inflated:
            parts.append(
                f"Caution: {len(inflated)} configuration-site(s) share one SAE init seed across "
                "models and have > 5% dead features, so part of their decoder match is the shared "
                "initialisation, not learned features."
            )
        return " ".join(parts)

    def report(self, ctx, result: dict, figures) -> str:
        lines = [
            "## Transfer against sparsity (`sparsity`)",
            "",
            f"Every SAE configuration the analysed seeds share, per site, sparsest first. L0 and dead "
            f"fraction: the anchor's SAE on its {ctx.score_batch} batch. EV = ev_standard, mean over "
            f"{len(ctx.pairs)} pair(s); overlap and decoder matches rotated into the anchor's frame "
            "(raw in results.json).",
            "",
            "| site | config | init | L0 | dead | self | naive | rotated | floor | rot/self "
            "| overlap rot | max-cos rot | Hungarian rot |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in result["configs"]:
            lines.append(
                f"| `{e['site']}` | `{e['config_id']}` | {e['init_seed_setting']} | {e['l0']:.1f} "
                f"| {e['dead_fraction']:.3f} | "
                + " | ".join(f"{e[f'{k}_ev_standard']:.3f}" for k in KINDS)
                + f" | {e.get('rotated_over_self', float('nan')):.3f}"
                f" | {e['firing_overlap_rotated']:.3f} | {e['mean_max_cos_rotated']:.3f}"
                f" | {e['hungarian_mean_cos_rotated']:.3f} |"
            )
        for c in result["chance"]:
            lines += ["", f"Isotropic random unit dictionaries (d={c['d_in']}, {c['d_sae']} "
                      f"features; a lower bound, not chance): max-cos {c['mean_max_cos']:.3f}, "
                      f"Hungarian {c['hungarian_mean_cos']:.3f}. Matched chance of each "
                      "configuration's rotated comparison (random dictionaries with the real "
                      "decoders' row covariance): "
                      + ", ".join(f"{e['config_id']} at `{e['site']}` max-cos "
                                  f"{e['matched_chance_mean_max_cos_rotated']:.3f} / Hungarian "
                                  f"{e['matched_chance_hungarian_mean_cos_rotated']:.3f}"
                                  for e in result["configs"]
                                  if e.get("matched_chance_mean_max_cos_rotated") is not None)
                      + "."]
        if result["configs"]:
            lines += ["", self.reading(result)]
        lines += [f"- {n}" for n in result.get("notes", [])]
        if result["missing"]:
            lines += ["", "Missing (seed, configuration, site), not analysed: "
                      + "; ".join(result["missing"])]
        lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
        return "\n".join(lines)

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for e in result["configs"]:
            key = f"{e['site']}/{e['config_id']}"
            for name in ("l0", "dead_fraction", "self_ev_standard", "naive_ev_standard",
                         "rotated_ev_standard", "firing_overlap_rotated",
                         "hungarian_mean_cos_rotated", "mean_max_cos_rotated"):
                out[f"{key}/{name}"] = e[name]
        return out

    def tables(self, result: dict):
        cols = ["site", "config_id", "architecture", "init_seed", "l0", "dead_fraction"] + [
            f"{k}_{d}" for k in KINDS for d in DEFINITIONS
        ] + [f"firing_overlap_{k}" for k in ("raw", "rotated")] + [
            f"{u}_{k}" for u in UNIV_KEYS for k in ("raw", "rotated")
        ]
        rows = [
            [e["site"], e["config_id"], e["architecture"], str(e["init_seed_setting"]), e["l0"],
             e["dead_fraction"]] + [e[c] for c in cols[6:]]
            for e in result["configs"]
        ]
        return {"sparsity": (cols, rows)}
