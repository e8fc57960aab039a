"""Run the align tests on one torch thread.

Everything here is small (d <= 512); on a 2-core machine shared with other jobs, two OpenMP
threads make such ops 10-60x slower (each parallel region waits for a descheduled thread).
"""

from __future__ import annotations

import pytest

from polymorph.align.procrustes import single_threaded


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_threaded():
        yield
