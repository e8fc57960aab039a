"""Time to accuracy: steps, real tokens and wall seconds until val/min_acc first reaches
0.99, 0.999 and 0.9999, per training recipe, recipes run side by side.

A recipe is a name and a list of Hydra overrides of ``conf/train.yaml`` (the same composition
``train.py`` does), trained by the same objects ``train.py`` builds
(``polymorph.training.fit.build_training``): what is measured here is what a run does.
Each recipe runs in its own process with ``--threads`` intra-op threads, at most
``--parallel`` at a time; run the reference recipe in the same command and read the ratios,
since absolute times move with the machine's load. Wall time counts evaluation: every
``training.eval_every`` steps the three evaluation sets (>= 4,096 sequences each, enforced)
are scored in full, and that time is part of ``seconds``.

A recipe stops at its own stopping rule, at ``--budget-minutes`` of wall time, or (with
``--stop-at``) as soon as val/min_acc reaches that value. Output: ``<out>/results.json``
(every recipe's curve: step, tokens, seconds, lr, val/min_acc and the nine per-(set, head)
accuracies; the crossings; ratios against the first recipe) and ``<out>/curves.png`` (error
rate 1 - val/min_acc on a log axis against wall seconds and tokens).

    python benchmarks/time_to_accuracy.py --out /tmp/tta \\
        --recipe paper="experiment=paper" \\
        --recipe converged="experiment=converged" --budget-minutes 60
    python benchmarks/time_to_accuracy.py --smoke --out /tmp/tta_smoke   # a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.99, 0.999, 0.9999)
MIN_EVAL_SIZE = 4096
SMOKE_OVERRIDES = ["experiment=smoke", "training.max_steps=30", "training.eval_every=10"]


# -- worker: one recipe in this process -----------------------------------------------


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def crossings(rows: list[dict], thresholds=THRESHOLDS) -> dict:
    """The first row at which val/min_acc reaches each threshold (None if never)."""
    out = {}
    for threshold in thresholds:
        hit = next((r for r in rows if r["min_acc"] >= threshold), None)
        out[str(threshold)] = None if hit is None else {
            k: hit.get(k) for k in ("step", "tokens", "seconds", "cpu_seconds", "lr_fraction")}
    return out


def _recorder(budget_seconds: float, stop_at: float | None, clock: str = "cpu",
              partial: Path | None = None):
    import lightning as L

    from polymorph.training.callbacks import lr_fraction
    from polymorph.training.transformer_module import MIN_ACC

    class Recorder(L.Callback):
        """The curve, with wall time since the first step (evaluation included)."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.tokens = 0
            self.t0 = None
            self.eval_seconds = 0.0
            self.stop_reason = "recipe's own stop (or max_steps)"

        def on_train_start(self, trainer, module):
            self.t0 = time.perf_counter()
            self.cpu0 = time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.tokens += int(batch.mask.sum())
            spent = (time.process_time() - self.cpu0 if clock == "cpu"
                     else time.perf_counter() - self.t0)
            if spent > budget_seconds and not trainer.should_stop:
                self.stop_reason = f"{clock} budget ({budget_seconds:.0f} s)"
                trainer.should_stop = True

        def on_validation_start(self, trainer, module):
            self._eval_t0 = time.perf_counter()

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            now = time.perf_counter()
            self.eval_seconds += now - self._eval_t0
            metrics = module.last_val_metrics
            fraction = lr_fraction(module)
            self.rows.append({
                "step": int(trainer.global_step),
                "tokens": self.tokens,
                "seconds": round(now - self.t0, 3),
                "cpu_seconds": round(time.process_time() - self.cpu0, 3),
                "eval_seconds_total": round(self.eval_seconds, 3),
                "lr": fraction * module.lr,
                "lr_fraction": fraction,
                "min_acc": metrics[MIN_ACC],
                "acc": {k.removeprefix("val/"): v for k, v in metrics.items() if k != MIN_ACC},
            })
            if partial is not None:  # the curve so far survives a killed worker
                partial.write_text(json.dumps(self.rows))
            if stop_at is not None and metrics[MIN_ACC] >= stop_at:
                self.stop_reason = f"--stop-at {stop_at} reached"
                trainer.should_stop = True

    return Recorder()


def fp32_min_acc(model, datamodule) -> float:
    """val/min_acc of ``model`` evaluated in fp32 (for runs trained under bf16 autocast)."""
    from polymorph.training.transformer_module import min_accuracy

    model.eval()
    return min_accuracy(model, datamodule.eval_sets())


