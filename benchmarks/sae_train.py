"""Seconds per SAE on CPU for a toy-sized site, with the quality it reaches.

    python benchmarks/sae_train.py                        # x8 and x32, conf/sae/relu_l1.yaml
    python benchmarks/sae_train.py --sae topk --expansions 8
    python benchmarks/sae_train.py --steps 250 500 1000   # quality/time against steps
    python benchmarks/sae_train.py --activations acts.safetensors --key blocks.0.hook_resid_post
    python benchmarks/sae_train.py --activations acts.safetensors --heldout 0.2 --steps 250 1000 4000
    python benchmarks/sae_train.py --activations acts.safetensors --heldout 0.2 --curve \
        --steps 1000 2000 4000 8000 16000                # one SAE, scored along the way

``--curve`` trains one SAE for the largest ``--steps`` and scores it on the held-out rows at
each listed step (sae-lens' Adam has a constant learning rate, so the SAE at step s of that run
is the one a run of s steps ends with, up to the last-step bookkeeping); without it every step
count is its own SAE from the same initialisation.

Without ``--activations`` the data are SYNTHETIC stand-ins for residual activations (100k rows,
d_in 64): a mean offset, a dense rank-4 component, a sparse superposition of 1024 unit-norm
directions with Zipf-like firing rates (about 8 active per row, exponential magnitudes) and a
little Gaussian noise. They have the right shape and rough structure, not the statistics of a
trained Dyck model: quote the EV/L0 of real activations from the pipeline's metrics.json.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from polymorph.sae import SAETrainConfig, evaluate_sae, train_sae


class HeldoutCurve:
    """Lightning callback: at each of ``at_steps``, convert the SAE being trained to an
    inference SAE exactly as ``train_sae`` does at the end (sae-lens ``save_inference_model``,
    then ``load_from_disk(fold_W_dec_norm=True)``) and score it on ``rows``."""

    def __init__(self, at_steps: list[int], rows: torch.Tensor, on_point) -> None:
        self.at, self.rows, self.on_point = set(at_steps), rows, on_point
        self.t0, self.scoring = time.perf_counter(), 0.0

    def as_lightning(self):
        import lightning.pytorch as pl

        outer = self

        class _Callback(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step in outer.at:
                    outer.score(trainer.global_step, pl_module.sae)

        return _Callback()

    def score(self, step: int, training_sae) -> None:
        import tempfile

        from sae_lens import SAE

        t = time.perf_counter()
        fit_seconds = t - self.t0 - self.scoring  # training only, not the earlier scoring
        with tempfile.TemporaryDirectory(prefix="sae-curve-") as tmp:
            training_sae.save_inference_model(Path(tmp))
            sae = SAE.load_from_disk(Path(tmp), device="cpu", fold_W_dec_norm=True)
        sae.eval()
        metrics = evaluate_sae(sae, self.rows)
        self.scoring += time.perf_counter() - t
        self.on_point(step, fit_seconds, metrics)


def synthetic_activations(
    n_rows: int = 100_000, d_in: int = 64, n_features: int = 1024, seed: int = 0
) -> torch.Tensor:
    """Residual-stream-like stand-in data (see the module docstring); float32 [n_rows, d_in]."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    rates = 1.0 / (torch.arange(n_features, dtype=torch.float64) + 10.0)
    rates = (rates * (8.0 / rates.sum())).clamp(max=0.5).float()  # ~8 active features per row
    x = torch.empty(n_rows, d_in)
    for start in range(0, n_rows, 10_000):
        rows = min(10_000, n_rows - start)
        active = torch.rand(rows, n_features, generator=g) < rates
        magnitude = torch.empty(rows, n_features).exponential_(1.0, generator=g)
        x[start : start + rows] = (active * magnitude) @ directions
    dense_basis = torch.linalg.qr(torch.randn(d_in, 4, generator=g))[0].T  # [4, d_in]
    dense = torch.randn(n_rows, 4, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5])
    offset = 2.0 * torch.randn(d_in, generator=g) / d_in**0.5
    noise = 0.05 * torch.randn(n_rows, d_in, generator=g)
    return (x + dense @ dense_basis + offset + noise).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", default="relu_l1", help="conf/sae/<name>.yaml (default relu_l1)")
    parser.add_argument("--expansions", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="default: config's")
    parser.add_argument(
        "--l1", type=float, nargs="+", default=None, help="relu_l1 coefficients (default: config's)"
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--activations", type=Path, default=None, help="safetensors file")
    parser.add_argument("--key", default=None, help="tensor name in --activations")
    parser.add_argument("--heldout", type=float, default=0.0,
                        help="score on this last fraction of the rows, train on the rest")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--curve", action="store_true",
                        help="one SAE per expansion and l1, scored at every --steps value")
    args = parser.parse_args()
    if args.curve and not args.steps:
        raise SystemExit("--curve scores one SAE at every --steps value: give them, "
                         "e.g. --steps 1000 2000 4000 8000")

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sae" / f"{args.sae}.yaml"))
    if args.activations is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(args.activations))
        key = args.key or next(iter(tensors))
        acts = tensors[key].float().reshape(-1, tensors[key].shape[-1])
        source = f"{args.activations}:{key}"
    else:
        acts = synthetic_activations(args.rows, args.d_in)
        source = "synthetic (see module docstring)"

    if not 0.0 <= args.heldout < 1.0:
        raise SystemExit(f"--heldout {args.heldout}: a fraction in [0, 1), e.g. 0.2")
    n_fit = acts.shape[0] - round(args.heldout * acts.shape[0])
    fit_rows, score_rows = acts[:n_fit], (acts[n_fit:] if n_fit < acts.shape[0] else acts)
    print(f"data: {source}, {acts.shape[0]} rows x d_in {acts.shape[1]}; fit on {n_fit} rows, "
          f"scored on {'the last ' + str(score_rows.shape[0]) if args.heldout else 'the same'} rows")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average before {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'sae':8} {'l1':>7} {'exp':>4} {'d_sae':>6} {'steps':>6} {'s/SAE':>7} {'ms/step':>8} "
        f"{'eval s':>7} {'mse':>9} {'ev_pub':>7} {'ev_std':>7} {'L0':>7} {'dead':>6}"
    )
    print(header)
    print("-" * len(header))
    if args.curve:
        run_curve(args, base, fit_rows, score_rows)
        print(f"load average after {os.getloadavg()[0]:.1f}")
        return
    for expansion in args.expansions:
        for steps, l1 in itertools.product(
            args.steps or [base["steps"]], args.l1 or [base["l1_coefficient"]]
        ):
            cfg = SAETrainConfig.from_dict(
                {**base, "expansion": expansion, "steps": steps, "l1_coefficient": l1}
            )
            sae, info = train_sae(
                fit_rows, cfg, init_seed=0, hook_name="bench", model_name="bench", progress_bar=False
            )
            t0 = time.perf_counter()
            metrics = evaluate_sae(sae, score_rows)
            eval_seconds = time.perf_counter() - t0
            print(
                f"{cfg.architecture:8} {l1!s:>7} {expansion:>4} {info['d_sae']:>6} {steps:>6} "
                f"{info['total_seconds']:>7.1f} {1000 * info['seconds_per_step']:>8.1f} "
                f"{eval_seconds:>7.1f} {metrics['mse']:>9.3e} {metrics['ev_published']:>7.3f} "
                f"{metrics['ev_standard']:>7.3f} {metrics['l0']:>7.1f} "
                f"{metrics['dead_fraction']:>6.3f}",
                flush=True,
            )
    print(f"load average after {os.getloadavg()[0]:.1f}")


def run_curve(args, base: dict, fit_rows: torch.Tensor, score_rows: torch.Tensor) -> None:
    """One SAE per (expansion, l1), trained for max(--steps) and scored at every --steps."""
    from functools import partial

    import lightning.pytorch as pl

    for expansion, l1 in itertools.product(args.expansions, args.l1 or [base["l1_coefficient"]]):
        cfg = SAETrainConfig.from_dict(
            {**base, "expansion": expansion, "steps": max(args.steps), "l1_coefficient": l1}
        )

        def point(step, seconds, m, cfg=cfg, l1=l1, expansion=expansion):
            print(
                f"{cfg.architecture:8} {l1!s:>7} {expansion:>4} {cfg.d_sae(fit_rows.shape[1]):>6} "
                f"{step:>6} {seconds:>7.1f} {1000 * seconds / step:>8.1f} {'-':>7} "
                f"{m['mse']:>9.3e} {m['ev_published']:>7.3f} {m['ev_standard']:>7.3f} "
                f"{m['l0']:>7.1f} {m['dead_fraction']:>6.3f}",
                flush=True,
            )

        curve = HeldoutCurve(sorted(args.steps), score_rows, point)
        trainer = partial(pl.Trainer, accelerator="cpu", devices=1, precision="32-true",
                          enable_checkpointing=False, enable_model_summary=False,
                          num_sanity_val_steps=0, callbacks=[curve.as_lightning()])
        train_sae(fit_rows, cfg, init_seed=0, hook_name="bench", model_name="bench",
                  progress_bar=False, trainer=trainer)


if __name__ == "__main__":
    main()
