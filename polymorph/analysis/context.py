"""Everything the analysis callbacks share, computed once per analysis.

* the experiment's finished seeds and their best checkpoints;
* activations of every seed at every site on a fixed *fit* batch and a separate
  held-out *eval* batch (the same token sequences for every seed, so rows align);
* one rotation per (pair, site), fitted on the fit batch (``analysis.group``);
* every seed's SAE per site (the SAE config of this analysis' ``sae`` settings).

Pair convention: ``(a, b)`` maps seed ``b``'s activations into seed ``a``'s
frame (``rotation.apply(acts[b]) ~ acts[a]``); with ``analysis.pairs=anchor``,
``a`` is always the anchor.
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

from polymorph.activations import SiteError, check_sites, collect_activations
from polymorph.align.procrustes import Rotation, fit_rotation
from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout, find_seed_runs
from polymorph.token_batches import batch_tokens, is_pretrained, position_mask

log = logging.getLogger(__name__)

PAIR_MODES = ("anchor", "all")
SCORE_ON = ("eval", "fit")
# Saved-config sections that must agree for seeds to be comparable at all.
COMPARABLE_KEYS = ("model", "io")


@dataclass
class AnalysisContext:
    cfg: DictConfig
    experiment_dir: Path
    out_dir: Path
    anchor: int
    seeds: list[int]
    runs: dict[int, RunLayout]
    models: dict[int, Any]
    run_configs: dict[int, DictConfig]
    sites: list[str]
    pairs: list[tuple[int, int]]
    tokens: dict[str, torch.Tensor]  # "fit" / "eval" -> [n_sequences, length]
    masks: dict[str, torch.Tensor]  # "fit" / "eval" -> which positions give activation rows
    acts: dict[str, dict[int, dict[str, torch.Tensor]]]  # batch -> seed -> site -> [n, d]
    rotations: dict[tuple[int, int, str], Rotation]
    saes: dict[int, dict[str, Any]]  # seed -> site -> polymorph.sae.io.SavedSAE
    sae_config_id: str | None
    group: str
    score_on: str
    missing: list[str] = field(default_factory=list)  # what could not be analysed, and why
    show_progress: bool = True

    @property
    def score_batch(self) -> str:
        """The batch every score is computed on: 'eval' (held out) unless score_on=fit."""
        return "fit" if self.score_on == "fit" else "eval"

    def scoring_acts(self, seed: int, site: str) -> torch.Tensor:
        return self.acts[self.score_batch][seed][site]

    def collect(self, model, batch: str, sites: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Activations of any model on the context's ``batch`` ("fit" / "eval"), rows aligned
        with ``acts[batch]`` (same tokens, same kept positions)."""
        return collect_activations(model, self.tokens[batch], list(sites or self.sites),
                                   batch_size=self.batch_size, mask=self.masks[batch])

    @property
    def batch_size(self) -> int:
        return int(self.cfg.analysis.get("batch_size") or 512)

    @property
    def pretrained(self) -> bool:
        return is_pretrained(self.cfg)

    def rotation(self, a: int, b: int, site: str) -> Rotation:
        """The rotation mapping seed b's activations into seed a's frame at ``site``."""
        return self.rotations[(a, b, site)]

    def progress(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.show_progress, **kwargs)

    def description(self) -> dict:
        return {
            "anchor": self.anchor,
            "seeds": self.seeds,
            "pairs": [list(p) for p in self.pairs],
            "pair_convention": "(a, b): seed b's activations mapped into seed a's frame",
            "sites": self.sites,
            "group": self.group,
            "score_on": self.score_on,
            "scored_batch": self.score_batch,
            "fit_rows": int(self.acts["fit"][self.anchor][self.sites[0]].shape[0]),
            "eval_rows": int(self.acts["eval"][self.anchor][self.sites[0]].shape[0]),
            "sae_config_id": self.sae_config_id,
        }


def _finished_runs(cfg: DictConfig, root: Path) -> dict[int, RunLayout]:
    runs = find_seed_runs(root, str(cfg.name))
    found = sorted(runs)
    finished = {s: r for s, r in runs.items() if r.is_finished()}
    wanted = cfg.analysis.seeds
    if wanted is not None:
        wanted = [int(s) for s in wanted]
        absent = [s for s in wanted if s not in finished]
        if absent:
            raise PolymorphError(
                f"analysis.seeds asks for seeds {absent}, which have no finished run in "
                f"{root / str(cfg.name)} (finished: {sorted(finished) or 'none'}); train them with "
                f"python train.py -m seed=... name={cfg.name}"
            )
        finished = {s: finished[s] for s in wanted}
    if not finished:
        raise PolymorphError(
            f"no finished seeds in {root / str(cfg.name)} (seed folders found: {found or 'none'}); "
            f"train some first: python train.py -m seed=0..8 experiment={cfg.name}"
        )
    if len(finished) < 2:
        raise PolymorphError(
            f"only seed {sorted(finished)} is finished in {root / str(cfg.name)}: a cross-seed "
            f"analysis needs at least two; train more with python train.py -m seed=0..8 "
            f"experiment={cfg.name}"
        )
    return dict(sorted(finished.items()))


