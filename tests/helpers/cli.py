"""Running the entry points as a user does: their own process, offline, no W&B.

A fresh Python process spends ~13 s importing the stack (lightning alone pulls in torchmetrics,
transformers and scipy.signal) before the entry point does anything, and the suite runs the
entry points a few dozen times. So by default ``run`` starts each one as a child of a fork
server that imported the stack once per test worker (multiprocessing's ``forkserver``: a clean,
single-threaded process that never ran a test). The child is a process of its own with the
command's argv, environment and working directory; the script runs as ``__main__``, exits with
its own code and runs its exit handlers, as ``python script.py ...`` would. What it cannot show
is how long a fresh interpreter takes to get to the first line of output: tests of that (the
"fails before anything is imported" checks, a terminal's output) pass ``fresh=True`` for a real
``python script.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers.config import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
# what the fork server imports once: everything the entry points' jobs import on their own
PRELOAD = ["tests.helpers.cli_preload"]

_context: multiprocessing.context.BaseContext | None = None


def run(
    script: str,
    *args: str,
    cwd: Path = REPO,
    check: bool = True,
    env: dict | None = None,
    timeout: int = 600,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in its own process: its exit code and what it printed."""
    env = {**ENV, **(env or {})}
    if fresh:
        proc = subprocess.run(
            [sys.executable, str(REPO / script), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    else:
        proc = _run_forked(str(REPO / script), list(args), Path(cwd), env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _fork_server() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


def start(script: str, *args: str, env: dict | None = None, cwd: Path = REPO):
    """``python <script> <args>`` started as ``run`` starts it, not waited for, discarding its
    output; the child leads a session of its own, so ``os.killpg(child.pid, SIGKILL)`` ends it
    and every process it started (a DDP run's other ranks) at once. Returns the
    ``multiprocessing`` process (``join``, ``exitcode``)."""
    child = _fork_server().Process(
        target=_main,
        args=(str(REPO / script), list(args), str(cwd), {**ENV, **(env or {})}, os.devnull,
              os.devnull, True),
    )
    child.start()
    return child


def _run_forked(
    script: str, args: list[str], cwd: Path, env: dict, timeout: float
) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = _fork_server().Process(
            target=_main, args=(script, args, str(cwd), env, str(out), str(err))
        )
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(
                [script, *args],
                timeout,
                out.read_text(errors="replace"),
                err.read_text(errors="replace"),
            )
        return subprocess.CompletedProcess(
            [sys.executable, script, *args],
            child.exitcode,
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )


def _main(script: str, args: list[str], cwd: str, env: dict, out: str, err: str,
          new_session: bool = False) -> None:
    """In the child: become ``python <script> <args>`` run from ``cwd`` with ``env``."""
    import atexit
    import logging
    import runpy
    import threading

    if new_session:
        os.setsid()
    # the exit handlers the fork server registered are its own (wandb's media folder, for one,
    # is removed by one): the child keeps only logging's, as a fresh interpreter has it
    atexit._clear()
    atexit.register(logging.shutdown)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    # the process's own streams for its whole life: nothing to close
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # the one setting a fresh torch reads from the environment
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        # multiprocessing ends its children with os._exit; a real interpreter's exit first
        # waits for its threads and runs their exit hooks (joblib's worker pool shuts down in
        # one: without it the child waits out the pool's idle timeout), then atexit's handlers
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
