"""Speed, power and chance figures for polymorph.align.

    python benchmarks/align.py            # speed: 9 seeds x 7 sites at d=512 and 9 x 5 at d=64
    python benchmarks/align.py --quick    # the same on small inputs (a smoke run)
    python benchmarks/align.py --power    # smallest planted fixed block the trace / KS tests see
    python benchmarks/align.py --chance   # chance-level decoder universality at d=64 and d=512

Speed: what is timed is exactly what the analysis does per (seed, site): ``fit_rotation`` on
[n, d] activation matrices, then ``diagnose_many`` (every Haar diagnostic, with per-site pooled
KS) against a Monte-Carlo null that is simulated once per d and reused (its cost is included).
Generating the synthetic activations is not timed. Inputs are realistic rather than white: a
power-law spectrum in a random basis, a non-zero mean with a few large-mean outlier dimensions,
heavy-tailed row norms, and a target that is the source rotated by a Haar Q plus noise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polymorph.align.haar import (
    diagnose,
    diagnose_many,
    haar_null,
    haar_orthogonal,
)
from polymorph.align.procrustes import fit_rotation
from polymorph.align.universality import chance_level

ALPHA = 0.05


def realistic_activations(n: int, d: int, seed: int) -> torch.Tensor:
    """float32 [n, d]: anisotropic, offset, heavy-tailed, like a transformer residual stream."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    basis = haar_orthogonal(d, "O", seed=g).float()
    x = torch.randn(n, d, generator=g) * spectrum
    x = x @ basis
    x *= torch.distributions.Chi2(torch.tensor(4.0)).sample((n, 1)).sqrt() / 2  # heavy tails
    mean = torch.randn(d, generator=g) * 0.5
    mean[:4] += 10.0  # a few outlier dimensions with large means
    return x + mean


def speed(d: int, n: int, n_seeds: int, n_sites: int, null_samples: int, precision: str,
          noise: float = 0.01) -> dict:
    """Time fit + full diagnostics for n_seeds x n_sites pairs at dimension d."""
    haar_null.cache_clear()
    c0 = time.process_time()
    t0 = time.perf_counter()
    null = haar_null(d, "O", null_samples, seed=0)
    t_null = time.perf_counter() - t0
    cpu = time.process_time() - c0
    t_fit = t_diag = 0.0
    worst = 0.0
    for site in range(n_sites):
        source = realistic_activations(n, d, seed=1000 + site)
        scale = (source - source.mean(0)).std()  # typical centred spread, not the mean offsets
        noisy = source + noise * scale * torch.randn(
            n, d, generator=torch.Generator().manual_seed(site))
        rotations = []
        for seed in range(n_seeds):
            q = haar_orthogonal(d, "O", seed=10_000 * (site + 1) + seed)
            target = noisy @ q.float()  # untimed: producing the activations
            c0, t0 = time.process_time(), time.perf_counter()
            rot = fit_rotation(source, target, precision=precision)
            t_fit += time.perf_counter() - t0
            cpu += time.process_time() - c0
            worst = max(worst, float(torch.linalg.norm(rot.matrix - q)))
            rotations.append(rot.matrix)
            del target
        c0, t0 = time.process_time(), time.perf_counter()
        diagnose_many(rotations, null)
        t_diag += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return {"d": d, "n": n, "fits": n_seeds * n_sites, "precision": precision,
            "null_s": t_null, "fit_s": t_fit, "diag_s": t_diag,
            "total_s": t_null + t_fit + t_diag, "cpu_s": cpu, "worst_err": worst}


def precision_check(d: int, n: int) -> float:
    """||R(float32 accumulation) - R(float64)||_F on one realistic pair."""
    source = realistic_activations(n, d, seed=7)
    scale = (source - source.mean(0)).std()
    target = (source + 0.01 * scale * torch.randn(n, d)) @ haar_orthogonal(d, seed=8).float()
    r64 = fit_rotation(source, target, precision="float64").matrix
    r32 = fit_rotation(source, target, precision="float32").matrix
    return float(torch.linalg.norm(r64 - r32))


