"""Seconds to train one crosscoder over S seeds against S separate SAEs, side by side.

    python benchmarks/crosscoder_speed.py                  # 9 seeds, d 64, x8, batch 4096,
                                                           # 200 steps, 100k random rows, 1 thread
    python benchmarks/crosscoder_speed.py --steps 50 --rows 20000     # a quick look
    python benchmarks/crosscoder_speed.py --arch topk --k 32

Both sides train on the same random Gaussian rows (the speed does not depend on the data), with
the same steps, batch size, lr and expansion: the crosscoder is ``CrosscoderConfig(relu_l1)``
over all seeds at once, the baseline ``train_sae`` (relu_l1, conf/sae/relu_l1.yaml otherwise)
once per seed. A crosscoder step does the same matrix products as the S SAE steps together
(S encoders summed, S decoders), so the ratio measures overheads, not arithmetic. The last
lines print the memory needed at the PolyPythia shape (arithmetic, not a run).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from polymorph.sae import SAETrainConfig, train_sae
from polymorph.sae.crosscoder_config import CrosscoderConfig
from polymorph.sae.crosscoder_train import train_crosscoder

GB = 1e9


def memory_lines(d: int, m: int, seeds: int, rows: int, batch: int) -> list[str]:
    """float32 bytes of parameters, gradients, Adam state and activations (no run)."""
    params = seeds * d * m * 2 + m + seeds * d  # W_enc, W_dec, b_enc, b_dec
    weights = 4 * params
    acts = 4 * rows * seeds * d
    # per step: the [batch, S, d] minibatch, its reconstruction and error, pre-activations,
    # the code and the gradients of both (a handful of [batch, m] and [batch, S, d] tensors)
    step = 4 * (4 * batch * seeds * d + 4 * batch * m)
    total = 4 * weights + acts + step  # weights + grads + Adam m and v = 4x the weights
    return [
        f"memory at d={d}, {m} latents, {seeds} seeds, {rows} rows, batch {batch} (float32):",
        f"  parameters {params:,} = {weights / GB:.3f} GB; with gradients and Adam's two "
        f"moments 4x = {4 * weights / GB:.3f} GB",
        f"  activations {rows:,} x {seeds} x {d} = {acts / GB:.3f} GB (held once, never "
        "concatenated)",
        f"  per-step tensors ~{step / GB:.3f} GB",
        f"  total ~{total / GB:.2f} GB of 24 GB: "
        + ("fits without chunking" if total < 24 * GB * 0.8 else "needs chunking"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=9)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--arch", choices=("relu_l1", "topk"), default="relu_l1",
                        help="crosscoder architecture (the SAEs stay relu_l1)")
    parser.add_argument("--k", type=int, default=32, help="for --arch topk")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(args.rows, args.d_in, generator=g) for _ in range(args.seeds)]
    base = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sae" / "relu_l1.yaml"))
    sae_cfg = SAETrainConfig.from_dict({**base, "expansion": args.expansion,
                                        "batch_size": args.batch_size, "steps": args.steps})
    cc_cfg = CrosscoderConfig(
        architecture=args.arch, n_seeds=args.seeds, d_in=args.d_in, expansion=args.expansion,
        l1_coefficient=sae_cfg.l1_coefficient if args.arch == "relu_l1" else None,
        k=args.k if args.arch == "topk" else None, lr=sae_cfg.lr, batch_size=args.batch_size,
        steps=args.steps, init_seed=0, data_seed=0)

    t0 = time.perf_counter()
    _, info = train_crosscoder(acts, cc_cfg, progress_bar=False)
    cc_seconds = time.perf_counter() - t0
    sae_seconds = 0.0
    for seed, x in enumerate(acts):
        t0 = time.perf_counter()
        train_sae(x, sae_cfg, init_seed=0, hook_name="h", model_name=f"m{seed}",
                  progress_bar=False)
        sae_seconds += time.perf_counter() - t0

    print(f"{args.seeds} seeds, {args.rows} rows x d {args.d_in}, x{args.expansion} "
          f"({args.expansion * args.d_in} latents), batch {args.batch_size}, {args.steps} "
          f"steps, {args.threads} thread(s)")
    print(f"crosscoder ({args.arch}): {cc_seconds:.1f} s total, "
          f"{1000 * info['seconds_per_step']:.0f} ms/step")
    print(f"{args.seeds} x train_sae (relu_l1): {sae_seconds:.1f} s total, "
          f"{1000 * sae_seconds / (args.seeds * args.steps):.0f} ms/step per SAE")
    print(f"ratio crosscoder / {args.seeds} SAEs = {cc_seconds / sae_seconds:.2f}")
    for line in memory_lines(512, 4096, 9, 65_536, 4096):
        print(line)


if __name__ == "__main__":
    main()
