"""report.py's job: the comparison, then the W&B report built from it (saved, or its
specification written with ``--dry-run``)."""

from __future__ import annotations

from omegaconf import DictConfig

from polymorph.compare import COMPARISON_MD, compare
from polymorph.files import atomic_write_json
from polymorph.reports.wandb_report import build_report, report_spec, save_report

SPEC_FILE = "wandb_report.json"


def make_report(cfg: DictConfig, base_overrides: list[str], dry_run: bool) -> str:
    """Write the comparison and build its W&B report; returns the line to print."""
    data, out = compare(cfg, base_overrides)
    settings = cfg.compare.get("report") or {}
    report = build_report(data, (out / COMPARISON_MD).read_text(),
                          project=str(settings.get("project") or "polymorph"),
                          entity=settings.get("entity"), title=settings.get("title"))
    if dry_run:
        atomic_write_json(out / SPEC_FILE, report_spec(report))
        return f"report (not saved, --dry-run): {out / SPEC_FILE}"
    return f"report: {save_report(report)}"
