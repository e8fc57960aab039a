"""Everything the analysis callbacks share, computed once per analysis.

* the experiment's finished seeds, their model family and their analysed models;
* activations of every seed at every site on a fixed *fit* batch and a separate held-out
  *eval* batch (the same inputs for every seed, so rows align);
* one rotation per (pair, site), fitted on the fit batch (``analysis.group``);
* every seed's SAE per site (the SAE config of this analysis' ``sae`` settings).

Pair convention: ``(a, b)`` maps seed ``b``'s activations into seed ``a``'s frame
(``rotation.apply(acts[b]) ~ acts[a]``); with ``analysis.pairs=anchor``, ``a`` is always the
anchor.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from polymorph.activations import (
    SiteError,
    check_sites,
    collect_activations,
    distinct_residual_sites,
)
from polymorph.align.procrustes import Rotation, fit_rotation
from polymorph.errors import PolymorphError
from polymorph.families import ModelFamily, Readout, TokenBatch, build_family
from polymorph.layout import RunLayout
from polymorph.runs import ablation, finished_runs, read_run_config

log = logging.getLogger(__name__)

PAIR_MODES = ("anchor", "all")
SCORE_ON = ("eval", "fit")
GROUPS = ("O", "SO")
PRECISIONS = ("float64", "float32")


@dataclass
class AnalysisContext:
    experiment: str
    experiment_dir: Path
    out_dir: Path
    family: ModelFamily
    anchor: int
    seeds: list[int]
    runs: dict[int, RunLayout]
    models: dict[int, Any]
    run_configs: dict[int, DictConfig]
    sites: list[str]
    pairs: list[tuple[int, int]]
    batches: dict[str, TokenBatch]  # "fit" / "eval"
    acts: dict[str, dict[int, dict[str, torch.Tensor]]]  # batch -> seed -> site -> [n, d]
    rotations: dict[tuple[int, int, str], Rotation]
    saes: dict[int, dict[str, Any]]  # seed -> site -> polymorph.sae.io.SavedSAE
    sae_config_id: str | None
    group: str
    score_on: str
    batch_size: int = 512
    fit_precision: str = "float64"
    missing: list[str] = field(default_factory=list)  # what could not be analysed, and why
    show_progress: bool = True
    # the train.py prefix that trains this experiment (for reports that say what to train)
    train_command: str = "python train.py -m"

    @property
    def readout(self) -> Readout:
        return self.family.readout

    @property
    def score_batch(self) -> str:
        """The batch every score is computed on: 'eval' (held out) unless score_on=fit."""
        return "fit" if self.score_on == "fit" else "eval"

    @property
    def tokens(self) -> dict[str, torch.Tensor]:
        return {name: b.tokens for name, b in self.batches.items()}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: b.mask for name, b in self.batches.items()}

    def scoring_acts(self, seed: int, site: str) -> torch.Tensor:
        return self.acts[self.score_batch][seed][site]

    def collect(self, model, batch: str, sites: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Activations of any model on the context's ``batch`` ("fit" / "eval"), rows aligned
        with ``acts[batch]`` (same tokens, same kept positions)."""
        b = self.batches[batch]
        return collect_activations(model, b.tokens, list(sites or self.sites), mask=b.mask,
                                   batch_size=self.batch_size)

    def rotation(self, a: int, b: int, site: str) -> Rotation:
        """The rotation mapping seed b's activations into seed a's frame at ``site``."""
        return self.rotations[(a, b, site)]

    def to_frame_of(self, target: int, source: int, site: str) -> Rotation:
        """The rotation mapping ``source``'s frame into ``target``'s at ``site`` (the fitted one
        or its inverse, whichever direction the context holds)."""
        if (target, source, site) in self.rotations:
            return self.rotations[(target, source, site)]
        if (source, target, site) in self.rotations:
            return self.rotations[(source, target, site)].inverse()
        raise PolymorphError(f"no rotation between seeds {target} and {source} at {site}; the "
                             "analysis context fits one per pair and site")

    def progress(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.show_progress, **kwargs)

    def description(self) -> dict:
        return {
            **self.family.description(),
            "anchor": self.anchor,
            "seeds": self.seeds,
            "pairs": [list(p) for p in self.pairs],
            "pair_convention": "(a, b): seed b's activations mapped into seed a's frame",
            "sites": self.sites,
            "group": self.group,
            "score_on": self.score_on,
            "scored_batch": self.score_batch,
            "fit_batch": self.batches["fit"].description,
            "eval_batch": self.batches["eval"].description,
            "fit_rows": self.batches["fit"].n_rows,
            "eval_rows": self.batches["eval"].n_rows,
            "sae_config_id": self.sae_config_id,
        }


def check_analysis_config(cfg: DictConfig) -> None:
    """The analysis settings the config alone can check, before anything loads."""
    a = cfg.analysis
    for key, allowed in (("pairs", PAIR_MODES), ("score_on", SCORE_ON), ("group", GROUPS),
                         ("fit_precision", PRECISIONS)):
        if str(a.get(key)) not in allowed:
            raise PolymorphError(f"analysis.{key}={a.get(key)} is unknown; use one of "
                                 f"{', '.join(allowed)}")


