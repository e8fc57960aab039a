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
import re
import time
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from polymorph.ablations import Ablation
from polymorph.errors import PolymorphError
from polymorph.instantiation import build
from polymorph.layout import RunLayout
from polymorph.runs import ablation as ablation_of
from polymorph.runs import check_matches_saved, is_secondary_process, output_root
from polymorph.tracking import build_logger, closing_wandb

if TYPE_CHECKING:
    from polymorph.families import ModelFamily

# Lightning, TransformerLens and sae-lens take seconds to import (tens of seconds on a busy
# machine): the checks the config alone allows run before any of them is imported, so a
# misspelt site or stage costs the time Hydra needs to start, not an import of the stack.

log = logging.getLogger(__name__)

STAGES = ("all", "transformer", "sae", "shared")


def check_job_config(cfg: DictConfig) -> None:
    """The checks that need nothing but the config (and no heavy import): stage, seed, and
    residual-stream sites against the model config's depth."""
    if cfg.stage not in STAGES:
        raise PolymorphError(f"stage={cfg.stage} is unknown; use one of {', '.join(STAGES)}")
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PolymorphError(f"seed={seed!r} must be a non-negative integer (sweep with -m "
                             "seed=0..8)")
    check_residual_sites(cfg)
    from polymorph.tracking import check_logger_config

    check_logger_config(cfg.get("logger"))


_RESIDUAL = re.compile(r"^blocks\.\d+\.hook_resid_")


def check_residual_sites(cfg: DictConfig) -> None:
    """Residual-stream site names (``blocks.<l>.hook_resid_<pre|mid|post>``) against the depth in
    ``cfg.model``, without building the model; other hook names are left to the exact check."""
    sites, model = cfg.get("sites"), cfg.get("model")
    if not sites or model is None or model.get("n_layers") is None:
        return
    kinds = ("pre", "post") if model.get("parallel_attn_mlp") else ("pre", "mid", "post")
    residual = [f"blocks.{layer}.hook_resid_{k}" for layer in range(int(model.n_layers))
                for k in kinds]
    unknown = [s for s in sites if _RESIDUAL.match(str(s)) and s not in residual]
    if unknown:
        raise PolymorphError(f"unknown site(s) {list(unknown)}; this model's residual sites are "
                             f"{', '.join(residual)} (any TransformerLens hook name of it works)")


def validate_config(cfg: DictConfig, family: ModelFamily) -> Ablation:
    """Everything the config alone can show, checked before anything is trained or loaded;
    returns the job's ablation (which also refuses ablation keys that would mix folders)."""
    from polymorph.sae.stage import ladder_configs

    check_job_config(cfg)
    family.validate(cfg)
    check_sites_config(cfg, family)
    if cfg.stage in ("all", "sae"):
        ladder_configs(cfg)  # every SAE config and ladder rung, validated
    check_objects_config(cfg)
    return ablation_of(cfg, family)


def check_objects_config(cfg: DictConfig) -> None:
    """The ``_target_`` nodes a job builds later, resolved now: a misspelt class of the trainer,
    data module, training module or a callback fails here rather than after training."""
    for where in ("trainer", "sae_trainer", "data", "training.module"):
        node = OmegaConf.select(cfg, where)
        if node is not None and "_target_" in node:
            _check_target(str(node._target_), where)
    for name, node in (OmegaConf.select(cfg, "training.callbacks") or {}).items():
        if node is not None:
            _check_target(str(node.get("_target_")), f"training.callbacks.{name}")


