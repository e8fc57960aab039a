"""Wall time of the cross-seed analysis, per stage, on an experiment that has been trained.

    python train.py -m seed=0..8 && python benchmarks/analysis_speed.py            # default experiment
    python benchmarks/analysis_speed.py --root outputs --experiment smoke

Runs ``analyze()`` exactly as analyze.py does (W&B disabled, results written to a temporary
folder so the experiment's own analysis is left alone) and prints the time of the shared
context (activations + rotations) and of every callback, against the 120 s target for the
default 9-seed experiment.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET_SECONDS = 120.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="outputs")
    p.add_argument("--experiment", default="default")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. analysis.pairs=all")
    args = p.parse_args()
    os.environ["WANDB_MODE"] = "disabled"

    from hydra import compose, initialize_config_dir

    from polymorph.analysis.runner import analyze

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(
        config_dir=str(REPO / "conf"), version_base="1.3"
    ):
        cfg = compose(
            "analyze",
            overrides=[
                f"experiment={args.experiment}",
                f"paths.root={Path(args.root).resolve()}",
                f"analysis.output_dir={out}",
                *args.overrides,
            ],
        )
        start = time.perf_counter()
        results, _ = analyze(cfg, show_progress=False)
        total = time.perf_counter() - start
    meta = results["meta"]
    print(f"experiment {args.experiment}: {len(meta['context']['seeds'])} seeds, "
          f"{len(meta['context']['sites'])} sites, {len(meta['context']['pairs'])} pairs")
    for stage, seconds in meta["timings_seconds"].items():
        if stage != "total":
            print(f"  {stage:<18}{seconds:>8.1f} s")
    print(f"  {'total':<18}{total:>8.1f} s   (target {TARGET_SECONDS:.0f} s: "
          f"{total / TARGET_SECONDS:.2f} of it)")


if __name__ == "__main__":
    main()
