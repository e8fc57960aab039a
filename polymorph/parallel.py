"""How many seeds of a sweep run side by side, and with how many threads each.

``python train.py -m seed=0..8`` launches its jobs with ``hydra/launcher=parallel``
(conf/hydra/launcher/parallel.yaml: Hydra's joblib launcher, one process per job). Its
``n_jobs`` comes from ``parallel.jobs`` through the ``polymorph.parallel_jobs`` resolver below,
and every job (a single run too) sets torch to ``parallel.threads_per_job`` threads. On two
cores two one-thread processes train faster than one two-thread process (docs/benchmarks.md),
and a seed's weights are the same bits whether it ran alone or in a sweep.

``hydra/launcher=basic`` runs the seeds one after another in one process, as before.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

RESOLVER = "polymorph.parallel_jobs"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a cluster's cgroup or
    ``taskset`` narrows), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer (or jobs=auto)")
    return value


def parallel_jobs(jobs="auto", threads_per_job=1, cores: int | None = None,
                  warn: bool = True) -> int:
    """The number of jobs to run at once: ``auto`` uses every usable core at
    ``threads_per_job`` threads each (at least one job); a number is taken as given, with a
    warning that says what it costs when the jobs want more threads than there are cores."""
    cores = usable_cores() if cores is None else cores
    threads = _positive_int(threads_per_job, "parallel.threads_per_job")
    if jobs == "auto":
        return max(1, cores // threads)
    n = _positive_int(jobs, "parallel.jobs")
    if n * threads > cores and warn:
        log.warning(
            "parallel.jobs=%d x parallel.threads_per_job=%d = %d threads on %d usable cores: "
            "the jobs share cores, so each seed runs about %.1fx slower than alone and the sweep "
            "gains nothing over parallel.jobs=auto (%d), while holding %d seeds in memory at once",
            n, threads, n * threads, cores, n * threads / cores, max(1, cores // threads), n)
    return n


def register_resolver() -> None:
    """Make ``${polymorph.parallel_jobs:jobs,threads}`` available to configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, parallel_jobs)


#: launchers whose jobs share this machine's cores (submitit sizes its jobs by cpus_per_task)
SIDE_BY_SIDE = ("parallel", "joblib")


def pin_threads(cfg) -> int | None:
    """Set torch to ``parallel.threads_per_job`` intra-op threads for this job, a single run
    included: a seed's weights are bit-identical only at the same thread count (reductions
    split differently: 1 and 2 threads differ by ~1e-3 after 100 steps), so the count is
    pinned, not left to the machine, and run.json records it. In a side-by-side sweep each job
    also gets its own terminal row for its progress bars. Returns the count (None without a
    ``parallel`` section)."""
    node = cfg.get("parallel")
    if node is None:
        return None
    import torch

    threads = _positive_int(node.get("threads_per_job", 1), "parallel.threads_per_job")
    torch.set_num_threads(threads)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        side_by_side = hydra_cfg.mode == RunMode.MULTIRUN \
            and hydra_cfg.runtime.choices.get("hydra/launcher") in SIDE_BY_SIDE
    except (ImportError, ValueError):  # not inside a Hydra app
        side_by_side = False
    jobs = parallel_jobs(node.get("jobs", "auto"), threads, warn=False) if side_by_side else 1
    if jobs > 1:
        from polymorph.progress import ROW_ENV

        os.environ[ROW_ENV] = str(int(hydra_cfg.job.num) % jobs)
    return threads