def _check_comparable(family: ModelFamily, configs: dict[int, DictConfig]) -> None:
    first = next(iter(configs))
    ref = family.comparable(configs[first])
    for seed, config in configs.items():
        mine = family.comparable(config)
        if mine != ref:
            keys = sorted(k for k in set(ref) | set(mine) if ref.get(k) != mine.get(k))
            raise PolymorphError(
                f"runs disagree on {keys}: seed {first} has {[ref.get(k) for k in keys]}, seed "
                f"{seed} has {[mine.get(k) for k in keys]}; analyse comparable seeds only "
                f"(analysis.seeds=[...]) or retrain them alike")


def train_command(cfg: DictConfig) -> str:
    """The ``python train.py -m ...`` prefix that trains this analysis' experiment."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.split("=", 1)[0].lstrip("+~").startswith(("analysis", "seed"))]
    except (ImportError, ValueError):
        overrides = [f"name={cfg.name}"]
    return " ".join(["python train.py -m", *overrides])


def build_context(cfg: DictConfig, root: Path, out_dir: Path, show_progress: bool = True,
                  family: ModelFamily | None = None) -> AnalysisContext:
    from polymorph.sae import SAETrainConfig, config_id
    from polymorph.sae.io import load_sae

    a = cfg.analysis
    check_analysis_config(cfg)
    family = family or build_family(cfg)
    specs = {"fit": a.fit_batch, "eval": a.eval_batch}
    family.check_batches({"SAE training (activations)": cfg.activations,
                          **{f"analysis.{k}_batch": v for k, v in specs.items()}})
    wanted = None if a.seeds is None else [int(s) for s in a.seeds]
    experiment_dir = ablation(cfg, family).runs_dir(Path(root))  # this ablation's seed runs
    runs = finished_runs(experiment_dir, wanted, train_command=train_command(cfg))
    anchor = int(a.anchor)
    if anchor not in runs:
        raise PolymorphError(
            f"anchor seed {anchor} has no finished run in {experiment_dir} (finished "
            f"seeds: {sorted(runs)}); pick one with analysis.anchor=<seed>")
    seeds = [anchor] + [s for s in runs if s != anchor]
    family.validate_seeds(seeds)
    configs = {seed: read_run_config(runs[seed]) for seed in seeds}
    _check_comparable(family, configs)
    models = {}
    for seed in tqdm(seeds, desc="models", disable=not show_progress):
        models[seed] = family.load(runs[seed], "best")
    sites = ([str(s) for s in cfg.sites] if cfg.get("sites") is not None
             else distinct_residual_sites(models[anchor]))
    try:
        check_sites(models[anchor], sites)
    except SiteError as err:
        raise PolymorphError(str(err)) from err

    batches = {name: family.token_batch(spec, experiment_dir, models[anchor])
               for name, spec in specs.items()}
    batch_size = int(a.get("batch_size") or 512)
    acts: dict[str, dict[int, dict[str, torch.Tensor]]] = {"fit": {}, "eval": {}}
    for seed in tqdm(seeds, desc="activations", disable=not show_progress):
        for name, batch in batches.items():
            acts[name][seed] = collect_activations(models[seed], batch.tokens, sites,
                                                   mask=batch.mask, batch_size=batch_size)

    if a.pairs == "anchor":
        pairs = [(anchor, s) for s in seeds if s != anchor]
    else:
        pairs = list(itertools.combinations(sorted(seeds), 2))
    rotations = {}
    work = [(p, site) for p in pairs for site in sites]
    for (sa, sb), site in tqdm(work, desc="rotations (pair, site)", disable=not show_progress):
        rotations[(sa, sb, site)] = fit_rotation(acts["fit"][sb][site], acts["fit"][sa][site],
                                                 group=str(a.group),
                                                 precision=str(a.fit_precision))

    missing: list[str] = []
    saes: dict[int, dict[str, Any]] = {s: {} for s in seeds}
    cid = None
    if cfg.get("sae") is not None:
        cid = config_id(SAETrainConfig.from_dict(OmegaConf.to_container(cfg.sae, resolve=True)))
        for seed in seeds:
            for site in sites:
                folder = runs[seed].sae_dir(site, cid)
                if not (folder / "cfg.json").is_file():
                    missing.append(f"seed {seed}: no SAE {cid} at {site} ({folder})")
                    continue
                try:
                    saes[seed][site] = load_sae(folder)
                except Exception as err:  # noqa: BLE001 - recorded and reported as partial
                    missing.append(f"seed {seed}: unreadable SAE at {folder}: {err}")
    for m in missing:
        log.warning("missing: %s", m)
    return AnalysisContext(
        experiment=str(cfg.name), experiment_dir=experiment_dir, out_dir=out_dir,
        family=family, anchor=anchor, seeds=seeds, runs=runs, models=models,
        run_configs=configs, sites=sites, pairs=pairs, batches=batches, acts=acts,
        rotations=rotations, saes=saes, sae_config_id=cid, group=str(a.group),
        score_on=str(a.score_on), batch_size=batch_size, fit_precision=str(a.fit_precision),
        missing=missing, show_progress=show_progress, train_command=train_command(cfg))
