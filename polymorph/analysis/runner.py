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

from omegaconf import DictConfig, OmegaConf

from polymorph.analysis.base import AnalysisCallback
from polymorph.analysis.context import build_context, check_analysis_config
from polymorph.errors import PolymorphError
from polymorph.families import ModelFamily, build_family
from polymorph.files import atomic_write_json, atomic_write_text
from polymorph.instantiation import build
from polymorph.layout import ANALYSIS_DIR
from polymorph.runs import ablation as ablation_of
from polymorph.runs import output_root
from polymorph.versions import library_versions

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def analysis_dir(cfg: DictConfig, family: ModelFamily | None = None) -> Path:
    """Where this analysis writes: ``analysis.output_dir``, else the ``analysis/`` folder of the
    config's ablation (``outputs/<experiment>/<ablation keys>/analysis/``)."""
    if cfg.analysis.get("output_dir"):
        return Path(str(cfg.analysis.output_dir))
    family = family or build_family(cfg)
    return ablation_of(cfg, family, for_analysis=True).folder(output_root(cfg)) / ANALYSIS_DIR


def build_callbacks(cfg: DictConfig, family: ModelFamily) -> dict[str, AnalysisCallback]:
    """Every configured callback, each checked against the family before anything loads."""
    callbacks = {}
    for name, node in (cfg.analysis.get("callbacks") or {}).items():
        if node is None:
            continue
        where = f"analysis.callbacks.{name}"
        try:
            cb = build(node, where)
        except (ValueError, TypeError) as err:  # a callback's own argument checks
            raise PolymorphError(f"{where}: {err}") from err
        if not isinstance(cb, AnalysisCallback):
            raise PolymorphError(f"{where} is not an AnalysisCallback ({type(cb).__name__}); "
                                 "give it a _target_ of one (polymorph/analysis/)")
        cb.check(family, where)
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
    from polymorph.compare import headline_numbers
    from polymorph.headline import parse_specs
    from polymorph.tracking import AnalysisTracker

    root = output_root(cfg)
    check_analysis_config(cfg)
    family = build_family(cfg)
    ablation = ablation_of(cfg, family, for_analysis=True)
    callbacks = build_callbacks(cfg, family)
    parse_specs((cfg.get("compare") or {}).get("headline"))  # the headline specs, checked
    out_dir = analysis_dir(cfg, family)
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ctx = build_context(cfg, root, out_dir, show_progress=show_progress, family=family)
    results: dict = {
        "meta": {
            "experiment": str(cfg.name),
            "ablation": {"name": ablation.display, "keys": ablation.keys,
                         "runs": str(ctx.experiment_dir)},
            "context": ctx.description(),
            "callbacks": list(callbacks),
            "missing": list(ctx.missing),
            "failed": {},
            "partial": bool(ctx.missing),
            "versions": library_versions(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "timings_seconds": {"context": round(time.perf_counter() - start, 2)},
            "command": analysis_command(cfg, ablation),
        }
    }
    sections: list[str] = []
    tracker = AnalysisTracker(cfg, out_dir, ablation)
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
        tracker.log_headline(headline_numbers(results, cfg))
        atomic_write_text(out_dir / REPORT_FILE, render_report(ctx, results, sections))
    finally:
        tracker.finish()
    return results, objects


def analysis_command(cfg: DictConfig, ablation) -> str:
    """The command that reruns this analysis: the job's own overrides under Hydra, else the
    preset and the ablation's keys."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return " ".join(["python analyze.py", *HydraConfig.get().overrides.task])
    except ValueError:
        pass
    if ablation.preset is None:
        return f"python analyze.py name={cfg.name}"
    keys = [f"~{k[1:]}" if k.startswith("~") else f"{k}={v}" for k, v in ablation.keys.items()]
    return " ".join(["python analyze.py", f"experiment={ablation.preset}", *keys])


def render_report(ctx, results: dict, sections: list[str]) -> str:
    meta = results["meta"]
    mode = "anchor" if all(a == ctx.anchor for a, _ in ctx.pairs) else "all"
    held_out = "held out" if ctx.score_batch == "eval" else "IN-SAMPLE: the published protocol"
    ablation = meta.get("ablation") or {}
    head = [
        f"# polymorph analysis: `{meta['experiment']}`",
        "",
        f"- ablation: `{ablation.get('name', meta['experiment'])}` (runs in "
        f"`{ablation.get('runs', ctx.experiment_dir)}`)",
        f"- family: `{ctx.family.name}`; seeds: {ctx.seeds} (anchor {ctx.anchor}); pairs: "
        f"{mode} ({len(ctx.pairs)}: seed b mapped into seed a's frame)",
        f"- sites: {', '.join(f'`{s}`' for s in ctx.sites)}",
        f"- rotations: group {ctx.group}, fitted on the fit batch "
        f"({ctx.batches['fit'].description}); scored on the {ctx.score_batch} batch "
        f"({held_out}; eval batch: {ctx.batches['eval'].description})",
        f"- SAE config: `{ctx.sae_config_id}`",
        f"- rerun: `{meta.get('command') or 'python analyze.py experiment=' + meta['experiment']}`"
        " (full resolved config in results.json under meta.config)",
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
        "- Explained variance is reported under two definitions (see results.json "
        "`definitions`): ev_standard (per-dimension-centred total variance) and ev_published "
        "(variance of all entries around one grand mean, as in the published code).",
        "- With `analysis.score_on=fit` every score is in-sample, as published; the default "
        "scores on a held-out batch.",
    ] + [f"- {c}" for c in ctx.family.caveats()]
    body = "\n\n".join(s for s in sections if s)
    return "\n".join(head) + "\n" + body + "\n\n" + "\n".join(caveats) + "\n"