def _check_target(target: str, where: str) -> None:
    from hydra._internal.utils import _locate

    try:
        _locate(target)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's target
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PolymorphError(f"{where}._target_={target} cannot be imported ({first}); check "
                             f"the class path in the config") from None


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
    start = time.perf_counter()
    check_job_config(cfg)  # before the stack is imported: seconds, not a minute
    from polymorph.console import quiet_libraries
    from polymorph.families import build_family
    from polymorph.parallel import pin_threads
    from polymorph.sae.stage import train_saes_for_run

    quiet_libraries()
    pin_threads(cfg)  # parallel.threads_per_job: the same bits alone or in a sweep
    family = build_family(cfg)
    if cfg.stage == "shared":  # once per experiment, across its seeds: not one seed's job
        from polymorph.sae.shared_stage import train_shared_dictionaries

        return train_shared_dictionaries(cfg, family)
    ablation = validate_config(cfg, family)
    layout = RunLayout.in_folder(ablation.runs_dir(output_root(cfg)), int(cfg.seed))
    if not cfg.get("retrain"):
        check_matches_saved(family.identity, cfg, layout)  # before any logger starts
    layout.root.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    objects: dict = {"layout": layout, "family": family, "ablation": ablation}
    where = f"seed {cfg.seed} [{ablation.display}]"
    with closing_wandb():
        logger = build_logger(cfg.get("logger"), layout.logs, run_name(ablation, cfg.seed),
                              "train", ablation)
        objects["logger"] = logger
        state = "reused" if layout.is_finished() and not cfg.get("retrain") else "trained"
        if cfg.stage in ("all", "transformer"):
            metrics.update(family.obtain(cfg, layout, logger))
        if is_secondary_process():  # a DDP worker: the main process does everything else
            return metrics, objects
        if cfg.stage in ("all", "sae"):
            if not layout.is_finished():
                raise PolymorphError(
                    f"stage=sae needs a finished run, but {layout.root} has none; build it first "
                    f"with: {train_command(cfg, seed=True)} stage=transformer"
                )
            sites = cfg.sites
            if sites is None:
                sites = job_sites(cfg, family.load(layout, "best"))
            trainer = build(cfg.sae_trainer, "sae_trainer") if cfg.get("sae_trainer") else None
            progress = _stage_progress(trainer)
            if progress is not None:
                progress.begin(*_sae_work(cfg, layout, list(sites)))
            try:
                metrics.update(train_saes_for_run(cfg, layout, family, logger, list(sites),
                                                  trainer))
            finally:
                if progress is not None:
                    progress.close()
    if cfg.stage == "sae":
        state = "SAEs"
    log.info("%s: %s in %s, %s%s", where, state, layout.root,
             _format_seconds(time.perf_counter() - start), _best(metrics, family))
    return metrics, objects


def _stage_progress(trainer):
    """The SAE stage's progress bar among the ``sae_trainer`` partial's callbacks, if any."""
    from polymorph.progress import SAEStageProgress

    callbacks = (getattr(trainer, "keywords", None) or {}).get("callbacks") or []
    return next((c for c in callbacks if isinstance(c, SAEStageProgress)), None)


def _sae_work(cfg: DictConfig, layout: RunLayout, sites: list[str]) -> tuple[int, int]:
    """(total steps, number of SAEs) the SAE stage will train (existing SAEs are kept)."""
    from polymorph.sae.config import config_id
    from polymorph.sae.stage import ladder_configs

    todo = [c for c in ladder_configs(cfg) for site in sites
            if cfg.retrain_saes or not (layout.sae_dir(site, config_id(c)) / "metrics.json")
            .is_file()]
    return sum(int(c.steps) for c in todo), len(todo)


def run_name(ablation: Ablation, seed: int) -> str:
    """The W&B run name of a seed's job: its ablation and seed."""
    return f"seed={seed}" if not ablation.label else f"{ablation.label} seed={seed}"


def train_command(cfg: DictConfig, seed: bool = False) -> str:
    """The ``python train.py ...`` command of this job (its overrides), without the seed unless
    ``seed``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task
                     if seed or o.split("=", 1)[0].lstrip("+~") != "seed"]
    except (ImportError, ValueError):
        overrides = [f"name={cfg.name}"] + ([f"seed={cfg.seed}"] if seed else [])
    if seed and not any(o.split("=", 1)[0].lstrip("+~") == "seed" for o in overrides):
        overrides.append(f"seed={cfg.seed}")
    return " ".join(["python train.py", *overrides])


def _best(metrics: dict, family: ModelFamily) -> str:
    key = f"best/{family.rank_metric}" if family.rank_metric else None
    if key and metrics.get(key) is not None:
        step = metrics.get("best_step")
        return f"; best {family.rank_metric} {metrics[key]:.4f}" + (
            f" at step {step}" if step is not None else "")
    return ""


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