def power(d: int, ks: list[int], trials: int, null_samples: int, pool: int, seed: int) -> list:
    """Rejection rates at ALPHA of the trace and KS tests for a planted identity block of k dims.

    Each trial diagnoses ``blockdiag(I_k, H)`` with H Haar on O(d - k) (the diagnostics are
    invariant under a change of basis, so the block needs no random conjugation); ``pool > 1``
    pools that many independent matrices per trial (the published pooled KS, and the summed trace).
    """
    null = haar_null(d, "O", null_samples, seed=0)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in ks:
        trace_hits = ks_hits = 0
        for _ in range(trials):
            mats = []
            for _ in range(pool):
                r = torch.eye(d, dtype=torch.float64)
                r[k:, k:] = haar_orthogonal(d - k, "O", seed=g)
                mats.append(r)
            if pool == 1:
                diag = diagnose(mats[0], null)
                trace_p, ks_p = diag.trace_p, diag.ks_p
            else:
                many = diagnose_many(mats, null)
                trace_p, ks_p = many.pooled_trace_p, many.pooled_ks_p
            trace_hits += trace_p < ALPHA
            ks_hits += ks_p < ALPHA
        rows.append((k, trace_hits / trials, ks_hits / trials))
        print(f"  k={k:4d}  trace power {trace_hits / trials:5.2f}   KS power {ks_hits / trials:5.2f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs: a smoke run")
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--seeds", type=int, default=9)
    parser.add_argument("--null-samples", type=int, default=256)
    parser.add_argument("--precision", choices=["float32", "float64", "both"], default="both")
    parser.add_argument("--dims", type=str, default="512,64", help="comma-separated d values")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--power", action="store_true", help="detection power of planted blocks")
    parser.add_argument("--power-d", type=int, default=512)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--pool", type=int, default=1, help="matrices pooled per power trial")
    parser.add_argument("--ks", type=str, default="1,2,3,4,5,6,8,16,24,32,48,64,96,128")
    parser.add_argument("--chance", action="store_true", help="universality chance levels")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(seconds are wall time; 'cpu s' is this process's CPU time)")

    if args.power:
        ks = [int(k) for k in args.ks.split(",")]
        trials = 20 if args.quick else args.trials
        print(f"power at d={args.power_d}, alpha={ALPHA}, {trials} trials per k, "
              f"pool={args.pool}, null {args.null_samples} draws")
        rows = power(args.power_d, ks, trials, args.null_samples, args.pool, seed=1)
        for name, col in (("trace", 1), ("KS", 2)):
            hit = [r[0] for r in rows if r[col] >= 0.8]
            print(f"smallest fixed block with >= 80% power, {name}: "
                  f"{min(hit) if hit else f'> {max(ks)}'}")
        return

    if args.chance:
        for d, n, trials in ((64, 512, 5), (512, 4096, 1)):
            t0 = time.perf_counter()
            c = chance_level(d, n, n, seed=0, n_trials=trials)
            print(f"chance d={d} n_a=n_b={n}: mean max-cos {c.mean_max_cos:.4f}, "
                  f"frac > 0.5 {c.frac_above_0_5:.4f}, Hungarian mean cos "
                  f"{c.hungarian_mean_cos:.4f} ({trials} trials, {time.perf_counter() - t0:.1f} s)")
        return

    rows = 8192 if args.quick else args.rows
    seeds = 3 if args.quick else args.seeds
    null_samples = 64 if args.quick else args.null_samples
    precisions = ["float32", "float64"] if args.precision == "both" else [args.precision]
    sites_for = {512: 7, 64: 5}  # Pythia-70m: embedding + 6 blocks; the toy: 5 residual sites
    configs = [(d, 2 if args.quick else sites_for.get(d, 7))
               for d in (int(x) for x in args.dims.split(","))]
    results = []
    for d, sites in configs:
        for precision in precisions:
            res = speed(d, rows, seeds, sites, null_samples, precision)
            results.append(res)
            print(f"  done d={d} {precision}: {res['total_s']:.1f} s", flush=True)
    print()
    print(f"{'d':>4} {'rows':>6} {'fits':>5} {'accumulate':>10} {'null s':>7} {'fit s':>7} "
          f"{'diag s':>7} {'total s':>8} {'cpu s':>7} {'ms/fit':>7} {'max|R-Q|':>9}")
    for r in results:
        print(f"{r['d']:>4} {r['n']:>6} {r['fits']:>5} {r['precision']:>10} {r['null_s']:>7.2f} "
              f"{r['fit_s']:>7.2f} {r['diag_s']:>7.2f} {r['total_s']:>8.2f} {r['cpu_s']:>7.1f} "
              f"{1000 * r['fit_s'] / r['fits']:>7.1f} {r['worst_err']:>9.2e}")
    for d, _ in configs:
        diff = precision_check(d, rows)
        print(f"d={d}: ||R_float32 - R_float64||_F = {diff:.2e} "
              f"(fit noise scale ||R - Q||_F above; sqrt(2d) = {math.sqrt(2 * d):.1f})")


if __name__ == "__main__":
    main()
