"""Loading a script of benchmarks/ (not a package) as a module, for its tests."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.helpers.config import REPO


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported under the module name ``<name>``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
