"""Reading and guarding run folders: where a job's runs live, their saved configs, which are
finished, and the guard that stops a folder being reused by a config that did not create it.

The file names inside a run folder are in :mod:`polymorph.layout`; what a run *is* (which
config sections define it) is the model family's business
(:meth:`polymorph.families.base.ModelFamily.identity`); which ablation folder a job's runs go
to is :mod:`polymorph.ablations`' (``outputs/<experiment>/<ablation keys>/seed=<N>/``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from polymorph.ablations import PRESENTATION_KEYS, Ablation, derive
from polymorph.errors import PolymorphError
from polymorph.layout import RunLayout, find_seed_runs


def is_secondary_process() -> bool:
    """True in a data-parallel worker that a job's main process launched (Lightning's DDP
    re-runs the entry point for every rank but 0, with ``LOCAL_RANK`` / ``NODE_RANK`` set).

    The main process owns the run folder (its lock, its records, the SAE stage); a secondary
    process only joins the training."""
    import os

    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("LOCAL_RANK", "NODE_RANK"))


def output_root(cfg: DictConfig) -> Path:
    """``paths.root`` as an absolute path (relative paths are taken from the launch folder)."""
    root = Path(str(cfg.paths.root))
    if not root.is_absolute():
        try:
            from hydra.core.hydra_config import HydraConfig

            root = Path(HydraConfig.get().runtime.cwd) / root
        except ValueError:  # not running under @hydra.main (e.g. a test calling train())
            root = Path.cwd() / root
    return root


def experiment_dir(cfg: DictConfig) -> Path:
    return output_root(cfg) / str(cfg.name)


def ablation(cfg: DictConfig, family, for_analysis: bool = False) -> Ablation:
    """The ablation a job's config belongs to (:func:`polymorph.ablations.derive`)."""
    return derive(cfg, family, for_analysis=for_analysis)


def runs_dir(cfg: DictConfig, family) -> Path:
    """The folder holding the ``seed=<N>/`` runs of this config's ablation."""
    return ablation(cfg, family).runs_dir(output_root(cfg))


def run_layout(cfg: DictConfig, family, seed: int | None = None) -> RunLayout:
    """The run folder of ``seed`` (default ``cfg.seed``) in this config's ablation."""
    return RunLayout.in_folder(runs_dir(cfg, family), int(cfg.seed if seed is None else seed))


def read_run_config(layout: RunLayout) -> DictConfig:
    """The resolved config a run was created with (its ``config.yaml``)."""
    if not layout.config.is_file():
        raise PolymorphError(f"{layout.root} has no config.yaml: not a polymorph run folder "
                             "(or a run that never started); train it with python train.py ...")
    try:
        return OmegaConf.load(layout.config)
    except Exception as err:
        raise PolymorphError(f"{layout.config} is unreadable ({type(err).__name__}: {err}); "
                             "delete the run folder or pass retrain=true") from err


def discard_run(layout: RunLayout) -> None:
    """Delete what a run built (records, checkpoints, activations, SAEs; logs are kept)."""
    import shutil

    for path in (layout.final_metrics, layout.run_info, layout.config):
        path.unlink(missing_ok=True)
    for folder in (layout.checkpoints, layout.activations, layout.saes):
        shutil.rmtree(folder, ignore_errors=True)


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts, one per differing leaf.

    A key the saved config lacks and the current one sets to null is no difference: an option
    added since the run was made, switched off (as it was then)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key not in saved and current.get(key) is None:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out


def _without_presentation(identity: dict) -> dict:
    out = dict(identity)
    for key in PRESENTATION_KEYS:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            if not isinstance(node.get(p), dict):
                node = None
                break
            node[p] = dict(node[p])
            node = node[p]
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def check_matches_saved(identity, cfg: DictConfig, layout: RunLayout) -> None:
    """A run folder may only be resumed or reused by the config that created it.

    ``identity`` is the family's :meth:`~polymorph.families.base.ModelFamily.identity`: the
    config sections that define what a run trains; the saved and the current config must give
    the same.
    """
    if not layout.config.is_file():
        return
    saved = _without_presentation(identity(read_run_config(layout)))
    diffs = config_diff(saved, _without_presentation(identity(cfg)))
    if diffs:
        raise PolymorphError(
            f"{layout.root} was trained with a different config ({'; '.join(diffs[:4])}): two "
            f"configs would share one run folder; restore those overrides, drop name= (every "
            f"ablation then gets its own folder) or choose another name=..., or pass "
            f"retrain=true to start over"
        )


def finished_runs(where: Path, wanted: list[int] | None = None, minimum: int = 2,
                  train_command: str | None = None) -> dict[int, RunLayout]:
    """The finished seed runs in the folder ``where`` (all, or the ``wanted`` seeds), by seed.

    Raises a PolymorphError naming the command that trains what is missing when a wanted seed
    is unfinished or fewer than ``minimum`` seeds are finished (``train_command``: the
    ``python train.py ...`` prefix that trains this ablation, without its ``seed=``).
    """
    where = Path(where)
    command = train_command or "python train.py -m"
    runs = find_seed_runs(where)
    finished = {s: r for s, r in runs.items() if r.is_finished()}
    if wanted is not None:
        wanted = [int(s) for s in wanted]
        absent = [s for s in wanted if s not in finished]
        if absent:
            raise PolymorphError(
                f"seeds {absent} have no finished run in {where} (finished: "
                f"{sorted(finished) or 'none'}); train them with {command} "
                f"seed={','.join(map(str, absent))}"
            )
        finished = {s: finished[s] for s in wanted}
    if not finished:
        raise PolymorphError(
            f"no finished seeds in {where} (seed folders found: {sorted(runs) or 'none'}); "
            f"train some first: {command} seed=0..8"
        )
    if len(finished) < minimum:
        raise PolymorphError(
            f"only seed {sorted(finished)} is finished in {where}: a cross-seed analysis needs "
            f"at least {minimum}; train more with {command} seed=0..8"
        )
    return dict(sorted(finished.items()))
