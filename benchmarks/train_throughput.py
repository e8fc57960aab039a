"""Training throughput: polymorph's Lightning step vs a minimal plain-PyTorch loop.

Both loops train the same model (same init, same batches, same bucketed
forward, AdamW + warmup-cosine + grad clipping) in this one process, so the
ratio measures what Lightning and polymorph's module add. Reported per loop:
real (non-PAD) tokens/s and padded-context tokens/s (batch x 64, what a naive
loop would push through the model), data generation included.

    python benchmarks/train_throughput.py                 # batch 512, 30 timed steps, 2 rounds
    python benchmarks/train_throughput.py --steps 10 --rounds 1 --batch 128
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
from polymorph.training.schedules import warmup_cosine, warmup_cosine_schedule
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


def lightning_run(batch: int, steps: int, buckets: int) -> tuple[float, int]:
    optimizer = partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    scheduler = partial(warmup_cosine_schedule, warmup_steps=10, total_steps=steps + WARMUP,
                        final_fraction=0.02)
    module = DyckTransformerModule(fresh_model(), optimizer, scheduler, length_buckets=buckets)
    dm = DyckDataModule(seed=0, batch_size=batch)
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps + WARMUP, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=1.0, callbacks=[timer], num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    return timer.seconds, timer.real


def plain_run(batch: int, steps: int, buckets: int) -> tuple[float, int]:
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
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--buckets", type=int, default=4)
    args = p.parse_args()
    results = {"plain": [], "lightning": [], "plain_unbucketed": []}
    for _ in range(args.rounds):  # interleave the loops so machine noise hits both alike
        results["plain"].append(plain_run(args.batch, args.steps, args.buckets))
        results["lightning"].append(lightning_run(args.batch, args.steps, args.buckets))
        results["plain_unbucketed"].append(plain_run(args.batch, args.steps, 1))
    slots = args.batch * CONTEXT * args.steps
    print(f"batch {args.batch}, {args.steps} timed steps x {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'loop':<18}{'s/step':>8}{'real tok/s':>12}{'padded tok/s':>14}")
    best = {}
    for name, runs in results.items():
        seconds, real = min(runs)  # best round: least disturbed by the machine
        best[name] = seconds
        print(f"{name:<18}{seconds / args.steps:>8.3f}{real / seconds:>12,.0f}{slots / seconds:>14,.0f}")
    print(f"lightning / plain time ratio: {best['lightning'] / best['plain']:.3f}")
    print(f"bucketing speed-up (plain): {best['plain_unbucketed'] / best['plain']:.2f}x")


if __name__ == "__main__":
    main()
