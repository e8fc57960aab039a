"""Experiment tracking: build the configured Lightning logger, and always close W&B runs.

Every train and analyze run carries its ablation (:mod:`polymorph.ablations`) as flat config
fields (``experiment``, ``ablation``, ``ablation_run``, ``ablation/<key>``, ``job``) and as tags,
so W&B's own grouping and filters work on them, and the report built by
:mod:`polymorph.reports` can group runs by ablation. W&B's end-of-run summary block is switched
off, as are its per-run banners (the run keeps everything; polymorph prints one line per
finished seed instead).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError

if TYPE_CHECKING:
    from polymorph.ablations import Ablation

#: the config field naming a run's job (train / analyze), for report filters
JOB_FIELD = "job"


def is_wandb(logger_cfg: DictConfig | None) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def check_logger_config(logger_cfg: DictConfig | None) -> None:
    """Config-only checks of the logger node, before anything runs."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return
    from hydra._internal.utils import _locate

    try:
        _locate(str(logger_cfg._target_))
    except Exception as err:  # noqa: BLE001 - an unimportable logger class
        raise PolymorphError(f"logger._target_={logger_cfg._target_} cannot be imported "
                             f"({str(err).splitlines()[0] if str(err) else err!r}); use "
                             "logger=wandb, logger=csv or logger=none") from None
    if is_wandb(logger_cfg) and logger_cfg.get("offline") and logger_cfg.get("log_model"):
        raise PolymorphError("logger.offline=true cannot be combined with logger.log_model "
                             "(W&B uploads models); drop log_model or set logger.offline=false")


def wandb_settings():
    """W&B settings of every polymorph run: nothing in the terminal (no offline-mode banner per
    run, no end-of-run summary block); the run itself keeps everything, and W&B's own debug log
    is in the run's folder. polymorph prints one line per finished seed instead."""
    import wandb

    return wandb.Settings(silent=True)


def build_logger(logger_cfg: DictConfig | None, save_dir: Path, run_name: str, job_type: str,
                 ablation: Ablation | None = None):
    """Instantiate ``logger_cfg`` (a ``_target_`` node) into the run's log folder, or ``False``;
    the run is named ``run_name`` and carries ``ablation``'s fields and tags."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return False
    save_dir.mkdir(parents=True, exist_ok=True)
    extra: dict = {"save_dir": str(save_dir)}
    if is_wandb(logger_cfg):
        extra.update(name=run_name, job_type=job_type, settings=wandb_settings())
        if ablation is not None:
            extra["tags"] = ablation.tags() + [f"{JOB_FIELD}={job_type}"]
        if os.environ.get("WANDB_MODE") is None and logger_cfg.get("offline", False):
            # Keep wandb's own child processes offline as well.
            os.environ["WANDB_MODE"] = "offline"
    logger = instantiate(logger_cfg, **extra)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        # Lightning passes anonymous=None, which W&B warns about on every run; None means unset
        init.pop("anonymous", None)
    if ablation is not None:
        logger.log_hyperparams({**ablation.tracking_fields(), JOB_FIELD: job_type})
    return logger


def log_config(logger, cfg: DictConfig, extra: dict | None = None) -> None:
    if not logger:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    if extra:
        params = {**params, **extra}
    logger.log_hyperparams(params)


@contextlib.contextmanager
def closing_wandb() -> Iterator[None]:
    """Finish any W&B run at the end of a job, so consecutive multirun jobs never merge."""
    try:
        yield
    finally:
        import sys

        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


class AnalysisTracker:
    """W&B logging of an analysis (offline by default): scalars, tables, figures, histograms.

    Per callback: its scalars as ``<callback>/<key>``, one ``wandb.Table`` per table the
    callback gives plus ``<callback>/scalars`` (every scalar as a row), its figures as
    ``<callback>/figures/<name>`` images and its histograms; and the analysis' headline numbers
    (:mod:`polymorph.compare`) as ``headline/<metric>/<site>`` plus one ``headline`` table, the
    keys the W&B report's panels plot. Does nothing when the configured logger is not W&B or
    W&B is disabled.
    """

    def __init__(self, cfg: DictConfig, out_dir: Path, ablation: Ablation | None = None) -> None:
        self.run = None
        logger_cfg = cfg.get("logger")
        if not is_wandb(logger_cfg):
            return
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("offline" if logger_cfg.get("offline") else None)
        if mode == "disabled":
            return
        self.wandb = wandb
        fields = {JOB_FIELD: "analyze", **(ablation.tracking_fields() if ablation else {})}
        tags = (ablation.tags() if ablation else []) + [f"{JOB_FIELD}=analyze"]
        name = "analysis" if ablation is None or not ablation.label else \
            f"analysis {ablation.label}"
        self.run = wandb.init(
            project=str(logger_cfg.get("project", "polymorph")),
            group=str(cfg.name),
            name=name,
            job_type="analyze",
            dir=str(out_dir),
            mode=mode,
            tags=tags,
            config={**OmegaConf.to_container(cfg, resolve=True), **fields},
            reinit="finish_previous",
            settings=wandb_settings(),
        )

    def log_callback(self, name: str, callback, result: dict, figures: list[Path]) -> None:
        if self.run is None:
            return
        wandb = self.wandb
        scalars = {k: v for k, v in callback.scalars(result).items() if v is not None}
        data = {f"{name}/{k}": v for k, v in scalars.items()}
        if scalars:
            data[f"{name}/scalars"] = wandb.Table(columns=["metric", "value"],
                                                  data=[[k, float(v)] for k, v in scalars.items()])
        for table, (columns, rows) in callback.tables(result).items():
            data[f"{name}/{table}"] = wandb.Table(columns=columns, data=rows)
        for path in figures:
            data[f"{name}/figures/{path.stem}"] = wandb.Image(str(path))
        for hist, values in callback.histograms(result).items():
            data[f"{name}/{hist}"] = wandb.Histogram(values)
        self.run.log(data)

    def log_headline(self, rows: list) -> None:
        """The analysis' headline numbers (:class:`polymorph.compare.Headline` rows)."""
        if self.run is None or not rows:
            return
        data = {row.key: row.point for row in rows if row.point is not None}
        data["headline"] = self.wandb.Table(
            columns=["metric", "site", "point", "ci_low", "ci_high", "n_boot", "definition"],
            data=[[r.metric, r.site, r.point, r.ci_low, r.ci_high, r.n_boot, r.definition]
                  for r in rows])
        self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
