"""A W&B report across ablations, built with the ``wandb-workspaces`` Reports API.

One panel grid per question (function match, SAE transfer, universality, Haar, steering, map
families): each plots the headline numbers (``headline/<callback>/<metric>/<site>``, logged by
every analysis run) of the experiment's analysis runs, grouped by the ablation (the run config
field ``ablation``), one bar chart per metric with a bar per site. A training grid plots
``val/min_acc`` and ``train/loss`` of the training runs grouped by their run-level ablation. The
comparison table (``comparison.md``) and its reading come first.

Building the report needs neither an account nor the network: :func:`build_report` returns the
report object and :func:`report_spec` its specification (``wandb_report.json`` with
``--dry-run``). Only :func:`save_report` talks to W&B, and it first checks that you are logged
in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polymorph.errors import PolymorphError

QUESTIONS = ("function match", "SAE transfer", "universality", "Haar", "steering",
             "map families")
#: the entity a report built offline names when none is configured (saving asks W&B)
OFFLINE_ENTITY = "offline"
TRAINING_METRICS = ("val/min_acc", "train/loss")


def panel_metrics(comparison: dict) -> dict[str, dict[str, list[str]]]:
    """question -> metric -> the W&B keys of its numbers (those some ablation has)."""
    out: dict[str, dict[str, list[str]]] = {}
    for ablation in comparison["ablations"]:
        for n in ablation["headline"]:
            if n["point"] is None:
                continue  # never logged
            keys = out.setdefault(n["question"], {}).setdefault(n["metric"], [])
            if n["key"] not in keys:
                keys.append(n["key"])
    ordered = {q: out[q] for q in QUESTIONS if q in out}
    ordered.update({q: v for q, v in out.items() if q not in ordered})
    return ordered


def _filters(experiment: str, job: str) -> str:
    return f"Config('experiment') = '{experiment}' and Config('job') = '{job}'"


def build_report(comparison: dict, comparison_md: str, *, project: str,
                 entity: str | None = None, title: str | None = None):
    """The report object (``wandb_workspaces.reports.v2.Report``), built offline."""
    import wandb_workspaces.reports.v2 as wr

    entity = entity or OFFLINE_ENTITY
    experiment = comparison["experiment"]

    def runset(job: str, groupby: str):
        return wr.Runset(entity=entity, project=project, name=f"{experiment}: {job}",
                         filters=_filters(experiment, job), groupby=[f"config.{groupby}"])

    blocks: list[Any] = [
        wr.H1(text=f"Ablations of `{experiment}`"),
        wr.P(text=f"Reference: {comparison['reference']}. Rerun the comparison with: "
                  f"{comparison['command']}"),
        wr.H2(text="What changed"),
        wr.UnorderedList(items=list(comparison["reading"]) or ["(one ablation only)"]),
        wr.H2(text="Comparison table"),
        wr.MarkdownBlock(text=_tables(comparison_md)),
    ]
    for question, metrics in panel_metrics(comparison).items():
        panels = [wr.BarPlot(title=metric, metrics=keys, groupby_aggfunc="mean",
                             groupby_rangefunc="minmax")
                  for metric, keys in metrics.items()]
        blocks += [wr.H2(text=question),
                   wr.P(text="; ".join(f"{m}: {comparison['definitions'].get(m, '')}"
                                       for m in metrics)),
                   wr.PanelGrid(runsets=[runset("analyze", "ablation")], panels=panels)]
    blocks += [wr.H2(text="Training"),
               wr.PanelGrid(runsets=[runset("train", "ablation_run")],
                            panels=[wr.LinePlot(title=m, y=[m]) for m in TRAINING_METRICS])]
    return wr.Report(project=project, entity=entity,
                     title=(title or f"polymorph: {experiment} ablations")[:128],
                     description=f"Headline numbers of every ablation of {experiment}, grouped "
                                 "by the ablation keys polymorph logs with every run.",
                     blocks=blocks)


def _tables(markdown: str) -> str:
    """The comparison's per-question tables (the headings and tables of comparison.md)."""
    keep, out = False, []
    for line in markdown.splitlines():
        if line.startswith("## "):
            keep = line[3:] not in ("What changed", "Definitions")
        if keep and not line.startswith("!["):
            out.append(line)
    return "\n".join(out).strip()


def report_spec(report) -> dict:
    """The report's specification: every block and panel with its metric keys and run sets."""
    return {"title": report.title, "project": report.project, "entity": report.entity,
            "report": dataclasses.asdict(report)}


def panel_keys(spec: dict) -> list[str]:
    """Every metric key the panels of a report specification plot."""
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("metrics", "y"):
                values = node.get(key)
                if isinstance(values, list) and "layout" in node:
                    out.extend(v for v in values if isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec["report"])
    return out


def has_credentials() -> bool:
    """Whether a W&B API key is configured, where ``wandb login`` puts one (the environment, or
    the netrc file of the W&B host), checked without prompting, asking the server or starting
    W&B's global state."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def save_report(report) -> str:
    """Save the report to W&B and return its URL; a clear line when not logged in."""
    import wandb

    if not has_credentials():
        raise PolymorphError(
            "saving a W&B report needs a W&B account: run `wandb login` (or set WANDB_API_KEY), "
            "upload the offline runs with `wandb sync <outputs>/**/offline-run-*`, then rerun; "
            "or pass --dry-run to write the report's specification without W&B")
    if report.entity == OFFLINE_ENTITY:
        report.entity = wandb.Api().default_entity
        for block in report.blocks:
            for rs in getattr(block, "runsets", None) or []:
                rs.entity = report.entity
    try:
        report.save()
    except Exception as err:
        raise PolymorphError(f"W&B refused the report ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); check `wandb "
                             "login` and compare.report.entity / compare.report.project") from err
    return report.url
