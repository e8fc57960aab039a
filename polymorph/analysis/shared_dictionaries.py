"""shared_dictionaries: rotate-and-transfer against dictionaries trained for every seed at once.

polymorph's answer to "reuse one seed's features in another" is one Procrustes fit per pair and
the anchor's SAE. Two other answers train one dictionary for all seeds: a *universal SAE* on
every seed's activations mapped into one consensus frame (generalised Procrustes), and a
*crosscoder* (per-seed encoders and decoders around one shared code). This callback puts the
four side by side at each site, on the same models, the same held-out rows and at matched L0:

* ``own``: each seed's own SAE on its own activations (the per-seed ceiling);
* ``rotated``: the anchor's SAE on each other seed, through the rotation fitted on the fit batch
  (rotate-and-transfer; on the anchor it would be its own SAE, so the anchor is left out);
* ``universal``: the universal SAE on each seed mapped into the consensus frame by the maps the
  shared stage saved (fitted on a separate fit batch);
* ``crosscoder``: the crosscoder's code of every seed's row, decoded for each seed.

Every reconstruction is mapped back into seed s's own frame and scored against seed s's
activations on the scored batch (held out unless ``analysis.score_on=fit``), so every method is
scored on the same matrix: x_hat_s = R^-1(SAE_a(R x_s)) for rotated (the SAE rewritten with
``align.transfer.transfer_sae``, which is exact), M_s^-1(U(M_s x_s)) for universal. Because
every method's reconstruction of seed s is a matrix of seed s's rows in seed s's frame, the
*fraction of loss recovered* (``loss_recovered``) splices those rows back into seed s's model
at the kept positions (``analysis.downstream.spliced_loss_sums``), against a mean ablation.

Each method is a ladder of sparsities (at least ``min_rungs``). At each target L0 (default: the
own-seed ladder's L0s) every method is read by interpolating each seed's EV-vs-L0 curve linearly
in log L0 (``align.ladders.interpolate_at_l0``, no extrapolation), then averaged over the
method's seeds. EV intervals are a percentile bootstrap over sequences (one set of resamples
shared by every method, rung and seed, so differences are paired; L0 is held at its point
value); dead fractions and agreement are point values. Agreement across seeds: firing overlap
(per-feature Pearson correlation of the same dictionary's code on the anchor's rows and on seed
s's corresponding rows) for rotated and universal; for the crosscoder, whose code is shared by
construction, how evenly each latent's decoder norm is spread over the seeds.

Absent shared dictionaries never fail an analysis: with none trained for the experiment the
entry says so (``trained: false``) with the commands that train them; with some trained, every
missing piece is listed under ``missing`` (the analysis is then partial).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from polymorph.align.ladders import (
    FiringMoments,
    decoder_evenness,
    interpolate_at_l0,
    largest_share,
)
from polymorph.align.metrics import EV_DEFINITIONS
from polymorph.align.statistics import EVSums, bootstrap_ci, bootstrap_weights, ev_from_sums
from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.shared_ladders import METHODS, Ladder, find_ladders
from polymorph.sae.shared_eval import crosscoder_chunks, sae_chunks
from polymorph.sae.shared_layout import SharedLayout

DEFINITIONS = ("ev_standard", "ev_published")
LABELS = {"own": "own-seed SAE", "rotated": "anchor's SAE rotated", "universal": "universal SAE",
          "crosscoder": "crosscoder"}
#: (a, b) pairs whose EV difference a - b is reported at every matched L0
CONTRASTS = (("rotated", "own"), ("universal", "own"), ("crosscoder", "own"),
             ("rotated", "universal"), ("rotated", "crosscoder"), ("universal", "crosscoder"))
COMMANDS = {
    "own": "python train.py -m seed=<seeds> stage=sae sae_ladder=topk name={name} (plus the "
           "experiment's overrides)",
    "universal": "python train.py stage=shared shared=universal sae_ladder=topk name={name} "
                 "(the ladder the per-seed SAEs were trained with)",
    "crosscoder": "python train.py stage=shared shared=crosscoder name={name}",
}
COMMANDS["rotated"] = COMMANDS["own"]


class SharedDictionaries(AnalysisCallback):
    """Args:
        sites: sites to compare (None: every analysis site).
        min_rungs: a method with fewer rungs at a site is left out there (and listed as
            missing): matched L0 needs a ladder to interpolate along.
        l0_targets: L0s to compare at (None: the own-seed ladder's mean L0 per rung, else the
            universal's, else the crosscoder's).
        l0_tolerance: a target this relative distance outside a ladder's L0 range still reads
            the end rung (TopK at k = 32 measures L0 31.97); further out the method is absent.
        n_boot, level, boot_seed: the sequence bootstrap of the EV intervals.
        tie_margin: EV (ev_standard) differences smaller than this count as a tie in the
            reading.
        seed_specific_share: a crosscoder latent whose largest seed share of its decoder norm
            exceeds this counts as seed-specific.
        sae_architecture, crosscoder_architecture: compare the ladders of this architecture
            (None: the family with most rungs).
        eval_batch: the analysis' eval batch spec (``${analysis.eval_batch}``), to check that
            a shared dictionary's rows are disjoint from the rows scored.
        batch_size: rows per encode (bounds the memory of a code matrix).
    """

    name = "shared_dictionaries"

    def __init__(self, sites: list[str] | None = None, min_rungs: int = 3,
                 l0_targets: list[float] | None = None, l0_tolerance: float = 0.05,
                 n_boot: int = 1000, level: float = 0.95, boot_seed: int = 0,
                 tie_margin: float = 0.01, seed_specific_share: float = 0.9,
                 sae_architecture: str | None = None,
                 crosscoder_architecture: str | None = None, eval_batch=None,
                 batch_size: int = 4096, downstream_sequences: int | None = 64) -> None:
        if int(min_rungs) < 1:
            raise ValueError(f"min_rungs={min_rungs} must be >= 1")
        if l0_targets is not None and (not list(l0_targets)
                                       or any(float(t) <= 0 for t in l0_targets)):
            raise ValueError(f"l0_targets={l0_targets} must be null or a list of L0s > 0")
        if not 0 < float(seed_specific_share) <= 1:
            raise ValueError(f"seed_specific_share={seed_specific_share} must be in (0, 1]")
        self.sites = list(sites) if sites else None
        self.min_rungs = int(min_rungs)
        self.l0_targets = None if l0_targets is None else sorted(float(t) for t in l0_targets)
        self.l0_tolerance = float(l0_tolerance)
        self.n_boot, self.level, self.boot_seed = int(n_boot), float(level), int(boot_seed)
        self.tie_margin = float(tie_margin)
        self.seed_specific_share = float(seed_specific_share)
        self.sae_architecture = sae_architecture
        self.crosscoder_architecture = crosscoder_architecture
        self.eval_batch = eval_batch
        self.batch_size = int(batch_size)
        if downstream_sequences is not None and int(downstream_sequences) < 1:
            raise ValueError(f"downstream_sequences={downstream_sequences} must be null (no "
                             "spliced-in loss) or >= 1")
        self.downstream_sequences = (None if downstream_sequences is None
                                     else int(downstream_sequences))
        self._baselines: dict = {}

    # ------------------------------------------------------------------ run

    def run(self, ctx) -> dict:
        layout = SharedLayout.for_experiment(ctx.experiment_dir)
        sites = [s for s in ctx.sites if self.sites is None or s in self.sites]
        commands = {m: c.format(name=ctx.experiment) for m, c in COMMANDS.items()}
        out = {"definitions": self._definitions(ctx), "config": self._config(),
               "trained": layout.any_trained(), "sites": {}, "missing": [], "notes": [],
               "commands": commands}
        if not out["trained"]:
            out["notes"].append(
                f"no shared dictionaries are trained for experiment {ctx.experiment} "
                f"({layout.root} has none): train a universal SAE with `{commands['universal']}` "
                f"and a crosscoder with `{commands['crosscoder']}`, beside the per-seed ladder "
                f"(`{commands['own']}`), then rerun the analysis")
            out["partial"] = True
            return out
        scored_spec = self.eval_batch if ctx.score_batch == "eval" else None
        if ctx.score_batch != "eval":
            out["notes"].append("analysis.score_on=fit: the shared dictionaries' rows are not "
                                "checked against the scored batch")
        for site in ctx.progress(sites, desc="shared_dictionaries (site)"):
            ladders, missing, notes = find_ladders(
                ctx, site, layout, scored_spec=scored_spec, scored_name=f"the {ctx.score_batch} "
                "batch (analysis)", sae_architecture=self.sae_architecture,
                crosscoder_architecture=self.crosscoder_architecture)
            out["notes"] += notes
            out["missing"] += missing
            ladders = self._enough(ctx, site, ladders, out["missing"], commands)
            out["sites"][site] = self._site(ctx, site, ladders)
        out["partial"] = bool(out["missing"]) or any(
            e["status"] != "compared" for e in out["sites"].values())
        return out

    def _enough(self, ctx, site: str, ladders: dict[str, Ladder], missing: list[str],
                commands: dict) -> dict[str, Ladder]:
        """The ladders with at least ``min_rungs`` rungs; each absent or short one is listed."""
        kept = {}
        for method in METHODS:
            ladder = ladders.get(method)
            n = 0 if ladder is None else ladder.n_rungs
            if n >= self.min_rungs:
                kept[method] = ladder
            elif method != "rotated":  # rotated reads the own ladder: its note covers both
                what = "no" if n == 0 else f"only {n}"
                also = " (and so no rotated one)" if method == "own" else ""
                missing.append(f"{site}: {what} {LABELS[method]} rung(s){also} for seeds "
                               f"{ctx.seeds} "
                               f"(min_rungs={self.min_rungs}); train them with "
                               f"{commands[method]}")
        return kept

    # ------------------------------------------------------------------ one site

    def _site(self, ctx, site: str, ladders: dict[str, Ladder]) -> dict:
        if not ladders:
            return {"status": "not compared", "methods": {}, "matched": [], "reading": ""}
        groups = ctx.batches[ctx.score_batch].row_sequences()
        n_seq = int(torch.unique(groups).numel())
        weights = bootstrap_weights(n_seq, self.n_boot, self.boot_seed)
        scores = {m: self._score(ctx, site, ladder, groups, weights)
                  for m, ladder in ladders.items()}
        targets = self._targets(scores)
        matched = [self._matched_point(ctx, scores, t) for t in targets]
        entry = {
            "status": "compared" if len(ladders) == len(METHODS) else "partial",
            "methods": {m: self._ladder_entry(ladders[m], scores[m]) for m in ladders},
            "l0_targets": targets,
            "matched": matched,
        }
        entry["reading"] = self.reading(site, entry)
        return entry

    # ------------------------------------------------------------------ scoring

    def _score(self, ctx, site: str, ladder: Ladder, groups, weights) -> list[dict]:
        """Per rung: per seed its L0, dead fraction, EV (point and bootstrap replicates) and,
        for rotated / universal, firing overlap with the anchor."""
        out = []
        for rung in ladder.rungs:
            if ladder.method == "crosscoder":
                per_seed, extra = self._score_crosscoder(ctx, site, rung, groups)
            else:
                readers = self._readers(ctx, site, ladder, rung)
                ref = None  # the same dictionary read on the anchor's rows, for firing overlap
                if ladder.method == "universal":
                    ref = (readers[ctx.anchor], ctx.scoring_acts(ctx.anchor, site))
                elif ladder.method == "rotated":
                    from polymorph.sae.io import load_sae

                    ref = (load_sae(rung.folders[ctx.anchor]).sae,
                           ctx.scoring_acts(ctx.anchor, site))
                seeds = [s for s in ctx.seeds if s in readers
                         and not (ladder.method == "rotated" and s == ctx.anchor)]
                per_seed = {s: self._score_reader(readers[s], ctx.scoring_acts(s, site),
                                                  groups, ref if s != ctx.anchor else None)
                            for s in seeds}
                extra = {}
            for seed, score in per_seed.items():
                recon = score.pop("recon", None)
                if recon is not None and self.downstream_sequences is not None:
                    score["loss_recovered"] = self._recovered(ctx, site, seed, recon)
            for score in per_seed.values():
                sums = score.pop("sums")
                score["ev"] = {k: float(v) for k, v in ev_from_sums(sums).items()}
                score["reps"] = ev_from_sums(sums, weights)
            out.append({"rung": rung, "seeds": per_seed, **extra})
        return out

    def _readers(self, ctx, site: str, ladder: Ladder, rung) -> dict:
        """Per seed an sae-lens SAE that reads seed s's own frame directly."""
        from polymorph.align.transfer import transfer_sae
        from polymorph.sae.io import load_sae
        from polymorph.sae.shared_io import load_consensus
        from polymorph.sae.shared_layout import CONSENSUS_FILE

        if ladder.method == "own":
            return {s: load_sae(rung.folders[s]).sae for s in ctx.seeds}
        if ladder.method == "rotated":
            anchor = load_sae(rung.folders[ctx.anchor]).sae
            return {s: transfer_sae(anchor, ctx.to_frame_of(ctx.anchor, s, site))
                    for s in ctx.seeds if s != ctx.anchor}
        universal = load_sae(rung.folders[-1]).sae
        maps = load_consensus(ladder.cohort_dir / CONSENSUS_FILE).maps
        return {s: transfer_sae(universal, maps[s]) for s in ctx.seeds if s in maps}

    def _score_reader(self, reader, x: torch.Tensor, groups, reference) -> dict:
        x_hat = torch.empty(x.shape, dtype=torch.float32)
        fires = torch.zeros(reader.cfg.d_sae, dtype=torch.float64)
        active = 0.0
        moments = FiringMoments.zeros(reader.cfg.d_sae) if reference is not None else None
        for start, codes, rec in sae_chunks(reader, x, self.batch_size):
            stop = start + codes.shape[0]
            x_hat[start:stop] = rec
            on = codes != 0
            fires += on.sum(0, dtype=torch.float64)
            active += float(on.sum())
            if moments is not None:
                ref_reader, x_ref = reference
                with torch.no_grad():
                    ref_codes = ref_reader.encode(x_ref[start:stop].to(ref_reader.dtype))
                moments.update(ref_codes.float(), codes)
        score = {"l0": active / x.shape[0], "dead_fraction": float((fires == 0).double().mean()),
                 "sums": EVSums.from_rows(x_hat, x, groups), "recon": x_hat}
        if moments is not None:
            score["firing_overlap"], score["n_features_compared"] = moments.mean_correlation()
        return score

    def _score_crosscoder(self, ctx, site: str, rung, groups) -> tuple[dict, dict]:
        from polymorph.sae.crosscoder_io import load_crosscoder

        saved = load_crosscoder(rung.folders[-1])
        cc = saved.crosscoder
        order = [int(s) for s in saved.metadata.get("seeds", [])]
        xs = [ctx.scoring_acts(s, site) for s in order]
        x_hats = [torch.empty(x.shape, dtype=torch.float32) for x in xs]
        fires = torch.zeros(cc.cfg.d_latent, dtype=torch.float64)
        active = 0.0
        for start, codes, rec in crosscoder_chunks(cc, xs, self.batch_size):
            for i, x_hat in enumerate(x_hats):
                x_hat[start:start + codes.shape[0]] = rec[:, i]
            on = codes != 0
            fires += on.sum(0, dtype=torch.float64)
            active += float(on.sum())
        n = xs[0].shape[0]
        l0, dead = active / n, float((fires == 0).double().mean())
        per_seed = {s: {"l0": l0, "dead_fraction": dead,
                        "sums": EVSums.from_rows(x_hats[i], xs[i], groups), "recon": x_hats[i]}
                    for i, s in enumerate(order)}
        live = fires > 0
        norms = cc.decoder_norms()
        extra = {
            "decoder_evenness": float(decoder_evenness(norms)[live].mean()) if live.any()
            else float("nan"),
            "seed_specific_fraction": float((largest_share(norms)[live]
                                             > self.seed_specific_share).double().mean())
            if live.any() else float("nan"),
        }
        return per_seed, extra

    def _recovered(self, ctx, site: str, seed: int, recon: torch.Tensor) -> float:
        """Fraction of loss recovered with ``recon`` (seed's scored rows as a dictionary
        reconstructs them) spliced in at ``site``, on the first ``downstream_sequences`` scored
        sequences: (L_abl - L_sae) / (L_abl - L_clean), L summed over the readout's heads, the
        ablation replacing the site by the seed's mean activation."""
        from polymorph.analysis.downstream import spliced_loss_sums

        batch = ctx.batches[ctx.score_batch].head(self.downstream_sequences)
        model = ctx.models[seed]
        key = (seed, site)
        if key not in self._baselines:
            mean = ctx.scoring_acts(seed, site).double().mean(0).float()
            abl = spliced_loss_sums(ctx, model, site, lambda x: mean.expand_as(x).clone(), batch)
            self._baselines[key] = (
                sum(float(v["ce_clean"].sum()) for v in abl.values()),
                sum(float(v["ce"].sum()) for v in abl.values()))
        clean, ablated = self._baselines[key]
        sae = spliced_loss_sums(ctx, model, site, _RowsInOrder(recon[: batch.n_rows]), batch)
        spliced = sum(float(v["ce"].sum()) for v in sae.values())
        gap = ablated - clean
        return (ablated - spliced) / gap if gap > 1e-9 * max(abs(ablated), 1.0) else float("nan")

    def reconstruction(self, ctx, site: str, ladder: Ladder, rung, seed: int) -> torch.Tensor:
        """Seed ``seed``'s scored rows as ``ladder``'s rung reconstructs them, in seed's own
        frame [n_rows, d]: what a downstream-loss splice puts back at the kept positions."""
        x = ctx.scoring_acts(seed, site)
        if ladder.method == "crosscoder":
            from polymorph.sae.crosscoder_io import load_crosscoder

            saved = load_crosscoder(rung.folders[-1])
            order = [int(s) for s in saved.metadata.get("seeds", [])]
            xs = [ctx.scoring_acts(s, site) for s in order]
            parts = [rec[:, order.index(seed)]
                     for _, _, rec in crosscoder_chunks(saved.crosscoder, xs, self.batch_size)]
            return torch.cat(parts)
        reader = self._readers(ctx, site, ladder, rung)[seed]
        return torch.cat([rec for _, _, rec in sae_chunks(reader, x, self.batch_size)])

    # ------------------------------------------------------------------ matched L0

    def _targets(self, scores: dict) -> list[float]:
        if self.l0_targets is not None:
            return list(self.l0_targets)
        for method in ("own", "universal", "crosscoder", "rotated"):
            if method in scores:
                l0s = [_mean(v["l0"] for v in r["seeds"].values()) for r in scores[method]]
                return sorted(float(v) for v in l0s if v > 0)
        return []

    def _curves(self, rungs: list[dict], seed: int, targets: torch.Tensor) -> dict | None:
        """One seed's values at ``targets`` along one method's ladder (None: no usable rung)."""
        usable = [r for r in rungs if seed in r["seeds"] and r["seeds"][seed]["l0"] > 0]
        if not usable:
            return None
        l0 = torch.tensor([r["seeds"][seed]["l0"] for r in usable], dtype=torch.float64)

        def along(values):
            return interpolate_at_l0(l0, values, targets, self.l0_tolerance)

        out = {}
        for definition in DEFINITIONS:
            out[definition] = along(torch.tensor([r["seeds"][seed]["ev"][definition]
                                                  for r in usable]))
            out[f"{definition}_reps"] = along(torch.stack([r["seeds"][seed]["reps"][definition]
                                                           for r in usable], dim=-1))
        out["dead_fraction"] = along(torch.tensor([r["seeds"][seed]["dead_fraction"]
                                                   for r in usable]))
        for key in ("firing_overlap", "loss_recovered"):
            if key in usable[0]["seeds"][seed]:
                out[key] = along(torch.tensor([_nan(r["seeds"][seed].get(key))
                                               for r in usable]))
        for key in ("decoder_evenness", "seed_specific_fraction"):
            if key in usable[0]:
                out[key] = along(torch.tensor([_nan(r[key]) for r in usable]))
        return out

    def _matched_point(self, ctx, scores: dict, target: float) -> dict:
        t = torch.tensor([target], dtype=torch.float64)
        curves = {m: {s: self._curves(rungs, s, t) for s in ctx.seeds}
                  for m, rungs in scores.items()}
        curves = {m: {s: c for s, c in per.items() if c is not None} for m, per in curves.items()}
        point: dict = {"l0": target, "methods": {}, "differences": {}}
        for method, per_seed in curves.items():
            value = self._method_at(per_seed)
            if value is not None:
                point["methods"][method] = value
        for a, b in CONTRASTS:
            if a in point["methods"] and b in point["methods"]:
                diff = self._difference(curves[a], curves[b])
                if diff is not None:
                    point["differences"][f"{a}_minus_{b}"] = diff
        ranked = sorted(point["methods"], key=lambda m: -point["methods"][m]["ev_standard"]
                        ["point"])
        if ranked:
            best = point["methods"][ranked[0]]["ev_standard"]["point"]
            point["best"] = [m for m in ranked if best - point["methods"][m]["ev_standard"]
                             ["point"] < self.tie_margin]
        return point

    def _method_at(self, per_seed: dict) -> dict | None:
        """The mean over the method's seeds at one target; None if any seed is out of range."""
        if not per_seed:
            return None
        out: dict = {"seeds": sorted(per_seed)}
        for definition in DEFINITIONS:
            points = torch.stack([c[definition][0] for c in per_seed.values()])
            reps = torch.stack([c[f"{definition}_reps"][:, 0] for c in per_seed.values()])
            if not torch.isfinite(points).all():
                return None
            out[definition] = bootstrap_ci(reps.mean(0), float(points.mean()),
                                           self.level).to_dict()
        for key in ("dead_fraction", "firing_overlap", "decoder_evenness",
                    "seed_specific_fraction", "loss_recovered"):
            vals = [float(c[key][0]) for c in per_seed.values() if key in c]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                out[key] = sum(vals) / len(vals)
        return out

    def _difference(self, curves_a: dict, curves_b: dict) -> dict | None:
        seeds = sorted(set(curves_a) & set(curves_b))
        if not seeds:
            return None
        out: dict = {"seeds": seeds}
        for definition in DEFINITIONS:
            d_pts = torch.stack([curves_a[s][definition][0] - curves_b[s][definition][0]
                                 for s in seeds])
            d_reps = torch.stack([curves_a[s][f"{definition}_reps"][:, 0]
                                  - curves_b[s][f"{definition}_reps"][:, 0] for s in seeds])
            if not torch.isfinite(d_pts).all():
                return None
            out[definition] = bootstrap_ci(d_reps.mean(0), float(d_pts.mean()),
                                           self.level).to_dict()
        return out

    # ------------------------------------------------------------------ results

    def _ladder_entry(self, ladder: Ladder, scores: list[dict]) -> dict:
        rungs = []
        for item in scores:
            per_seed = item["seeds"]
            row = {"config_id": item["rung"].config_id, "sparsity": item["rung"].sparsity,
                   "l0": _mean(v["l0"] for v in per_seed.values()),
                   "dead_fraction": _mean(v["dead_fraction"] for v in per_seed.values())}
            for definition in DEFINITIONS:
                row[definition] = _mean(v["ev"][definition] for v in per_seed.values())
            for key in ("firing_overlap", "loss_recovered"):
                vals = [v[key] for v in per_seed.values() if key in v]
                if vals:
                    row[key] = _mean(vals)
            for key in ("decoder_evenness", "seed_specific_fraction"):
                if key in item:
                    row[key] = item[key]
            row["per_seed"] = {
                str(s): {k: v[k] for k in ("l0", "dead_fraction", "firing_overlap",
                                           "n_features_compared", "loss_recovered") if k in v}
                | {d: v["ev"][d] for d in DEFINITIONS}
                for s, v in per_seed.items()}
            rungs.append(row)
        rungs.sort(key=lambda r: r["l0"])
        entry = {"family": ladder.family, "rungs": rungs,
                 "seeds": sorted({int(s) for r in rungs for s in r["per_seed"]})}
        if ladder.cohort is not None:
            entry["cohort"] = ladder.cohort.get("cohort")
            entry["cohort_dir"] = str(ladder.cohort_dir)
            if "consensus" in ladder.cohort:
                c = ladder.cohort["consensus"]
                entry["frame"] = {k: c.get(k) for k in ("residual_fraction", "n_iter",
                                                        "converged", "is_pairwise",
                                                        "n_fit_rows", "note")}
                entry["frame"]["reference_seed"] = ladder.cohort.get("reference_seed")
                entry["frame"]["group"] = ladder.cohort.get("group")
                entry["frame"]["fit_batch"] = c.get("fit_batch_description")
        return entry

    def _verdict(self, diff: dict) -> str:
        """ahead / behind when the difference is at least tie_margin and its interval excludes
        0 on that side; tied otherwise."""
        if diff["point"] >= self.tie_margin and diff["ci_low"] > 0:
            return "ahead"
        if diff["point"] <= -self.tie_margin and diff["ci_high"] < 0:
            return "behind"
        return "tied"

    def _contrast(self, points: list[dict], a: str, b: str) -> dict | None:
        key = f"{a}_minus_{b}"
        diffs = [p["differences"][key]["ev_standard"] for p in points if key in p["differences"]]
        if not diffs:
            return None
        verdicts = [self._verdict(d) for d in diffs]
        return {"n": len(diffs), "lo": min(d["point"] for d in diffs),
                "hi": max(d["point"] for d in diffs),
                **{v: verdicts.count(v) for v in ("ahead", "tied", "behind")}}

    @staticmethod
    def _say(c: dict) -> str:
        counts = ", ".join(f"{v} at {c[v]}" for v in ("ahead", "tied", "behind") if c[v])
        return f"{c['lo']:+.3f} to {c['hi']:+.3f} ({counts} of {c['n']})"

    def reading(self, site: str, entry: dict) -> str:
        """Which method wins where, generated from the matched-L0 numbers."""
        points = [p for p in entry["matched"] if len(p["methods"]) >= 2]
        if not points:
            return (f"At `{site}` fewer than two methods reach a common L0: nothing to compare "
                    "at matched sparsity.")
        wins: dict[str, list[float]] = {}
        for p in points:
            for m in p.get("best", []):
                wins.setdefault(m, []).append(p["l0"])
        parts = [f"At `{site}`, {len(points)} matched L0(s) from {points[0]['l0']:.3g} to "
                 f"{points[-1]['l0']:.3g} (EV = ev_standard; a difference counts as ahead or "
                 f"behind when it is at least {self.tie_margin:g} and its interval excludes 0, "
                 "else tied). Best (within the margin): "
                 + "; ".join(f"{LABELS[m]} at L0 {', '.join(f'{x:.3g}' for x in wins[m])}"
                             for m in METHODS if m in wins) + "."]
        against_own = [(m, self._contrast(points, m, "own"))
                       for m in ("rotated", "universal", "crosscoder")]
        against_own = [(m, c) for m, c in against_own if c is not None]
        if against_own:
            parts.append("Against each seed's own SAE: " + "; ".join(
                f"{LABELS[m]} {self._say(c)}" for m, c in against_own) + ".")
        joint = {m: self._contrast(points, "rotated", m) for m in ("universal", "crosscoder")}
        joint = {m: c for m, c in joint.items() if c is not None}
        if joint:
            parts.append("Rotate-and-transfer against the jointly trained dictionaries: "
                         + "; ".join(f"minus the {LABELS[m]} {self._say(c)}"
                                     for m, c in joint.items()) + ".")
            behind = {m: c for m, c in joint.items() if c["behind"]}
            if not behind:
                parts.append("It matches them at every matched L0: here one seed's SAE and a "
                             "rotation reconstruct the other seeds as well as a dictionary "
                             "trained on all of them, as seeds that share their features up "
                             "to rotation would.")
            else:
                parts.append("It falls behind the " + " and the ".join(
                    f"{LABELS[m]} at {c['behind']} of {c['n']} L0(s)" for m, c in behind.items())
                    + ".")
                own = dict(against_own).get("rotated")
                if own is not None and own["tied"] == own["n"]:
                    parts.append("But it ties each seed's own SAE at every L0, so that gap is the "
                                 "single-seed SAE's (the same config trained on one seed's "
                                 "rows), not the transfer's.")
                elif "universal" in behind:
                    parts.append("A dictionary trained on every seed's rows in one frame "
                                 "captures there what one seed's SAE plus a rotation misses "
                                 "(features not shared up to rotation, or an SAE fitted to its "
                                 "own seed's idiosyncrasies).")
                if "crosscoder" in behind:
                    parts.append("The crosscoder reads every seed's activations at once, so "
                                 "part of any lead is the other seeds' views of the same token, "
                                 "and at equal steps and lr its summed encoders move faster than "
                                 "one SAE's: compare ladders trained to convergence.")
            parts.append("Differences of a few hundredths can come from SAE training alone "
                         "(another init or minibatch order), which this comparison does not "
                         "measure.")
        if "crosscoder" in entry["methods"]:
            parts.append("The crosscoder's L0 counts latents of the one code shared by every "
                         "seed.")
        return " ".join(parts)

    def _config(self) -> dict:
        return {"min_rungs": self.min_rungs, "l0_targets": self.l0_targets,
                "l0_tolerance": self.l0_tolerance, "n_boot": self.n_boot, "level": self.level,
                "boot_seed": self.boot_seed, "tie_margin": self.tie_margin,
                "seed_specific_share": self.seed_specific_share,
                "sae_architecture": self.sae_architecture,
                "crosscoder_architecture": self.crosscoder_architecture}

    def _definitions(self, ctx) -> dict:
        return {
            **{k: f"{v}, of seed s's own {ctx.score_batch}-batch activations against the "
                  "method's reconstruction mapped back into seed s's frame" for k, v in
               EV_DEFINITIONS.items()},
            "own": "each seed's own SAE on its own activations",
            "rotated": "the anchor's SAE on seed s's activations mapped into the anchor's frame "
                       "by the rotation fitted on the fit batch (seeds other than the anchor)",
            "universal": "the universal SAE (trained on every seed's consensus-frame rows) on "
                         "seed s's activations mapped by the shared stage's consensus map",
            "crosscoder": "the crosscoder's shared code of every seed's row, decoded for seed s",
            "l0": "mean over rows of the number of non-zero latents (crosscoder: of the one "
                  "code shared by all seeds); at a matched point, the target L0",
            "l0_targets": "the L0s every method is read at: the own-seed ladder's mean L0 per "
                          "rung unless analysis.callbacks.shared_dictionaries.l0_targets is set",
            "dead_fraction": "fraction of latents zero on every scored row of the seed (at a "
                             "matched point: interpolated per seed, mean over seeds)",
            "loss_recovered": "fraction of the model's loss recovered with the dictionary's "
                              "reconstruction of seed s spliced in at the site, on the first "
                              f"{self.downstream_sequences} scored sequences: (L_abl - L_sae) / "
                              "(L_abl - L_clean), L the summed per-head cross-entropy (next-token "
                              "for language models), L_abl with the site replaced by seed s's "
                              "mean activation; mean over seeds; null where the ablation does "
                              "not raise the loss",
            "firing_overlap": "mean over latents of the Pearson correlation (over rows) of the "
                              "dictionary's code on the anchor's rows and on seed s's "
                              "corresponding rows (latents constant on either side left out); "
                              "mean over seeds s != anchor",
            "decoder_evenness": "crosscoder: mean over live latents (those firing on a scored "
                                "row) of the weakest seed's decoder norm over the strongest's "
                                "(1: the same norm in every seed, 0: some seed lacks the latent)",
            "seed_specific_fraction": "crosscoder: fraction of live latents whose largest seed "
                                      "share of the decoder norm exceeds seed_specific_share",
            "matched": "every method read at each target L0: per seed, linear interpolation in "
                       "log L0 between its rungs (never extrapolated beyond l0_tolerance), then "
                       "the mean over the method's seeds",
            "differences / <a>_minus_<b>": "EV of method a minus method b at a matched L0, per "
                                            "seed then mean over the seeds both have",
            "point / ci_low / ci_high / boot_mean / boot_std": "an EV (or EV difference) at a "
                "matched L0, its percentile interval, and the mean and standard deviation of "
                "its replicates: a bootstrap over sequences of the scored batch, one resample "
                "shared by every method, rung and seed, L0 held at its point value",
            "best": "the methods within tie_margin (ev_standard) of the highest EV at that L0",
            "residual_fraction / n_iter": "the consensus fit: share of the seeds' centred sum of "
                                          "squares it leaves unexplained, and its iterations",
            "frame": "the consensus frame the universal SAE reads (polymorph.align.consensus)",
            "reference_seed / group / fit_batch": "the consensus frame: the seed whose basis and "
                                                  "mean it is expressed in, the group of the "
                                                  "maps, the batch they were fitted on",
            "status": "compared: all four methods have a ladder here; partial: some do",
            "scored_on": f"the {ctx.score_batch} batch",
        }

    # ------------------------------------------------------------------ output

    def figures(self, ctx, result: dict, fig_dir: Path) -> list[Path]:
        from polymorph.analysis.plots import plt, save

        paths = []
        colours = {"own": "#2b8a3e", "rotated": "#1c7ed6", "universal": "#f08c00",
                   "crosscoder": "#7048e8"}
        for site, entry in result["sites"].items():
            if not entry.get("methods"):
                continue
            fig, (ax_ev, ax_agree) = plt.subplots(1, 2, figsize=(12, 4.2))
            for method, ladder in entry["methods"].items():
                rungs = [r for r in ladder["rungs"] if r["l0"] > 0]
                xs = [r["l0"] for r in rungs]
                ax_ev.plot(xs, [r["ev_standard"] for r in rungs], marker="o", ms=4,
                           color=colours[method], label=f"{LABELS[method]} ({ladder['family']})")
                pts = [(p["l0"], p["methods"][method]["ev_standard"]) for p in entry["matched"]
                       if method in p["methods"]]
                if pts:
                    ax_ev.errorbar([x for x, _ in pts], [v["point"] for _, v in pts],
                                   yerr=[[v["point"] - v["ci_low"] for _, v in pts],
                                         [v["ci_high"] - v["point"] for _, v in pts]],
                                   fmt="D", mfc="none", color=colours[method], capsize=3, ms=6)
                key = "decoder_evenness" if method == "crosscoder" else "firing_overlap"
                vals = [(r["l0"], r[key]) for r in rungs if key in r]
                if vals:
                    ax_agree.plot([x for x, _ in vals], [v for _, v in vals], marker="o", ms=4,
                                  color=colours[method],
                                  label=f"{LABELS[method]}: "
                                  + ("decoder evenness" if key == "decoder_evenness"
                                     else "firing overlap"))
                ax_agree.plot(xs, [r["dead_fraction"] for r in rungs], ls=":", marker=".",
                              color=colours[method], label=f"{LABELS[method]}: dead fraction")
            short = site.replace("blocks.", "").replace("hook_resid_", "")
            ax_ev.set_title(f"{short}: EV against L0 (rungs: lines; matched L0: diamonds with "
                            "95% CI)", fontsize=9)
            ax_ev.set_ylabel(f"explained variance (ev_standard, {ctx.score_batch} batch)")
            ax_agree.set_title(f"{short}: cross-seed agreement and dead latents", fontsize=9)
            ax_agree.set_ylabel("correlation / evenness / fraction")
            ticks = entry.get("l0_targets") or []
            for ax in (ax_ev, ax_agree):
                ax.set_xscale("log")
                ax.set_xlabel("L0 (log scale; ticks at the matched L0s)")
                if ticks:
                    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
                    ax.minorticks_off()
                ax.legend(fontsize=6)
            paths.append(save(fig, fig_dir / f"shared_dictionaries_{short}.png"))
        return paths

    def report(self, ctx, result: dict, figures) -> str:
        lines = ["## Shared dictionaries side by side (`shared_dictionaries`)", ""]
        if not result["trained"]:
            lines += [
                "Own-seed SAEs, the anchor's SAE rotated into each seed, a universal SAE on the "
                "consensus frame and a cross-seed crosscoder, at matched L0: **not computed**, "
                "no shared dictionaries are trained for this experiment. Train them with:", "",
                f"- per-seed ladder: `{result['commands']['own']}`",
                f"- universal SAE: `{result['commands']['universal']}`",
                f"- crosscoder: `{result['commands']['crosscoder']}`"]
            return "\n".join(lines)
        lines += [
            f"Each seed's {ctx.score_batch}-batch activations reconstructed by: its own SAE, the "
            "anchor's SAE through the fitted rotation, the universal SAE through the consensus "
            "maps, the crosscoder; every method read at the same L0 by interpolating its ladder "
            f"in log L0. EV = ev_standard, mean over seeds, with a {self.level:.0%} sequence-"
            "bootstrap interval (ev_published and per-seed values in results.json).", ""]
        by_name = {p.name: p for p in figures}
        for site, entry in result["sites"].items():
            lines += [f"### `{site}` ({entry['status']})", ""]
            methods = [m for m in METHODS if m in entry.get("methods", {})]
            if not methods:
                lines += ["No method has a ladder here.", ""]
                continue
            lines += ["| method | family | rungs | seeds |", "|---|---|---|---|"]
            for m in methods:
                lad = entry["methods"][m]
                lines.append(f"| {LABELS[m]} | {lad['family']} | {len(lad['rungs'])} | "
                             f"{lad['seeds']} |")
            uni = entry["methods"].get("universal", {}).get("frame")
            if uni:
                lines += ["", f"Consensus frame: seed {uni['reference_seed']}'s basis, group "
                          f"{uni['group']}, fitted on {uni['fit_batch']}; residual fraction "
                          f"{_fmt(uni['residual_fraction'])} after {uni['n_iter']} iteration(s)"
                          + (f". {uni['note']}." if uni.get("note") else ".")]
            lines += ["", "| L0 | " + " | ".join(LABELS[m] for m in methods)
                      + " | best | agreement |",
                      "|---|" + "---|" * (len(methods) + 2)]
            for p in entry["matched"]:
                cells = []
                for m in methods:
                    v = p["methods"].get(m)
                    cells.append("-" if v is None else
                                 f"{v['ev_standard']['point']:.3f} [{v['ev_standard']['ci_low']:.3f}"
                                 f", {v['ev_standard']['ci_high']:.3f}]")
                agree = []
                for m, key, label in (("rotated", "firing_overlap", "overlap rot"),
                                      ("universal", "firing_overlap", "overlap uni"),
                                      ("crosscoder", "decoder_evenness", "evenness cc")):
                    v = p["methods"].get(m, {}).get(key)
                    if v is not None:
                        agree.append(f"{label} {v:.3f}")
                lines.append(f"| {p['l0']:.3g} | " + " | ".join(cells) + " | "
                             + ", ".join(LABELS[m] for m in p.get("best", [])) + " | "
                             + "; ".join(agree) + " |")
            lines += ["", entry["reading"], ""]
            short = site.replace("blocks.", "").replace("hook_resid_", "")
            fig = by_name.get(f"shared_dictionaries_{short}.png")
            if fig is not None:
                lines += [f"![{fig.stem}](figures/{fig.name})", ""]
        if result["missing"]:
            lines += ["Missing (the comparison is partial):", ""]
            lines += [f"- {m}" for m in result["missing"]] + [""]
        if result["notes"]:
            lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
        return "\n".join(lines)

    def scalars(self, result: dict) -> dict[str, float]:
        out = {}
        for site, entry in result["sites"].items():
            for p in entry.get("matched", []):
                for m, v in p["methods"].items():
                    out[f"{site}/l0={p['l0']:.3g}/{m}/ev_standard"] = v["ev_standard"]["point"]
        return out

    def tables(self, result: dict):
        cols = ["site", "l0", "method", "ev_standard", "ci_low", "ci_high", "ev_published",
                "dead_fraction"]
        rows = [[site, p["l0"], m, v["ev_standard"]["point"], v["ev_standard"]["ci_low"],
                 v["ev_standard"]["ci_high"], v["ev_published"]["point"],
                 v.get("dead_fraction")]
                for site, entry in result["sites"].items() for p in entry.get("matched", [])
                for m, v in p["methods"].items()]
        return {"shared_dictionaries": (cols, rows)}


def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


class _RowsInOrder:
    """A replacement that puts back precomputed rows, chunk after chunk, in activation-row
    order (the splice visits the chunks of a batch in order, once each)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.cursor = rows, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        stop = self.cursor + x.shape[0]
        if stop > self.rows.shape[0]:
            raise ValueError(f"precomputed rows run out at {stop} > {self.rows.shape[0]}")
        out = self.rows[self.cursor:stop].to(x.device, x.dtype)
        self.cursor = stop
        return out
