"""The test scheduler's units: whole files, and one unit for the files of the costly fixtures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers.xdist_groups import COSTLY_UNIT, check_costly_files, costly_files, unit_of


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
