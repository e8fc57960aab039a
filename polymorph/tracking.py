"""Experiment tracking: build the configured Lightning logger, and always close W&B runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_logger(logger_cfg: DictConfig | None, save_dir: Path, run_name: str, job_type: str):
    """Instantiate ``logger_cfg`` (a ``_target_`` node) into the run's log folder, or ``False``."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return False
    save_dir.mkdir(parents=True, exist_ok=True)
    target = str(logger_cfg["_target_"])
    extra = {"save_dir": str(save_dir)}
    if target.endswith("WandbLogger"):
        extra.update(name=run_name, job_type=job_type)
        if os.environ.get("WANDB_MODE") is None and logger_cfg.get("offline", False):
            # Keep wandb's own child processes offline as well.
            os.environ["WANDB_MODE"] = "offline"
    return instantiate(logger_cfg, **extra)


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

    Does nothing when the configured logger is not W&B or W&B is disabled.
    """

    def __init__(self, cfg: DictConfig, out_dir: Path) -> None:
        self.run = None
        logger_cfg = cfg.get("logger")
        if not logger_cfg or not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
            return
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("offline" if logger_cfg.get("offline") else None)
        if mode == "disabled":
            return
        self.wandb = wandb
        self.run = wandb.init(
            project=str(logger_cfg.get("project", "polymorph")),
            group=str(cfg.name),
            name="analysis",
            job_type="analyze",
            dir=str(out_dir),
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log_callback(self, name: str, callback, result: dict, figures: list[Path]) -> None:
        if self.run is None:
            return
        wandb = self.wandb
        data = {f"{name}/{k}": v for k, v in callback.scalars(result).items() if v is not None}
        for table, (columns, rows) in callback.tables(result).items():
            data[f"{name}/{table}"] = wandb.Table(columns=columns, data=rows)
        for path in figures:
            data[f"{name}/figures/{path.stem}"] = wandb.Image(str(path))
        for hist, values in callback.histograms(result).items():
            data[f"{name}/{hist}"] = wandb.Histogram(values)
        self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
