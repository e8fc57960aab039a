"""Running the entry points as a user does: a subprocess, offline, no W&B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.config import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def run(script: str, *args: str, cwd: Path = REPO, check: bool = True,
        env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd,
                          env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc
