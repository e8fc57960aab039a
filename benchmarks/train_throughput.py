"""Training throughput: polymorph's Lightning step vs a minimal plain-PyTorch loop, and fp32
vs bf16 autocast.

All loops train the same model (same init, same batches, same bucketed
forward, AdamW + warmup-cosine + grad clipping) in this one process, so the
ratios measure what Lightning and polymorph's module add, and what
``torch.autocast("cpu", dtype=torch.bfloat16)`` (Lightning ``precision: bf16-mixed``)
saves. Reported per loop: real (non-PAD) tokens/s and padded-context tokens/s
(batch x 64, what a naive loop would push through the model), data generation
included. The loops are interleaved round by round so machine noise hits them
alike; the best round of each is reported.

    python benchmarks/train_throughput.py                 # batch 512, 30 timed steps, 2 rounds
    python benchmarks/train_throughput.py --steps 10 --rounds 1 --batch 128
    python benchmarks/train_throughput.py --batch 128 512 --threads 1 --precision-only
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from polymorph.models.dyck import build_dyck_transformer
from polymorph.tasks.datamodule import DyckDataModule
from polymorph.tasks.dyck import CONTEXT, HEADS
from polymorph.training.schedules import LRSchedule, warmup_cosine
from polymorph.training.transformer_module import DyckTransformerModule, bucketed_forward

WARMUP = 3


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_dyck_transformer()


class _Timer(Callback):
    def __init__(self) -> None:
        self.t0 = None
        self.real = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.t0 = time.perf_counter()
        if batch_idx >= WARMUP:
            self.real += int(batch.mask.sum())

    def on_train_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.t0


def lightning_run(batch: int, steps: int, buckets: int,
                  precision: str = "32-true") -> tuple[float, int]:
    optimizer = partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=1e-4)
    schedule = LRSchedule("cosine", warmup_steps=10, total_steps=steps + WARMUP)
    module = DyckTransformerModule(fresh_model(), optimizer, lr=3e-3, lr_schedule=schedule,
                                   length_buckets=buckets)
    dm = DyckDataModule(seed=0, batch_size=batch)
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps + WARMUP, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=1.0, callbacks=[timer], num_sanity_val_steps=0, precision=precision,
    )
    trainer.fit(module, datamodule=dm)
    return timer.seconds, timer.real


def plain_run(batch: int, steps: int, buckets: int, bf16: bool = False) -> tuple[float, int]:
    model = fresh_model()
    dm = DyckDataModule(seed=0, batch_size=batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 10, steps + WARMUP, 0.02))
    real, t0 = 0, None
    for step in range(steps + WARMUP):
        if step == WARMUP:
            t0 = time.perf_counter()
        b = dm.training_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss_sum, _, n = bucketed_forward(model, b, buckets)
            loss = sum(loss_sum[h] for h in HEADS) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= WARMUP:
            real += n
    return time.perf_counter() - t0, real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--precision-only", action="store_true",
                   help="only the plain fp32 and bf16 loops (skip Lightning and unbucketed)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for batch in args.batch:
        report(batch, args)


def report(batch: int, args) -> None:
    loops = {"plain": lambda: plain_run(batch, args.steps, args.buckets),
             "plain_bf16": lambda: plain_run(batch, args.steps, args.buckets, bf16=True)}
    if not args.precision_only:
        loops["lightning"] = lambda: lightning_run(batch, args.steps, args.buckets)
        loops["lightning_bf16"] = lambda: lightning_run(batch, args.steps, args.buckets,
                                                        "bf16-mixed")
        loops["plain_unbucketed"] = lambda: plain_run(batch, args.steps, 1)
    results = {name: [] for name in loops}
    for _ in range(args.rounds):  # interleave the loops so machine noise hits both alike
        for name, loop in loops.items():
            results[name].append(loop())
    slots = batch * CONTEXT * args.steps
    print(f"batch {batch}, {args.steps} timed steps x {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'loop':<18}{'s/step':>8}{'real tok/s':>12}{'padded tok/s':>14}")
    best = {}
    for name, runs in results.items():
        seconds, real = min(runs)  # best round: least disturbed by the machine
        best[name] = seconds
        print(f"{name:<18}{seconds / args.steps:>8.3f}{real / seconds:>12,.0f}{slots / seconds:>14,.0f}")
    print(f"bf16 / fp32 step-time ratio (plain): {best['plain_bf16'] / best['plain']:.3f} "
          f"(bf16 {best['plain'] / best['plain_bf16']:.2f}x faster)")
    if "lightning" in best:
        print(f"lightning / plain time ratio: {best['lightning'] / best['plain']:.3f}")
        print(f"lightning bf16-mixed / 32-true ratio: "
              f"{best['lightning_bf16'] / best['lightning']:.3f}")
        print(f"bucketing speed-up (plain): {best['plain_unbucketed'] / best['plain']:.2f}x")


if __name__ == "__main__":
    main()