def _comparable(config: DictConfig, key: str):
    value = OmegaConf.to_container(config[key], resolve=True)
    if key == "model" and is_pretrained(config) and isinstance(value, dict):
        value.pop("model_id", None)  # each PolyPythia seed is its own repository
    return value


def _check_comparable(configs: dict[int, DictConfig]) -> None:
    first_seed = next(iter(configs))
    for key in COMPARABLE_KEYS:
        ref = _comparable(configs[first_seed], key)
        differing = [s for s, c in configs.items() if _comparable(c, key) != ref]
        if differing:
            raise PolymorphError(
                f"runs disagree on `{key}`: seed {first_seed} has {ref}, seeds {differing} differ; "
                f"analyse comparable seeds only (analysis.seeds=[...]) or retrain them alike"
            )


def build_context(cfg: DictConfig, root: Path, out_dir: Path, show_progress: bool = True) -> AnalysisContext:
    from polymorph.pipeline import load_run_model
    from polymorph.sae import SAETrainConfig, config_id
    from polymorph.sae.io import load_sae

    a = cfg.analysis
    if a.pairs not in PAIR_MODES:
        raise PolymorphError(f"analysis.pairs={a.pairs} is unknown; use one of {PAIR_MODES}")
    if a.score_on not in SCORE_ON:
        raise PolymorphError(f"analysis.score_on={a.score_on} is unknown; use one of {SCORE_ON}")
    if a.group not in ("O", "SO"):
        raise PolymorphError(f"analysis.group={a.group} is unknown; use O or SO")
    runs = _finished_runs(cfg, root)
    anchor = int(a.anchor)
    if anchor not in runs:
        raise PolymorphError(
            f"anchor seed {anchor} has no finished run in {root / str(cfg.name)} (finished seeds: "
            f"{sorted(runs)}); pick one with analysis.anchor=<seed>"
        )
    seeds = [anchor] + [s for s in runs if s != anchor]
    models, configs = {}, {}
    for seed in seeds:
        models[seed], configs[seed] = load_run_model(runs[seed], "best")
    _check_comparable(configs)
    sites = [str(s) for s in cfg.sites]
    try:
        check_sites(models[anchor], sites)
    except SiteError as err:
        raise PolymorphError(str(err)) from err

    experiment_dir = root / str(cfg.name)
    tokenizer = getattr(models[anchor], "tokenizer", None)
    specs = {"fit": a.fit_batch, "eval": a.eval_batch}
    tokens = {name: batch_tokens(cfg, spec, experiment_dir, tokenizer) for name, spec in specs.items()}
    masks = {name: position_mask(cfg, tokens[name], specs[name]) for name in specs}
    if is_pretrained(cfg):
        _check_disjoint(cfg, specs)
    batch_size = int(a.get("batch_size") or 512)
    acts: dict[str, dict[int, dict[str, torch.Tensor]]] = {"fit": {}, "eval": {}}
    for seed in tqdm(seeds, desc="activations", disable=not show_progress):
        for name in ("fit", "eval"):
            acts[name][seed] = collect_activations(
                models[seed], tokens[name], sites, batch_size=batch_size, mask=masks[name]
            )

    if a.pairs == "anchor":
        pairs = [(anchor, s) for s in seeds if s != anchor]
    else:
        pairs = list(itertools.combinations(sorted(seeds), 2))
    rotations = {}
    work = [(p, site) for p in pairs for site in sites]
    for (sa, sb), site in tqdm(work, desc="rotations (pair, site)", disable=not show_progress):
        rotations[(sa, sb, site)] = fit_rotation(
            acts["fit"][sb][site],
            acts["fit"][sa][site],
            group=str(a.group),
            precision=str(a.get("fit_precision", "float64")),
        )

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
        cfg=cfg,
        experiment_dir=experiment_dir,
        out_dir=out_dir,
        anchor=anchor,
        seeds=seeds,
        runs=runs,
        models=models,
        run_configs=configs,
        sites=sites,
        pairs=pairs,
        tokens=tokens,
        masks=masks,
        acts=acts,
        rotations=rotations,
        saes=saes,
        sae_config_id=cid,
        group=str(a.group),
        score_on=str(a.score_on),
        missing=missing,
        show_progress=show_progress,
    )


def _check_disjoint(cfg: DictConfig, specs: dict) -> None:
    """Corpus slices for SAE training, fitting and scoring must not overlap (held-out scores)."""
    spans = {"SAE training (activations)": cfg.activations, **{f"analysis.{k}_batch": v for k, v in specs.items()}}
    ranges = {}
    for name, spec in spans.items():  # token ranges of the packed stream
        start, n, length = int(spec.get("offset", 0)), int(spec.n_sequences), int(spec.seq_len)
        ranges[name] = (start * length, (start + n) * length)
    items = list(ranges.items())
    for i, (na, (a0, a1)) in enumerate(items):
        for nb, (b0, b1) in items[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise PolymorphError(
                    f"corpus slices overlap: {na} reads tokens {a0}..{a1 - 1} of the packed "
                    f"stream, {nb} reads {b0}..{b1 - 1}; give them disjoint offsets (offset counts "
                    f"windows of seq_len tokens) so every score is held out"
                )
