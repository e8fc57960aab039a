"""analyze(cfg): build the shared context once, run every configured callback,
write results.json, report.md and figures, and log to W&B.

Results are written after every callback, so an interrupted analysis keeps
what it finished; anything missing or failed is listed under
``meta.missing`` / ``meta.failed`` and the results are marked ``partial``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.context import build_context
from polymorph.checkpoints import atomic_write_json, atomic_write_text
from polymorph.errors import PolymorphError
from polymorph.pipeline import output_root, versions
from polymorph.token_batches import describe_batch

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def analysis_dir(cfg: DictConfig) -> Path:
    if cfg.analysis.get("output_dir"):
        return Path(str(cfg.analysis.output_dir))
    return output_root(cfg) / str(cfg.name) / "analysis"


def build_callbacks(cfg: DictConfig) -> dict[str, AnalysisCallback]:
    callbacks = {}
    for name, node in (cfg.analysis.get("callbacks") or {}).items():
        if node is None:
            continue
        cb = instantiate(node)
        if not isinstance(cb, AnalysisCallback):
            raise PolymorphError(f"analysis.callbacks.{name} is not an AnalysisCallback ({type(cb)})")
        callbacks[name] = cb
    return callbacks


def _clean(obj):
    """JSON-safe: NaN/inf become None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def analyze(cfg: DictConfig, show_progress: bool = True) -> tuple[dict, dict]:
    from polymorph.tracking import AnalysisTracker

    root = output_root(cfg)
    out_dir = analysis_dir(cfg)
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    callbacks = build_callbacks(cfg)
    start = time.perf_counter()
    ctx = build_context(cfg, root, out_dir, show_progress=show_progress)
    results: dict = {
        "meta": {
            "experiment": str(cfg.name),
            "context": ctx.description(),
            "callbacks": list(callbacks),
            "missing": list(ctx.missing),
            "failed": {},
            "partial": bool(ctx.missing),
            "versions": versions(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "timings_seconds": {"context": round(time.perf_counter() - start, 2)},
        }
    }
    sections: list[str] = []
    tracker = AnalysisTracker(cfg, out_dir)
    objects = {"context": ctx, "callbacks": callbacks, "out_dir": out_dir}
    try:
        for name, cb in callbacks.items():
            t0 = time.perf_counter()
            try:
                result = cb.run(ctx)
            except PolymorphError as err:
                log.error("%s: %s", name, err)
                results["meta"]["failed"][name] = str(err)
                results["meta"]["partial"] = True
                continue
            figures = cb.figures(ctx, result, fig_dir)
            result["figures"] = [str(p.relative_to(out_dir)) for p in figures]
            results[name] = _clean(result)
            if result.get("missing"):  # a callback that could analyse only part of its input
                results["meta"]["missing"] += [f"{name}: {m}" for m in result["missing"]]
                results["meta"]["partial"] = True
            sections.append(cb.report(ctx, result, figures))
            tracker.log_callback(name, cb, result, figures)
            results["meta"]["timings_seconds"][name] = round(time.perf_counter() - t0, 2)
            atomic_write_json(out_dir / RESULTS_FILE, results)
        results["meta"]["timings_seconds"]["total"] = round(time.perf_counter() - start, 2)
        atomic_write_json(out_dir / RESULTS_FILE, results)
        atomic_write_text(out_dir / REPORT_FILE, render_report(ctx, results, sections))
    finally:
        tracker.finish()
    return results, objects


def render_report(ctx, results: dict, sections: list[str]) -> str:
    meta = results["meta"]
    a = ctx.cfg.analysis
    head = [
        f"# polymorph analysis: `{meta['experiment']}`",
        "",
        f"- seeds: {ctx.seeds} (anchor {ctx.anchor}); pairs: {a.pairs} "
        f"({len(ctx.pairs)}: seed b mapped into seed a's frame)",
        f"- sites: {', '.join(f'`{s}`' for s in ctx.sites)}",
        f"- rotations: group {ctx.group}, fitted on the fit batch "
        f"({describe_batch(ctx.cfg, a.fit_batch)}); scored on the {ctx.score_batch} batch "
        f"({'held out' if ctx.score_batch == 'eval' else 'IN-SAMPLE: the published protocol'}; "
        f"eval batch: {describe_batch(ctx.cfg, a.eval_batch)})",
        f"- SAE config: `{ctx.sae_config_id}`",
        f"- rerun: `python analyze.py experiment={meta['experiment']}` (full resolved config in "
        f"results.json under meta.config)",
        f"- time: {meta['timings_seconds'].get('total', float('nan')):.1f} s",
        "",
    ]
    if meta["partial"]:
        head += ["**Partial results.**", ""]
        head += [f"- missing: {m}" for m in meta["missing"]]
        head += [f"- failed: `{k}`: {v}" for k, v in meta["failed"].items()]
        head.append("")
    caveats = [
        "## Caveats",
        "",
        "- Explained variance is reported under two definitions (see results.json `definitions`): "
        "ev_standard (per-dimension-centred total variance) and ev_published (variance of all "
        "entries around one grand mean, as in the published code).",
        "- With `analysis.score_on=fit` every score is in-sample, as published; the default scores "
        "on a held-out batch.",
    ]
    if ctx.pretrained:
        caveats.append(
            "- Pretrained models: activations skip the first position of every corpus window (the "
            "attention sink); SAE-training, fit and eval windows are disjoint slices of the corpus.")
    else:
        caveats.append(
            "- Where a site's activations span fewer than d dimensions (e.g. "
            "`blocks.0.hook_resid_pre` = token embedding + a 6-dim positional code: at most 15 "
            "directions), the rotation is only determined on that span; its Haar diagnostics then "
            "say little about the complement.")
    body = "\n\n".join(s for s in sections if s)
    return "\n".join(head) + "\n" + body + "\n\n" + "\n".join(caveats) + "\n"
