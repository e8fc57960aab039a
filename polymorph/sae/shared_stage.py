"""The cross-seed stage: dictionaries shared by every seed of an experiment, trained once.

    python train.py -m seed=0..8 stage=sae sae_ladder=topk             # own-seed ladders
    python train.py stage=shared shared=universal sae_ladder=topk      # one universal SAE per rung
    python train.py stage=shared shared=crosscoder                     # one crosscoder per rung

Two answers to "one dictionary for every seed", trained on the same rows as the per-seed SAEs
(each seed's cached SAE-training activations, one token batch for every seed):

* ``universal``: fit generalised-Procrustes maps of every seed into one consensus frame
  (:func:`polymorph.align.consensus.fit_consensus`) on a separate fit batch
  (``shared.fit_batch``, by default the analysis fit batch, disjoint from the SAE rows and the
  held-out eval batch), map each seed's SAE-training rows into that frame, pool them, and train
  one sae-lens SAE per SAE config of the job (``sae`` or every rung of ``sae_ladder``, any
  architecture) on the pooled rows. A universal SAE's folder is named by its SAE config id, the
  id of the per-seed SAE of the same config: the two are twins.
* ``crosscoder``: one :class:`~polymorph.sae.crosscoder.Crosscoder` per rung of
  ``shared.rungs`` on the seeds' raw, row-aligned activations (per-seed encoders and decoders,
  one shared code).

Folders: :mod:`polymorph.sae.shared_layout`. Existing dictionaries are kept unless
``retrain_saes=true``; an interrupted stage resumes with the rungs it had not finished.

Memory (per site; sites run one after another). Universal: the pooled consensus-frame rows,
S x n x d floats; each seed's matrix is released as soon as it is mapped into the pool, so the
peak is about S + 1 matrices. Crosscoder: the S seeds' matrices, each held once and never
concatenated (minibatches index every matrix with one set of rows), plus parameters, gradients
and Adam's two moments (4 x 2 S d m floats) and one step's tensors. At the PolyPythia shape
(d 512, 4,096 latents, 9 seeds, 65,280 rows of 256 x 255 tokens, batch 4,096) that is 1.20 GB of
activations + 0.60 GB of parameters and optimiser state + ~0.57 GB per step, about 2.4 GB:
no chunking is needed to train on a 24 GB machine (``benchmarks/crosscoder_speed.py`` prints the
arithmetic). Evaluation encodes 4,096 rows at a time (:mod:`polymorph.sae.shared_eval`). The
universal stage also holds every seed's fit-batch activations at every site with work (in
``activations.dtype``: float16 for the PolyPythias, 9 x 7 x 16,320 x 512 x 2 B = 1.05 GB).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from polymorph.activations import collect_activations, distinct_residual_sites
from polymorph.align.consensus import fit_consensus
from polymorph.errors import PolymorphError
from polymorph.files import parse_dtype
from polymorph.instantiation import build
from polymorph.layout import RunLayout
from polymorph.locks import file_lock
from polymorph.runs import finished_runs, runs_dir
from polymorph.sae.cache import cached_activations
from polymorph.sae.config import config_id, resolve_init_seed
from polymorph.sae.crosscoder_config import crosscoder_config_id
from polymorph.sae.shared_config import SharedSettings, crosscoder_config, parse_shared
from polymorph.sae.shared_eval import crosscoder_metrics
from polymorph.sae.shared_io import (
    cohort_id,
    load_consensus,
    read_cohort,
    run_fingerprint,
    save_consensus,
    write_cohort,
)
from polymorph.sae.shared_layout import SharedLayout
from polymorph.sae.shared_rows import (
    cache_matches,
    check_aligned_matrices,
    check_row_alignment,
    pool_into_frame,
)
from polymorph.tracking import build_logger, closing_wandb

log = logging.getLogger(__name__)

PAIRWISE_NOTE = ("a consensus over {n} seeds is pairwise Procrustes: the consensus frame is the "
                 "reference seed's frame and the other seed's map is the one rotation between "
                 "the pair (generalised Procrustes adds nothing below 3 seeds)")


# --------------------------------------------------------------------------- entry point


def train_shared_dictionaries(cfg: DictConfig, family) -> tuple[dict, dict]:
    """Run ``stage=shared`` as configured; returns (metrics, objects) like ``pipeline.train``.

    Everything the config shows is checked before any model or activation is loaded: the method
    and its rungs, the sites, the batches' independence, which seeds are finished.
    """
    settings = parse_shared(cfg)
    family.validate(cfg)
    _check_sites(cfg, family)
    if settings.method == "universal":
        family.check_batches({"SAE training (activations)": cfg.activations,
                              "shared.fit_batch": settings.fit_batch})
    exp = runs_dir(cfg, family)  # this ablation's seed runs (and its shared dictionaries)
    wanted = list(settings.seeds) if settings.seeds is not None else None
    runs = finished_runs(exp, wanted, minimum=2, train_command=_train_command(cfg))
    seeds = list(runs)
    family.validate_seeds(seeds)
    layout = SharedLayout.for_experiment(exp)
    progress = bool(cfg.trainer.get("enable_progress_bar", True))
    notes = []
    if settings.method == "universal" and len(seeds) < 3:
        notes.append(PAIRWISE_NOTE.format(n=len(seeds)))
        log.warning(notes[-1])
    objects: dict = {"layout": layout, "seeds": seeds, "family": family, "notes": notes}
    # one stage at a time per experiment: a second job (e.g. a sweep that repeats the command)
    # waits, then finds the dictionaries finished and reuses them
    with closing_wandb(), file_lock(layout.root / ".lock"):
        logger = build_logger(cfg.get("logger"), layout.logs, f"shared/{settings.method}",
                              "shared")
        stage = _Stage(cfg, family, settings, runs, exp, layout, logger, progress)
        metrics = stage.run()
    objects["cohorts"] = stage.cohorts
    metrics["notes"] = notes
    return metrics, objects


def _check_sites(cfg: DictConfig, family) -> None:
    sites = cfg.get("sites")
    if sites is not None and len(sites) == 0:
        raise PolymorphError("sites=[] is empty: give at least one hook name, or sites=null for "
                             "every residual site of the model")
    known = family.available_sites(cfg)
    if known is not None and sites is not None:
        unknown = [s for s in sites if s not in known]
        if unknown:
            resid = [k for k in known if "hook_resid" in k]
            raise PolymorphError(f"unknown site(s) {unknown}; this model's residual sites are "
                                 f"{', '.join(resid)}")


def _train_command(cfg: DictConfig) -> str:
    """``python train.py -m ...`` with this job's overrides minus the stage's own: the command
    that trains missing seeds of this experiment."""
    try:
        from hydra.core.hydra_config import HydraConfig

        drop = ("stage", "shared", "seed", "retrain")
        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.split("=", 1)[0].lstrip("+~").startswith(drop)]
    except (ImportError, ValueError):
        overrides = [f"name={cfg.name}"]
    return " ".join(["python train.py -m", *overrides])


# --------------------------------------------------------------------------- the stage


class _Stage:
    """One run of the stage: plan the work, read every seed's rows, train what is missing."""

    def __init__(self, cfg, family, settings: SharedSettings, runs: dict[int, RunLayout],
                 exp: Path, layout: SharedLayout, logger, progress: bool) -> None:
        self.cfg, self.family, self.settings = cfg, family, settings
        self.runs, self.seeds = runs, list(runs)
        self.exp, self.layout, self.logger, self.progress = exp, layout, logger, progress
        self.method = settings.method
        self.retrain = bool(cfg.get("retrain_saes", False))
        ref = settings.reference
        if self.method == "universal" and ref is not None and ref not in self.seeds:
            log.warning("shared.reference=%s is not among the seeds %s: the consensus is "
                        "expressed in seed %s's frame", ref, self.seeds, self.seeds[0])
        self.reference = ref if ref in self.seeds else self.seeds[0]
        self.act_spec = cfg.activations
        self.act_identity = family.batch_identity(cfg.activations)
        self.cohorts: dict[str, str] = {}

    # -- identity --------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        """Everything that defines the training rows of this cohort (hashed into its id)."""
        record = {
            "method": self.method,
            "experiment": str(self.cfg.name),
            "seeds": self.seeds,
            "runs": {str(s): {"fingerprint": run_fingerprint(r),
                              "checkpoint": self.family.final_label(r)}
                     for s, r in self.runs.items()},
            "activations": self.act_identity,
        }
        if self.method == "universal":
            record.update(fit_batch=self.family.batch_identity(self.settings.fit_batch),
                          group=self.settings.group, reference_seed=self.reference)
        return record

    def _rungs(self, d_in: int | None) -> list[tuple[str, Any]]:
        """(config id, config) of every rung; crosscoder ids need the width (None: unknown)."""
        if self.method == "universal":
            return [(config_id(c), c) for c in self.settings.sae_configs]
        if d_in is None:
            return []
        out = []
        for rung in self.settings.crosscoder_rungs:
            cc = crosscoder_config(rung, len(self.seeds), d_in)
            out.append((crosscoder_config_id(cc), cc))
        return out

    # -- run -------------------------------------------------------------------------

    def run(self) -> dict:
        identity = self._record()
        cohort = cohort_id(self.seeds, {k: v for k, v in identity.items() if k != "experiment"})
        sites = self._sites()
        for site in sites:
            self.cohorts[site] = cohort
        todo = self._plan(sites, cohort)
        summary: dict = {}
        if not todo:
            log.info("shared %s: every dictionary exists for seeds %s at %s (retrain_saes=true "
                     "to redo them)", self.method, self.seeds, ", ".join(sites))
            return summary
        batch = self._prepare(todo)
        bar = tqdm(total=sum(len(v) or len(self.settings.crosscoder_rungs) for v in todo.values()),
                   desc=f"shared {self.method} (site, rung)", disable=not self.progress)
        try:
            for site in todo:
                summary.update(self._site(site, cohort, identity, batch, bar))
        finally:
            bar.close()
        return summary

    def _sites(self) -> list[str]:
        if self.cfg.get("sites") is not None:
            return [str(s) for s in self.cfg.sites]
        model = self.family.load(self.runs[self.seeds[0]], "best")
        return distinct_residual_sites(model)

    def _plan(self, sites: list[str], cohort: str) -> dict[str, list[str]]:
        """Per site with work, the config ids still to train ([] for a crosscoder whose ids
        need the width: decided once the rows are read)."""
        todo: dict[str, list[str]] = {}
        for site in sites:
            record = self.layout.cohort_record(site, self.method, cohort)
            if self.retrain or not record.is_file():
                todo[site] = [cid for cid, _ in self._rungs(None)]
                continue
            if self.method == "crosscoder":
                d_in = int(read_cohort(record)["d_in"])
                missing = [cid for cid, _ in self._rungs(d_in)
                           if not self.layout.is_finished(site, self.method, cohort, cid)]
            else:
                missing = [cid for cid, _ in self._rungs(None)
                           if not self.layout.is_finished(site, self.method, cohort, cid)]
            if missing:
                todo[site] = missing
        return todo

    def _prepare(self, todo: dict[str, list[str]]):
        """Check every seed's token batches, fill the activation caches, collect fit rows.

        One model is loaded at a time. Returns the common SAE-activation TokenBatch.
        """
        sites = list(todo)
        needs_fit = [s for s in sites if self.method == "universal" and not self._has_maps(s)]
        batches, fit_batches = {}, {}
        self.fit_acts: dict[str, dict[int, torch.Tensor]] = {s: {} for s in needs_fit}
        store = parse_dtype(str(self.act_spec.get("dtype", "float32")), "activations.dtype")
        size = int(self.act_spec.get("batch_size", 512))
        for seed in tqdm(self.seeds, desc="seeds (token batches, activations)",
                         disable=not self.progress):
            run = self.runs[seed]
            model = self.family.load(run, "best")
            batches[seed] = self.family.token_batch(self.act_spec, self.exp, model)
            check_row_alignment(batches, "SAE-training activations (activations)")
            identity = {**self.act_identity, "checkpoint": self.family.final_label(run)}
            stale = [s for s in sites if not cache_matches(run, s, identity)]
            if stale:
                b = batches[seed]
                cached_activations(run, model, b.tokens, b.mask, stale, identity,
                                   dtype=str(self.act_spec.get("dtype", "float32")),
                                   batch_size=size)
            if needs_fit:
                fit_batches[seed] = self.family.token_batch(self.settings.fit_batch, self.exp,
                                                            model)
                check_row_alignment(fit_batches, "the consensus fit batch (shared.fit_batch)")
                fb = fit_batches[seed]
                fit = collect_activations(model, fb.tokens, needs_fit, mask=fb.mask,
                                          batch_size=size)
                for site, x in fit.items():
                    self.fit_acts[site][seed] = x.to(store)
            del model
        self.fit_description = (fit_batches[self.seeds[0]].description if fit_batches else None)
        return batches[self.seeds[0]]

    def _has_maps(self, site: str) -> bool:
        """Whether the site's cohort already has its maps (kept unless retrain_saes=true)."""
        cohort = self.cohorts[site]
        return (not self.retrain and self.layout.cohort_record(site, "universal", cohort).is_file()
                and self.layout.consensus_file(site, cohort).is_file())

    def _rows(self, site: str, batch) -> dict[int, torch.Tensor]:
        out = {}
        for seed in self.seeds:
            run = self.runs[seed]
            identity = {**self.act_identity, "checkpoint": self.family.final_label(run)}
            out[seed] = cached_activations(run, None, batch.tokens, batch.mask, [site],
                                           identity)[site]
        check_aligned_matrices(out, f"{site}")
        return out

    def _site(self, site: str, cohort: str, identity: dict, batch, bar) -> dict:
        acts = self._rows(site, batch)
        d_in = int(next(iter(acts.values())).shape[1])
        record = self.layout.cohort_record(site, self.method, cohort)
        if self.method == "universal":
            return self._universal(site, cohort, identity, acts, record, bar)
        return self._crosscoder(site, cohort, identity, acts, d_in, record, bar)

    # -- universal -------------------------------------------------------------------

    def _universal(self, site, cohort, identity, acts, record_path, bar) -> dict:
        maps, fit_info = self._consensus(site, cohort, identity, record_path)
        n = next(iter(acts.values())).shape[0]
        pooled = pool_into_frame(acts, maps, self.seeds)  # releases each seed's raw matrix
        trainer = (build(self.cfg.sae_trainer, "sae_trainer")
                   if self.cfg.get("sae_trainer") else None)
        summary = {}
        for sae_cfg in self.settings.sae_configs:
            cid = config_id(sae_cfg)
            if not self.retrain and self.layout.is_finished(site, "universal", cohort, cid):
                continue
            summary.update(self._train_universal(site, cohort, sae_cfg, cid, pooled, n,
                                                 fit_info, trainer))
            bar.update(1)
        return summary

    def _consensus(self, site, cohort, identity, record_path):
        """The cohort's maps: fitted now (and saved with cohort.json) or read back."""
        path = self.layout.consensus_file(site, cohort)
        if self._has_maps(site):
            saved = load_consensus(path)
            return [saved.maps[s] for s in self.seeds], read_cohort(record_path)["consensus"]
        fit = [self.fit_acts[site][s].float() for s in self.seeds]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            consensus = fit_consensus(fit, group=self.settings.group,
                                      reference=self.seeds.index(self.reference))
        info = {
            "residual_fraction": consensus.residual_fraction,
            "n_iter": consensus.n_iter,
            "converged": consensus.converged,
            "is_pairwise": consensus.is_pairwise,
            "n_fit_rows": int(fit[0].shape[0]),
            "fit_batch_description": self.fit_description,
            "effective_rank": {str(s): m.effective_rank()
                               for s, m in zip(self.seeds, consensus.maps, strict=True)},
            "warnings": sorted({str(w.message) for w in caught}),
            "note": PAIRWISE_NOTE.format(n=len(self.seeds)) if consensus.is_pairwise else None,
        }
        del self.fit_acts[site]
        save_consensus(path, self.seeds, list(consensus.maps), cohort)
        write_cohort(record_path, {
            **identity, "cohort": cohort, "site": site,
            "activations_spec": OmegaConf.to_container(self.act_spec, resolve=True),
            "fit_batch_spec": OmegaConf.to_container(self.settings.fit_batch, resolve=True),
            "d_in": int(fit[0].shape[1]),
            "consensus": info,
            "frame": (f"the consensus frame expressed in seed {self.reference}'s basis and mean "
                      "(generalised Procrustes, polymorph.align.consensus)"),
        })
        return list(consensus.maps), info

    def _train_universal(self, site, cohort, sae_cfg, cid, pooled, n, fit_info,
                         trainer) -> dict:
        from polymorph.sae.evaluate import METRIC_DEFINITIONS, evaluate_sae
        from polymorph.sae.io import save_sae
        from polymorph.sae.train import train_sae

        folder = self.layout.dictionary_dir(site, "universal", cohort, cid)
        init_seed = resolve_init_seed(sae_cfg, self.reference)
        seeds_text = ",".join(map(str, self.seeds))
        sae, info = train_sae(
            pooled, sae_cfg, init_seed=init_seed, hook_name=site,
            model_name=(f"polymorph-universal/{self.cfg.name}/seeds={seeds_text}/consensus "
                        f"frame of seed {self.reference}"),
            progress_bar=False, logger=False,
            accelerator=str(self.cfg.trainer.get("accelerator", "cpu")),
            default_root_dir=str(self.layout.logs), trainer=trainer)
        per_seed = {}
        for i, seed in enumerate(self.seeds):
            m = evaluate_sae(sae, pooled[i * n:(i + 1) * n])
            per_seed[str(seed)] = {k: m[k] for k in ("ev_published", "ev_standard", "mse",
                                                     "l0", "dead_fraction", "n_rows")}
        metrics = {
            "per_seed": per_seed,
            "evaluated_on": "each seed's SAE-training activations mapped into the consensus "
                            "frame (the rows it was trained on)",
            "definitions": METRIC_DEFINITIONS,
            "train_info": info,
        }
        metadata = {
            "method": "universal",
            "experiment": str(self.cfg.name),
            "site": site,
            "seeds": self.seeds,
            "reference_seed": self.reference,
            "cohort": cohort,
            "config_id": cid,
            "init_seed": init_seed,
            "sae_config": sae_cfg.to_dict(),
            "activations": OmegaConf.to_container(self.act_spec, resolve=True),
            "frame": "reads the consensus frame: map seed s's activations with its map in "
                     "../consensus.safetensors first",
            "consensus": fit_info,
        }
        save_sae(sae, folder, metadata=metadata, metrics=metrics)
        return self._log(site, cid, {f"seed{s}_{k}": v for s, m in per_seed.items()
                                     for k, v in m.items()})

    # -- crosscoder ------------------------------------------------------------------

    def _crosscoder(self, site, cohort, identity, acts, d_in, record_path, bar) -> dict:
        from polymorph.sae.crosscoder_io import save_crosscoder
        from polymorph.sae.crosscoder_train import train_crosscoder

        if self.retrain or not record_path.is_file():
            write_cohort(record_path, {
                **identity, "cohort": cohort, "site": site, "d_in": d_in,
                "activations_spec": OmegaConf.to_container(self.act_spec, resolve=True)})
        matrices = [acts[s] for s in self.seeds]
        summary = {}
        for cid, cc_cfg in self._rungs(d_in):
            if not self.retrain and self.layout.is_finished(site, "crosscoder", cohort, cid):
                continue
            crosscoder, info = train_crosscoder(
                matrices, cc_cfg, progress_bar=False,
                accelerator=str(self.cfg.trainer.get("accelerator", "cpu")),
                default_root_dir=str(self.layout.logs))
            metrics = crosscoder_metrics(crosscoder, matrices, self.seeds)
            save_crosscoder(crosscoder, self.layout.dictionary_dir(site, "crosscoder", cohort,
                                                                   cid), metadata={
                "method": "crosscoder",
                "experiment": str(self.cfg.name),
                "site": site,
                "seeds": self.seeds,
                "cohort": cohort,
                "activations": OmegaConf.to_container(self.act_spec, resolve=True),
                "metrics": metrics,
                "train_info": info,
            })
            summary.update(self._log(site, cid, {
                "l0": metrics["l0"], "dead_fraction": metrics["dead_fraction"],
                "decoder_evenness": metrics["decoder_evenness"],
                **{f"seed{s}_ev_standard": m["ev_standard"]
                   for s, m in metrics["per_seed"].items()}}))
            bar.update(1)
        return summary

    def _log(self, site: str, cid: str, scalars: dict) -> dict:
        key = f"shared/{self.method}/{site}/{cid}"
        if self.logger:
            self.logger.log_metrics({f"{key}/{k}": v for k, v in scalars.items()})
        return {key: scalars}
