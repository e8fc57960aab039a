"""Which worker runs which test file under pytest-xdist.

pytest-xdist builds a session fixture once per worker that uses it, and a module fixture once
per worker that runs a test of that module. So every test file is one unit of work (as
``--dist=loadfile``: its module fixtures are built once), and every file that needs one of the
costly session fixtures joins one unit (each costly fixture is built once per run).

xdist's own ``--dist=loadgroup`` would do this from ``xdist_group`` marks, but it passes the
group by appending it to node ids, which pytest 9.2's structured node ids ignore
(pytest-dev/pytest-xdist#1386): the marks are silently dropped. The controller, which
schedules, never collects, so it decides from file paths: a file is in the costly unit when its
text names a costly fixture. The workers, which do collect, check that every test whose fixture
closure includes one is in such a file (:func:`check_costly_files`).
"""

from __future__ import annotations

import re
from pathlib import Path

# Session fixtures that train or analyse for more than a few seconds (tests/conftest.py). A new
# one belongs here; a fixture built on one of these needs no entry (its users are checked).
COSTLY_FIXTURES = frozenset({"smoke_runs", "smoke_context", "smoke_analysis", "shared_runs",
                             "lm_runs", "lm_context", "lm_analysis"})
COSTLY_UNIT = "costly-session-fixtures"
# Units handed out first, longest first, so that the long ones do not start last on one worker
# while the other sits idle (xdist's own order is by number of tests). Each of these files
# starts processes of its own or runs the entry points several times. Only the wall time
# depends on this list; a file missing from it, or listed but gone, changes nothing else.
LONG_UNITS = (COSTLY_UNIT, "tests/cli/test_ablations.py", "tests/cli/test_cli.py",
              "tests/training/test_ddp.py", "tests/benchmarks/test_time_to_accuracy.py")
_NAMES = re.compile(r"\b(" + "|".join(sorted(COSTLY_FIXTURES)) + r")\b")


def costly_files(rootdir: Path, tests_dir: str = "tests") -> frozenset[str]:
    """Root-relative paths of the test files whose text names a costly fixture."""
    found = set()
    for path in sorted((rootdir / tests_dir).rglob("test_*.py")):
        if _NAMES.search(path.read_text(encoding="utf-8")):
            found.add(path.relative_to(rootdir).as_posix())
    return frozenset(found)


def unit_of(nodeid: str, costly: frozenset[str]) -> str:
    """The unit of work of a test: the costly unit, or its own file."""
    path = nodeid.split("::", 1)[0]
    return COSTLY_UNIT if path in costly else path


def check_costly_files(items, costly: frozenset[str]) -> None:
    """Raise if a test needs a costly fixture (directly or through another fixture) but its
    file does not name one, so the scheduler would not know to keep it with the others."""
    import pytest

    missed = sorted({i.nodeid.split("::", 1)[0] for i in items
                     if COSTLY_FIXTURES & set(i.fixturenames)} - costly)
    if missed:
        raise pytest.UsageError(
            f"{', '.join(missed)} use(s) a costly session fixture only through another fixture; "
            f"name one of {sorted(COSTLY_FIXTURES)} in the file (e.g. as a test parameter) or "
            "add the fixture in between to COSTLY_FIXTURES in tests/helpers/xdist_groups.py")


def long_units_first(queue: dict, long_units=LONG_UNITS) -> None:
    """Move the listed units that are still waiting to the front of ``queue`` (an
    OrderedDict of unit -> tests), in the order listed; the rest keep their order."""
    for unit in reversed(long_units):
        if unit in queue:
            queue.move_to_end(unit, last=False)


def file_units(costly: frozenset[str]):
    """xdist's scope scheduler with the units above, the long ones handed out first."""
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid, costly)

        def _assign_work_unit(self, node) -> None:
            long_units_first(self.workqueue)
            super()._assign_work_unit(node)

    return FileUnits


def make_scheduler(config, log, costly: frozenset[str]):
    return file_units(costly)(config, log)
