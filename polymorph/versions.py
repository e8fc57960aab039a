"""The library versions a result depends on: recorded in every run, SAE and analysis."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("polymorph", "torch", "lightning", "hydra-core", "transformer-lens", "sae-lens",
            "transformers", "numpy", "scipy")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Python and each package's installed version ("unknown" when a package is absent)."""
    out = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out
