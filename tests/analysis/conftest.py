"""A shared analysis context over the session's smoke runs (seeds 0 and 1)."""

from __future__ import annotations

import pytest

from tests.conftest import compose, smoke_overrides


@pytest.fixture(scope="session")
def smoke_context(smoke_runs, tmp_path_factory):
    from polymorph.analysis.context import build_context

    root, _ = smoke_runs
    out = tmp_path_factory.mktemp("analysis_out")
    cfg = compose(smoke_overrides(root), config_name="analyze")
    return build_context(cfg, root, out, show_progress=False)