def run_recipe(name: str, overrides: list[str], out: Path, threads: int, budget_seconds: float,
               stop_at: float | None, smoke: bool, clock: str = "cpu",
               resume_from: str | None = None) -> dict:
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from polymorph.checkpoints import load_weights
    from polymorph.instantiation import build
    from polymorph.layout import RunLayout
    from polymorph.training.fit import build_training

    torch.set_num_threads(threads)
    root = out / "runs" / name
    cfg = compose([*(SMOKE_OVERRIDES if smoke else []), *overrides, "logger=none",
                   f"paths.root={root}", "stage=transformer"])
    if not smoke and int(cfg.data.eval_size) < MIN_EVAL_SIZE:
        raise SystemExit(f"{name}: data.eval_size={cfg.data.eval_size} < {MIN_EVAL_SIZE}: the "
                         f"convergence criterion needs evaluation sets of >= {MIN_EVAL_SIZE}")
    layout = RunLayout.for_seed(root, str(cfg.name), int(cfg.seed))
    if layout.root.exists():
        import shutil

        shutil.rmtree(layout.root)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model = build(cfg.model, "model")
    setup = build_training(cfg, model, layout)
    recorder = _recorder(budget_seconds, stop_at, clock, out / f"{name}.rows.json")
    trainer = instantiate(cfg.trainer,
                          callbacks=[recorder, *setup.callbacks.values(), setup.checkpoints],
                          logger=False,
                          default_root_dir=str(layout.root), enable_progress_bar=False,
                          precision=setup.precision.precision)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    error = None
    try:
        trainer.fit(setup.module, datamodule=setup.datamodule, ckpt_path=resume_from,
                    weights_only=False if resume_from else None)
    except Exception as err:  # noqa: BLE001 - a diverged recipe is a result, not a crash
        error = f"{type(err).__name__}: {err}"
    rows = recorder.rows
    result = {
        "name": name,
        "overrides": overrides,
        "started_utc": started,
        "threads": threads,
        "seed": int(cfg.seed),
        "resumed_from": resume_from,
        "recipe": {"data": OmegaConf.to_container(cfg.data, resolve=True),
                   "training": OmegaConf.to_container(cfg.training, resolve=True)},
        **setup.record(),
        "stop_reason": error or recorder.stop_reason,
        "steps": int(trainer.global_step),
        "tokens": recorder.tokens,
        "seconds": rows[-1]["seconds"] if rows else None,
        "eval_seconds": round(recorder.eval_seconds, 2),
        "crossings": crossings(rows),
        "best_step": setup.checkpoints.best_step,
        "best_min_acc": setup.checkpoints.best_score,
        "best_annealed": setup.checkpoints.best_annealed,
        "first_reached_converge_threshold": setup.convergence.first_reached_step,
        "rows": rows,
    }
    if setup.checkpoints.best_step is not None:
        best = build(cfg.model, "model")
        load_weights(best, layout.best)
        result["best_min_acc_fp32"] = fp32_min_acc(best, setup.datamodule)
    return result


# -- driver: recipes side by side ------------------------------------------------------


def parse_recipe(text: str) -> tuple[str, list[str]]:
    if "=" not in text.split(" ", 1)[0]:
        raise SystemExit(f"--recipe needs NAME=OVERRIDES, got {text!r}")
    name, overrides = text.split("=", 1)
    return name, shlex.split(overrides)


