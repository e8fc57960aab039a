"""The SAE stage of a seed's job: activations at every site, then one SAE per site.

SAE folders are named by site and SAE config id, so different SAE configs
(``sae.expansion=8,32``, ``sae=topk``, ...) live side by side and never overwrite
each other; an existing SAE is kept unless ``retrain_saes=true``.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout
from polymorph.sae import (
    SAETrainConfig,
    config_id,
    evaluate_sae,
    resolve_init_seed,
    save_sae,
    train_sae,
)

log = logging.getLogger(__name__)


def sae_model_name(cfg: DictConfig) -> str:
    """The ``model_name`` recorded in the SAE's cfg.json: which model's activations it reads."""
    from polymorph.token_batches import is_pretrained

    if is_pretrained(cfg):
        return f"{cfg.model.model_id}@{cfg.model.revision}"
    return f"polymorph-dyck/{cfg.name}/seed={cfg.seed}"


def train_saes_for_run(cfg: DictConfig, layout: RunLayout, logger) -> dict:
    from polymorph.pipeline import load_run_model, run_activations

    try:
        sae_cfg = SAETrainConfig.from_dict(OmegaConf.to_container(cfg.sae, resolve=True))
    except ValueError as err:
        raise PolymorphError(f"bad SAE config: {err}") from err
    cid = config_id(sae_cfg)
    init_seed = resolve_init_seed(sae_cfg, int(cfg.seed))
    todo = [
        site
        for site in cfg.sites
        if cfg.retrain_saes or not (layout.sae_dir(site, cid) / "metrics.json").is_file()
    ]
    summary: dict = {}
    if todo:
        model, _ = load_run_model(layout, "best")
        acts = run_activations(cfg, layout, model)
    for site in cfg.sites:
        folder = layout.sae_dir(site, cid)
        if site not in todo:
            log.info("SAE %s exists: keeping it (retrain_saes=true to redo)", folder)
            continue
        sae, info = train_sae(
            acts[site],
            sae_cfg,
            init_seed=init_seed,
            hook_name=site,
            model_name=sae_model_name(cfg),
            progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
            logger=False,
            accelerator=str(cfg.trainer.get("accelerator", "cpu")),
            default_root_dir=str(layout.logs),
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
            logger.log_metrics({f"sae/{site}/{k}": v for k, v in scalars.items()})
    return summary
