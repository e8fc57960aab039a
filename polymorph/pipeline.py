"""train(cfg): one seed's job: obtain the seed's model through its family, then its SAEs.

The model family (``family=dyck`` trains the toy; ``family=pretrained`` resolves and records
published checkpoints) owns everything that differs between kinds of models; this module only
checks the whole config first, so a mistake costs seconds rather than a trained transformer,
and runs the two stages.

Idempotent and resumable: a finished run (``metrics.json`` present) is never rebuilt unless
``retrain=true``; an interrupted one resumes from its last checkpoint; existing SAE folders are
kept unless ``retrain_saes=true``.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from polymorph.errors import PolymorphError
from polymorph.families import ModelFamily, build_family
from polymorph.instantiation import build
from polymorph.runs import run_layout
from polymorph.sae.stage import ladder_configs, train_saes_for_run
from polymorph.tracking import build_logger, closing_wandb

log = logging.getLogger(__name__)

STAGES = ("all", "transformer", "sae", "shared")


def validate_config(cfg: DictConfig, family: ModelFamily) -> None:
    """Everything the config alone can show, checked before anything is trained or loaded."""
    if cfg.stage not in STAGES:
        raise PolymorphError(f"stage={cfg.stage} is unknown; use one of {', '.join(STAGES)}")
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PolymorphError(f"seed={seed!r} must be a non-negative integer (sweep with -m "
                             "seed=0..8)")
    family.validate(cfg)
    check_sites_config(cfg, family)
    if cfg.stage in ("all", "sae"):
        ladder_configs(cfg)  # every SAE config and ladder rung, validated


def check_sites_config(cfg: DictConfig, family: ModelFamily) -> list[str] | None:
    """``cfg.sites`` against the hook names the family knows from config alone."""
    sites = cfg.get("sites")
    if sites is not None and len(sites) == 0:
        raise PolymorphError("sites=[] is empty: give at least one hook name, or sites=null for "
                             "every residual site of the model")
    known = family.available_sites(cfg)
    if known is None or sites is None:
        return None if sites is None else list(sites)
    unknown = [s for s in sites if s not in known]
    if unknown:
        resid = [k for k in known if "hook_resid" in k]
        raise PolymorphError(f"unknown site(s) {unknown}; this model's residual sites are "
                             f"{', '.join(resid)} (any TransformerLens hook name of it works)")
    return list(sites)


def job_sites(cfg: DictConfig, model) -> list[str]:
    """The sites of this job: ``cfg.sites``, or every distinct residual site of the model."""
    from polymorph.activations import SiteError, check_sites, distinct_residual_sites

    sites = list(cfg.sites) if cfg.get("sites") is not None else distinct_residual_sites(model)
    try:
        check_sites(model, sites)
    except SiteError as err:
        raise PolymorphError(str(err)) from err
    return sites


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run one seed's job as configured; returns (metrics, objects)."""
    family = build_family(cfg)
    if cfg.stage == "shared":  # once per experiment, across its seeds: not one seed's job
        from polymorph.sae.shared_stage import train_shared_dictionaries

        return train_shared_dictionaries(cfg, family)
    validate_config(cfg, family)
    layout = run_layout(cfg)
    layout.root.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    objects: dict = {"layout": layout, "family": family}
    with closing_wandb():
        logger = build_logger(cfg.get("logger"), layout.logs, f"seed={cfg.seed}", "train")
        objects["logger"] = logger
        if cfg.stage in ("all", "transformer"):
            metrics.update(family.obtain(cfg, layout, logger))
        if cfg.stage in ("all", "sae"):
            if not layout.is_finished():
                raise PolymorphError(
                    f"stage=sae needs a finished run, but {layout.root} has none; build it first "
                    f"with: python train.py seed={cfg.seed} name={cfg.name} stage=transformer "
                    "(plus the overrides it was configured with)"
                )
            sites = cfg.sites
            if sites is None:
                sites = job_sites(cfg, family.load(layout, "best"))
            trainer = build(cfg.sae_trainer, "sae_trainer") if cfg.get("sae_trainer") else None
            metrics.update(train_saes_for_run(cfg, layout, family, logger, list(sites), trainer))
    return metrics, objects
