"""The shared stage's training cost against the per-seed SAEs it is compared with, side by side.

    python benchmarks/shared_stage.py                     # 9 seeds, 100k rows x d 64, x8, TopK
                                                          # k 32, batch 4096, 200 steps, 1 thread
    python benchmarks/shared_stage.py --rows 20000 --steps 50     # a quick look

Each method runs in a fresh process (so each peak resident memory is its own) on the same
random rows: the S per-seed SAEs (``train_sae`` once per seed), the universal SAE (consensus
maps fitted on separate rows, every seed mapped into the pool with ``pool_into_frame``, one
``train_sae`` on the pool) and the crosscoder (``train_crosscoder`` on the S matrices). Same
steps, batch, lr and expansion everywhere. Printed per method: seconds, and the peak resident
memory above the process's memory once its activation matrices exist (the matrices themselves
are listed separately), so "holds the S matrices once" can be read off directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1e6


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KB on Linux


def child(args) -> dict:
    import torch

    from polymorph.align.consensus import fit_consensus
    from polymorph.sae import SAETrainConfig, train_sae
    from polymorph.sae.crosscoder_config import CrosscoderConfig
    from polymorph.sae.crosscoder_train import train_crosscoder
    from polymorph.sae.shared_rows import pool_into_frame

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    acts = {s: torch.randn(args.rows, args.d_in, generator=g) for s in range(args.seeds)}
    matrices_mb = sum(a.numel() * 4 for a in acts.values()) / MB
    sae_cfg = SAETrainConfig.from_dict({
        "architecture": "topk", "expansion": args.expansion, "l1_coefficient": None,
        "k": args.k, "lr": 5e-4, "batch_size": args.batch_size, "steps": args.steps,
        "init_seed": "shared", "shared_init_seed": 0, "data_seed": 0})
    fit = None
    if args.child == "universal":  # separate fit rows, as the stage's fit batch
        fit = [torch.randn(4 * args.d_in * 8, args.d_in, generator=g) for _ in acts]
    baseline = _rss_mb()
    t0 = time.perf_counter()
    if args.child == "saes":
        for seed, x in acts.items():
            train_sae(x, sae_cfg, init_seed=0, hook_name="h", model_name=f"m{seed}",
                      progress_bar=False)
    elif args.child == "universal":
        maps = list(fit_consensus(fit).maps)
        pooled = pool_into_frame(acts, maps, list(range(args.seeds)))
        train_sae(pooled, sae_cfg, init_seed=0, hook_name="h", model_name="universal",
                  progress_bar=False)
    else:
        cc_cfg = CrosscoderConfig(architecture="topk", n_seeds=args.seeds, d_in=args.d_in,
                                  expansion=args.expansion, l1_coefficient=None, k=args.k,
                                  lr=5e-4, batch_size=args.batch_size, steps=args.steps,
                                  init_seed=0, data_seed=0)
        train_crosscoder([acts[s] for s in range(args.seeds)], cc_cfg, progress_bar=False)
    return {"seconds": time.perf_counter() - t0, "matrices_mb": matrices_mb,
            "peak_above_matrices_mb": _rss_mb() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=9)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("saes", "universal", "crosscoder"), default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    passed = list(sys.argv[1:])
    out = {}
    for method in ("saes", "universal", "crosscoder"):
        proc = subprocess.run([sys.executable, __file__, *passed, "--child", method],
                              capture_output=True, text=True, check=True)
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    s = args.seeds
    print(f"{s} seeds, {args.rows} rows x d {args.d_in}, x{args.expansion} "
          f"({args.expansion * args.d_in} latents), TopK k {args.k}, batch {args.batch_size}, "
          f"{args.steps} steps, {args.threads} thread(s); the {s} matrices: "
          f"{out['saes']['matrices_mb']:.0f} MB")
    names = {"saes": f"{s} per-seed SAEs", "universal": "universal SAE (pooled)",
             "crosscoder": "crosscoder"}
    for method, r in out.items():
        print(f"  {names[method]:24s} {r['seconds']:7.1f} s   peak memory above the matrices "
              f"{r['peak_above_matrices_mb']:7.0f} MB")
    base = out["saes"]["seconds"]
    print(f"ratio to the {s} SAEs: universal {out['universal']['seconds'] / base:.2f}, "
          f"crosscoder {out['crosscoder']['seconds'] / base:.2f}")


if __name__ == "__main__":
    main()
