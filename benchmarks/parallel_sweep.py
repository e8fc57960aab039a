"""A sweep's wall time: its seeds one after another (how ``python train.py -m`` ran before,
one process using every core) against side by side (the default, ``hydra/launcher=parallel``:
one single-thread process per core), the same command and machine, one after the other.

    python benchmarks/parallel_sweep.py                       # 4 seeds x 300 steps, transformers
    python benchmarks/parallel_sweep.py --seeds 2 --steps 50  # quick
    python benchmarks/parallel_sweep.py --extra experiment=smoke

Each sweep trains into its own fresh folder (so nothing is reused), the same overrides plus:
sequential ``hydra/launcher=basic parallel.threads_per_job=<cores>``; parallel nothing (the
defaults). Prints both wall times and the speed-up; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sweep(root: Path, seeds: int, steps: int, extra: list[str], launcher: list[str]) -> float:
    args = [sys.executable, str(REPO / "train.py"), "-m", f"seed=0..{seeds - 1}",
            f"paths.root={root}", "logger=none", "stage=transformer",
            "trainer.enable_progress_bar=false", f"training.max_steps={steps}",
            f"training.schedule_steps={steps}", "name=bench", *extra, *launcher]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)  # each mode sets its own torch threads
    t0 = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--extra", nargs="*", default=[], help="more train.py overrides")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from polymorph.parallel import parallel_jobs, usable_cores

    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        sequential = sweep(Path(tmp) / "sequential", args.seeds, args.steps, args.extra,
                           ["hydra/launcher=basic", f"parallel.threads_per_job={cores}"])
        side_by_side = sweep(Path(tmp) / "parallel", args.seeds, args.steps, args.extra, [])
    result = {
        "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": cores, "parallel_jobs": parallel_jobs(), "seeds": args.seeds,
        "steps": args.steps, "extra": args.extra,
        "sequential_seconds": round(sequential, 1), "parallel_seconds": round(side_by_side, 1),
        "speedup": round(sequential / side_by_side, 3),
    }
    print(f"{args.seeds} seeds x {args.steps} steps on {cores} cores: sequential "
          f"({cores} threads, one process) {sequential:.1f} s, side by side "
          f"({result['parallel_jobs']} x 1 thread) {side_by_side:.1f} s: "
          f"speed-up {result['speedup']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
