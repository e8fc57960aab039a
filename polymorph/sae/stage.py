"""The SAE stage of a seed's job: activations at every site, then one SAE per site.

SAE folders are named by site and SAE config id, so different SAE configs
(``sae.expansion=8,32``, ``sae=topk``, ...) live side by side and never overwrite
each other; an existing SAE is kept unless ``retrain_saes=true``.

An SAE *ladder* (the config group ``sae_ladder``, absent by default) trains several SAE
configs per site in one job: each rung is a partial SAE config merged over ``cfg.sae``
(``conf/sae_ladder/sparsity.yaml``: ReLU+L1 at several L1 values and TopK at several k).
The activations are collected once per job and shared by every rung.

The stage is written once for every model family: the run's model and its token batch come
from the family object the job passes in.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout
from polymorph.sae.cache import cached_activations
from polymorph.sae.config import SAETrainConfig, config_id, resolve_init_seed
from polymorph.sae.evaluate import evaluate_sae
from polymorph.sae.io import save_sae
from polymorph.sae.train import train_sae

log = logging.getLogger(__name__)


def ladder_configs(cfg: DictConfig) -> list[SAETrainConfig]:
    """The SAE configs this job trains: ``cfg.sae`` alone, or every rung of ``cfg.sae_ladder``.

    A rung is a partial SAE config merged over ``cfg.sae`` (so ``{l1_coefficient: 0.1}`` or
    ``{architecture: topk, k: 8, l1_coefficient: null}``). Every rung is validated before any
    training starts; a bad rung raises PolymorphError naming the rung.
    """
    base = OmegaConf.to_container(cfg.sae, resolve=True)
    ladder = cfg.get("sae_ladder")
    if ladder is None:
        try:
            return [SAETrainConfig.from_dict(base)]
        except ValueError as err:
            raise PolymorphError(f"bad SAE config: {err}") from err
    rungs = OmegaConf.to_container(ladder, resolve=True).get("rungs")
    if not isinstance(rungs, list) or not rungs:
        raise PolymorphError(
            "sae_ladder needs a non-empty list `rungs` of partial SAE configs "
            "(see conf/sae_ladder/sparsity.yaml)"
        )
    configs: list[SAETrainConfig] = []
    seen: dict[str, int] = {}
    for i, rung in enumerate(rungs):
        if not isinstance(rung, dict):
            raise PolymorphError(
                f"sae_ladder rung {i} must be a mapping of SAE config keys, got {rung!r}"
            )
        try:
            sae_cfg = SAETrainConfig.from_dict({**base, **rung})
        except ValueError as err:
            raise PolymorphError(f"bad sae_ladder rung {i} {rung}: {err}") from err
        cid = config_id(sae_cfg)
        if cid in seen:
            raise PolymorphError(
                f"sae_ladder rungs {seen[cid]} and {i} give the same SAE config ({cid}); "
                "drop one of them"
            )
        seen[cid] = i
        configs.append(sae_cfg)
    return configs


def train_saes_for_run(cfg: DictConfig, layout: RunLayout, family, logger, sites: list[str],
                       trainer=None) -> dict:
    """Every configured SAE (one config, or each rung of the ladder) at every site of a
    finished run; existing SAEs are kept unless ``retrain_saes=true``.

    ``family`` is the job's model family (it loads the run's model and builds its token
    batch); ``trainer`` a partial ``lightning.Trainer`` for the SAEs (``sae_trainer``).
    """
    configs = ladder_configs(cfg)
    laddered = cfg.get("sae_ladder") is not None
    todo = [
        (sae_cfg, site)
        for sae_cfg in configs
        for site in sites
        if cfg.retrain_saes
        or not (layout.sae_dir(site, config_id(sae_cfg)) / "metrics.json").is_file()
    ]
    summary: dict = {}
    acts = None
    if todo:
        model = family.load(layout, "best")
        spec = cfg.activations
        batch = family.token_batch(spec, layout.root.parent, model)
        identity = {**family.batch_identity(spec), "checkpoint": family.final_label(layout)}
        acts = cached_activations(
            layout, model, batch.tokens, batch.mask, sorted({s for _, s in todo}), identity,
            dtype=str(spec.get("dtype", "float32")), batch_size=int(spec.batch_size),
            progress=bool(cfg.trainer.get("enable_progress_bar", True)))
    model_name = family.sae_model_name(cfg)
    for sae_cfg in configs:
        summary.update(_train_config(cfg, layout, logger, sae_cfg, sites, todo, acts, laddered,
                                     model_name, trainer))
    return summary


def _train_config(cfg, layout, logger, sae_cfg, sites, todo, acts, laddered: bool,
                  model_name: str, trainer) -> dict:
    cid = config_id(sae_cfg)
    init_seed = resolve_init_seed(sae_cfg, int(cfg.seed))
    summary: dict = {}
    for site in sites:
        folder = layout.sae_dir(site, cid)
        if (sae_cfg, site) not in todo:
            log.info("SAE %s exists: keeping it (retrain_saes=true to redo)", folder)
            continue
        sae, info = train_sae(
            acts[site],
            sae_cfg,
            init_seed=init_seed,
            hook_name=site,
            model_name=model_name,
            progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
            logger=False,
            accelerator=str(cfg.trainer.get("accelerator", "cpu")),
            default_root_dir=str(layout.logs),
            trainer=trainer,
        )
        metrics = evaluate_sae(sae, acts[site])
        metrics["evaluated_on"] = "the stored SAE training activations of this site"
        metrics["train_info"] = info
        metadata = {
            "model_seed": int(cfg.seed),
            "experiment": str(cfg.name),
            "site": site,
            "config_id": cid,
            "init_seed": init_seed,
            "sae_config": sae_cfg.to_dict(),
            "activations": OmegaConf.to_container(cfg.activations, resolve=True),
        }
        save_sae(sae, folder, metadata=metadata, metrics=metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        summary[f"sae/{site}/{cid}"] = scalars
        if logger:
            prefix = f"sae/{site}/{cid}" if laddered else f"sae/{site}"
            logger.log_metrics({f"{prefix}/{k}": v for k, v in scalars.items()})
    return summary
