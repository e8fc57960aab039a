"""Wall time of the cross-seed analysis, per stage, on an experiment that has been trained.

    python train.py -m seed=0..8 && python benchmarks/analysis_speed.py            # default experiment
    python benchmarks/analysis_speed.py --root outputs --experiment smoke
    python benchmarks/analysis_speed.py --compare                                 # the 2x budget
    python benchmarks/analysis_speed.py --compare --root /tmp/smoke_root --experiment smoke
    python benchmarks/analysis_speed.py --compare --keep outputs/default/analysis  # keep results

Runs ``analyze()`` exactly as analyze.py does (W&B disabled, results written to a temporary
folder so the experiment's own analysis is left alone) and prints the time of the shared
context (activations + rotations) and of every callback, against the 120 s target for the
default 9-seed experiment.

``--compare`` runs the analysis twice per round in one process, alternating the order between
rounds so drift on a shared machine hits both alike: the full analysis (every interval at
``analysis.n_boot``, the nulls, the ceiling, the near-fixed subspaces, ``spliced_loss``) and a
reference with those pieces switched off by config (``REFERENCE``: the minimum of 100 bootstrap
resamples, no shuffled-pairing null, no matched chance, no ceiling, no near-fixed subspace, no
``spliced_loss``). It prints both per stage and the ratio of the totals, against the budget of 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET_SECONDS = 120.0
BUDGET_RATIO = 2.0
# The same callbacks with every piece added for calibration switched off (or at its minimum).
REFERENCE = [
    "analysis.n_boot=100",
    "analysis.callbacks.universality.chance_trials=0",
    "analysis.callbacks.universality.ceiling=false",
    "analysis.callbacks.sae_transfer.null_shuffles=0",
    "analysis.callbacks.steering.fixed_subspace=false",
    "~analysis.callbacks.spliced_loss",
]


def run_analysis(root: Path, experiment: str, overrides: list[str],
                 keep: Path | None = None) -> tuple[float, dict]:
    """(wall seconds of analyze(), its per-stage timings). ``keep``: write the results there
    (results.json, report.md, figures) instead of into a temporary folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from polymorph.analysis.runner import analyze

    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(
        config_dir=str(REPO / "conf"), version_base="1.3"
    ):
        out = str(keep.resolve()) if keep is not None else tmp
        cfg = compose("analyze", overrides=[f"experiment={experiment}",
                                            f"paths.root={root.resolve()}",
                                            f"analysis.output_dir={out}", *overrides])
        start = time.perf_counter()
        results, _ = analyze(cfg, show_progress=False)
        total = time.perf_counter() - start
    return total, results["meta"]


def single(args) -> None:
    total, meta = run_analysis(Path(args.root), args.experiment, args.overrides, args.keep)
    print(f"experiment {args.experiment}: {len(meta['context']['seeds'])} seeds, "
          f"{len(meta['context']['sites'])} sites, {len(meta['context']['pairs'])} pairs")
    for stage, seconds in meta["timings_seconds"].items():
        if stage != "total":
            print(f"  {stage:<18}{seconds:>8.1f} s")
    print(f"  {'total':<18}{total:>8.1f} s   (target {TARGET_SECONDS:.0f} s: "
          f"{total / TARGET_SECONDS:.2f} of it)")


def compare(args) -> None:
    root = Path(args.root)
    runs: dict[str, list[tuple[float, dict]]] = {"reference": [], "full": []}
    for r in range(args.rounds):
        order = ("reference", "full") if r % 2 == 0 else ("full", "reference")
        for kind in order:
            extra = REFERENCE if kind == "reference" else []
            keep = args.keep if kind == "full" else None
            runs[kind].append(run_analysis(root, args.experiment, [*extra, *args.overrides],
                                           keep))
            print(f"round {r + 1}: {kind:<9} {runs[kind][-1][0]:7.1f} s", flush=True)
    meta = runs["full"][0][1]
    print(f"\nexperiment {args.experiment}: {len(meta['context']['seeds'])} seeds, "
          f"{len(meta['context']['sites'])} sites, {len(meta['context']['pairs'])} pairs; "
          f"median of {args.rounds} round(s), seconds")
    stages = list(dict.fromkeys(s for kind in runs for _, m in runs[kind]
                                for s in m["timings_seconds"] if s != "total"))
    print(f"  {'stage':<18}{'reference':>10}{'full':>10}{'ratio':>8}")
    for stage in stages:
        ref = [m["timings_seconds"].get(stage, 0.0) for _, m in runs["reference"]]
        full = [m["timings_seconds"].get(stage, 0.0) for _, m in runs["full"]]
        a, b = statistics.median(ref), statistics.median(full)
        ratio = f"{b / a:8.2f}" if a > 0 else f"{'-':>8}"
        print(f"  {stage:<18}{a:>10.1f}{b:>10.1f}{ratio}")
    ref_total = statistics.median(t for t, _ in runs["reference"])
    full_total = statistics.median(t for t, _ in runs["full"])
    ratio = full_total / ref_total
    print(f"  {'total':<18}{ref_total:>10.1f}{full_total:>10.1f}{ratio:8.2f}")
    print(f"\nfull / reference = {ratio:.2f} (budget {BUDGET_RATIO:.0f}: "
          f"{'within' if ratio <= BUDGET_RATIO else 'OVER'})")
    print("reference overrides: " + " ".join(REFERENCE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="outputs")
    p.add_argument("--experiment", default="default")
    p.add_argument("--compare", action="store_true",
                   help="full analysis vs the reference without the calibration pieces")
    p.add_argument("--rounds", type=int, default=1, help="--compare rounds (median reported)")
    p.add_argument("--keep", type=Path, default=None,
                   help="write the (full) analysis' results into this folder, e.g. "
                        "outputs/default/analysis, instead of a temporary one")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. analysis.pairs=all")
    args = p.parse_args()
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.compare:
        compare(args)
    else:
        single(args)


if __name__ == "__main__":
    main()
