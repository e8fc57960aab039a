"""The test scheduler's units: whole files, and one unit for the files of the costly fixtures."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest

from tests.helpers.xdist_groups import (
    COSTLY_UNIT,
    check_costly_files,
    costly_files,
    file_units,
    long_units_first,
    unit_of,
)


def test_files_naming_a_costly_fixture_share_one_unit_and_others_keep_their_own(tmp_path):
    (tmp_path / "tests" / "a").mkdir(parents=True)
    (tmp_path / "tests" / "a" / "test_uses.py").write_text("def test_x(smoke_runs): ...\n")
    (tmp_path / "tests" / "test_other.py").write_text("def test_y(smoke_runs_like): ...\n")
    costly = costly_files(tmp_path)
    assert costly == {"tests/a/test_uses.py"}
    assert unit_of("tests/a/test_uses.py::test_x", costly) == COSTLY_UNIT
    assert unit_of("tests/test_other.py::test_y[1]", costly) == "tests/test_other.py"


def test_a_test_reaching_a_costly_fixture_unnamed_is_refused_with_the_fix():
    item = SimpleNamespace(nodeid="tests/test_z.py::test_z", fixturenames=["wrapper", "lm_runs"])
    with pytest.raises(pytest.UsageError, match="tests/test_z.py.*COSTLY_FIXTURES"):
        check_costly_files([item], frozenset())
    check_costly_files([item], frozenset({"tests/test_z.py"}))  # named: accepted


def test_long_units_are_handed_out_first_in_their_order_and_the_rest_keep_theirs():
    queue = OrderedDict((u, {}) for u in ["a.py", "slow2.py", "b.py", "slow1.py", "c.py"])
    long_units_first(queue, ("slow1.py", "gone.py", "slow2.py"))
    assert list(queue) == ["slow1.py", "slow2.py", "a.py", "b.py", "c.py"]


def test_the_scheduler_sends_the_first_long_unit_waiting():
    """Through xdist's own scheduling class (its worker plumbing left out)."""
    cls = file_units(frozenset())
    sched = cls.__new__(cls)
    sent = []

    class Node:  # hashable, as xdist's WorkerController
        send_runtest_some = staticmethod(sent.append)

    node = Node()
    sched.assigned_work = {}
    sched.registered_collections = {node: ["tests/x.py::t", "tests/cli/test_cli.py::t"]}
    sched.workqueue = OrderedDict([("tests/x.py", {"tests/x.py::t": False}),
                                   ("tests/cli/test_cli.py", {"tests/cli/test_cli.py::t": False})])
    sched._assign_work_unit(node)
    assert sent == [[1]]  # test_cli.py's test, collected second, went first
    sched._assign_work_unit(node)
    assert sent == [[1], [0]]
