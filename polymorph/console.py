"""A clean terminal: each log line once, library tips and known-harmless warnings silenced.

Imported by Hydra's logging config (``conf/hydra/default.yaml``) before any job runs, so it
imports nothing heavy. What it silences, and why each is harmless here:

* Lightning's "💡 Tip: ... litlogger" line, printed by every Trainer (one per SAE): an
  advertisement, not information about the run;
* Lightning's own console handler on the ``lightning`` logger: under Hydra the root logger
  already prints (and files) every record, so each Lightning line appeared twice;
* ``isinstance(treespec, LeafSpec)`` deprecation: raised inside Lightning by newer torch, not by
  polymorph code;
* "Your `IterableDataset` has `__len__` defined": the warning is about multi-process loading;
  polymorph's SAE minibatch stream is iterated in the main process (``num_workers=0``).

:class:`ConsoleFilter` keeps the repeated per-Trainer notices (accelerator availability, "fit
stopped: max_steps reached") out of the terminal; the job's log file still has them.
"""

from __future__ import annotations

import logging
import re
import warnings

#: messages dropped at the source (never useful, in the terminal or the log file)
SOURCE_FILTERED = (re.compile(r"Tip: .*litlogger"),)
#: warnings known to be harmless here (see the module docstring)
HARMLESS_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
                     r".*Your `IterableDataset` has `__len__` defined.*")
#: lines repeated by every Trainer: kept in the log file, not shown in the terminal
CONSOLE_FILTERED = (re.compile(r"^(GPU|TPU|HPU) available: "),
                    re.compile(r"^`Trainer\.fit` stopped: `max_steps=\d+` reached"),
                    re.compile(r"^Seed set to \d+$"))
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero", "lightning.pytorch", "lightning.fabric")


class _DropAtSource(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in SOURCE_FILTERED)


class ConsoleFilter(logging.Filter):
    """For the terminal handler: drops the notices every Trainer repeats."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in CONSOLE_FILTERED)


_DROP = _DropAtSource()


def quiet_libraries() -> None:
    """Silence library tips and known-harmless warnings, and stop Lightning printing each line
    a second time (idempotent; call before Lightning builds a Trainer)."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP not in logger.filters:
            logger.addFilter(_DROP)
    import sys

    if "lightning" in sys.modules or _importable("lightning"):
        import lightning  # noqa: F401 - its import adds the console handler removed below

        root_prints = logging.getLogger().hasHandlers()
        top = logging.getLogger("lightning")
        for handler in list(top.handlers):
            if root_prints and type(handler) is logging.StreamHandler:
                top.removeHandler(handler)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