def ratios(results: list[dict]) -> dict:
    """Each recipe's seconds / steps / tokens to each threshold over the first recipe's."""
    ref = results[0]
    out = {}
    for r in results[1:]:
        row = {}
        for t in map(str, THRESHOLDS):
            a, b = r["crossings"].get(t), ref["crossings"].get(t)
            row[t] = None if not a or not b else {
                "seconds": round(a["seconds"] / b["seconds"], 4),
                "cpu_seconds": round(a["cpu_seconds"] / b["cpu_seconds"], 4),
                "steps": round(a["step"] / b["step"], 4),
                "tokens": round(a["tokens"] / b["tokens"], 4),
            }
        out[f"{r['name']} / {ref['name']}"] = row
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for r in results:
        rows = r["rows"]
        if not rows:
            continue
        err = [max(1 - x["min_acc"], 1e-6) for x in rows]
        label = f"{r['name']} (seed {r['seed']}, {r['threads']} thr, {r['precision']['precision']})"
        axes[0].plot([x["cpu_seconds"] / 60 for x in rows], err, label=label)
        axes[1].plot([x["tokens"] / 1e6 for x in rows], err, label=label)
        axes[2].plot([x["step"] for x in rows], [x["lr"] for x in rows], label=label)
    for ax, xlabel in zip(axes[:2], ("CPU minutes of the recipe process (evaluation included)",
                                      "real tokens (M)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("1 - val/min_acc")
        for t in THRESHOLDS:
            ax.axhline(1 - t, color="grey", lw=0.6, ls="--")
        ax.grid(alpha=0.3, which="both")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("learning rate")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("time to accuracy: error of the worst (set, head) on 3 x eval sets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", default=[],
                   help='NAME="override override ..." (repeatable; the first is the reference)')
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per recipe process")
    p.add_argument("--parallel", type=int, default=2, help="recipe processes at a time")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="budget per recipe")
    p.add_argument("--budget-clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: the recipe process's CPU time (robust to other load; with one "
                   "thread it is the idle-machine wall time); wall: elapsed time")
    p.add_argument("--stop-at", type=float, default=None, help="stop a recipe once min_acc >= this")
    p.add_argument("--smoke", action="store_true", help="tiny preset and budgets (for tests)")
    p.add_argument("--resume-from", default=None,
                   help="a run's last.ckpt: branch every recipe from that state (optimiser and "
                   "schedule included); rows then count steps from its step and time from 0")
    p.add_argument("--worker", nargs=2, metavar=("NAME", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_minutes * 60
    if args.worker:
        name, overrides = args.worker[0], json.loads(args.worker[1])
        result = run_recipe(name, overrides, args.out, args.threads, budget, args.stop_at,
                            args.smoke, args.budget_clock, args.resume_from)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        return None
    recipes = [parse_recipe(r) for r in args.recipe] or (
        [("reference", []), ("lr_x2", ["training.lr=6e-3"])] if args.smoke else [])
    if not recipes:
        raise SystemExit("give at least one --recipe NAME=\"overrides\"")
    if len({n for n, _ in recipes}) != len(recipes):
        raise SystemExit("recipe names must be unique")
    if args.threads * args.parallel > (os.cpu_count() or 1):
        print(f"warning: {args.parallel} processes x {args.threads} threads exceeds the "
              f"{os.cpu_count()} cores: ratios stay comparable, absolute times do not")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    pending, running, failed = list(recipes), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, overrides = pending.pop(0)
            cmd = [sys.executable, __file__, "--out", str(args.out), "--threads", str(args.threads),
                   "--budget-minutes", str(args.budget_minutes),
                   "--budget-clock", args.budget_clock,
                   "--worker", name, json.dumps(overrides)]
            if args.stop_at is not None:
                cmd += ["--stop-at", str(args.stop_at)]
            if args.smoke:
                cmd.append("--smoke")
            if args.resume_from:
                cmd += ["--resume-from", args.resume_from]
            log = open(args.out / f"{name}.log", "w")  # noqa: SIM115 - closed when it ends
            running.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
        time.sleep(0.5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(name)
                    print(f"{name}: worker failed (exit {proc.returncode}), see {log.name}")
    results = [json.loads((args.out / f"{n}.json").read_text()) for n, _ in recipes
               if (args.out / f"{n}.json").is_file()]
    if not results:
        raise SystemExit(f"no recipe finished (failed: {failed})")
    summary = {
        "started_utc": started,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, __file__, *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": _cpu_model()},
        "threads": args.threads,
        "parallel": args.parallel,
        "budget_minutes": args.budget_minutes,
        "budget_clock": args.budget_clock,
        "definitions": {
            "seconds": "wall seconds from the first training step, evaluation time included",
            "cpu_seconds": "CPU seconds of the recipe's process over the same span: with one "
            "thread, the wall time the recipe would take on an otherwise idle core",
            "tokens": "real (non-PAD) training tokens consumed",
            "crossings": "first evaluation at which val/min_acc >= the threshold",
            "ratios": "recipe / first recipe, for seconds, steps and tokens to each threshold",
            "lr_fraction": "learning rate of the next step over the peak lr",
        },
        "ratios": ratios(results),
        "failed": failed,
        "recipes": results,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.out / "curves.png")
    print(table(results))
    return summary


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(results: list[dict]) -> str:
    head = f"{'recipe':<24}{'prec':>6}" + "".join(f"{t:>22}" for t in map(str, THRESHOLDS))
    lines = [head + f"{'best':>10}  stop", " " * 30 + " (step/Mtok/cpu-min)" * 3]
    for r in results:
        cells = []
        for t in map(str, THRESHOLDS):
            c = r["crossings"].get(t)
            cells.append("-" if not c else f"{c['step']}/{c['tokens'] / 1e6:.1f}/{c['cpu_seconds'] / 60:.1f}")
        prec = "bf16" if r["precision"]["precision"].startswith("bf16") else "fp32"
        lines.append(f"{r['name']:<24}{prec:>6}" + "".join(f"{c:>22}" for c in cells)
                     + f"{r['best_min_acc']:>10.5f}  {r['stop_reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
