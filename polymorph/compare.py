"""Comparing ablations: every headline number of every ablation's analysis, side by side.

``python compare.py ablations=[io=independent,io=shared]`` (or the shipped list in
``conf/compare/default.yaml``) composes each ablation's analysis config (the command line's own
overrides plus the ablation's), finds the analysis folder it writes
(:mod:`polymorph.ablations`), reads its ``results.json`` and writes
``outputs/<experiment>/comparison/``:

* ``comparison.json``: per ablation, which overrides asked for it, where its analysis is, its
  seeds, and every headline number (:mod:`polymorph.headline`) with the interval the analysis
  reported (absent when it reported none) and its definition;
* ``comparison.md``: one table per question, and a short generated reading of what changed
  against the first ablation (the reference);
* ``figures/<question>.png``: every headline metric per site, one marker per ablation (with
  its interval where reported).

Nothing is computed from activations here: a number that is not in an analysis' results is
absent from the comparison, and an ablation never analysed is refused with the commands that
train and analyse it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from polymorph.ablations import Ablation, compose_config, derive, preset_choice
from polymorph.errors import PolymorphError
from polymorph.families import build_family
from polymorph.files import atomic_write_json, atomic_write_text, read_json
from polymorph.headline import Headline, headlines, parse_specs
from polymorph.layout import ANALYSIS_DIR, COMPARISON_DIR, find_seed_runs
from polymorph.runs import output_root

RESULTS_FILE = "results.json"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
#: overrides an ablation entry may not carry: they pick the experiment or where it is written
NOT_ABLATIONS = ("experiment", "name", "paths", "hydra", "compare", "logger")
#: relative change below which the reading calls a number unchanged
UNCHANGED = 0.01
#: changes the reading names per ablation
READING_CHANGES = 3


@dataclass
class Row:
    """One compared ablation."""

    ablation: Ablation
    requested: list[str]
    analysis_dir: Path
    runs_dir: Path
    results: dict | None = None
    numbers: list[Headline] = field(default_factory=list)

    #: keys every compared ablation has alike (set by :func:`collect`), left out of its name
    common: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        own = {k: v for k, v in self.ablation.keys.items() if self.common.get(k) != v}
        if own:
            return ",".join(f"{k}={v}" if not k.startswith("~") else k
                            for k, v in sorted(own.items()))
        return self.ablation.display if not self.ablation.keys else \
            f"{self.ablation.preset or self.ablation.experiment} preset"


def check_entries(entries: list[str]) -> list[list[str]]:
    """Every ablation entry as its overrides, refusing ones that are not ablations."""
    if not entries:
        raise PolymorphError("nothing to compare: give ablations=[io=independent,io=shared] (or "
                             "set compare.ablations in conf/compare/default.yaml)")
    out = []
    for entry in entries:
        overrides = shlex.split(str(entry))
        if not overrides:
            raise PolymorphError("an empty ablation in ablations=[...]; write the preset itself as "
                                 "one of its own values, e.g. io=independent")
        for o in overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if "=" not in o and not o.startswith("~"):
                raise PolymorphError(f"ablation '{entry}': '{o}' is not an override key=value")
            if key.split(".")[0].split("/")[0] in NOT_ABLATIONS:
                raise PolymorphError(
                    f"ablation '{entry}' sets {key}, which picks the experiment or where results "
                    f"go rather than an ablation; put it outside ablations=[...] on the command "
                    f"line so it applies to every compared ablation")
        out.append(overrides)
    return out


def collect(cfg: DictConfig, base_overrides: list[str]) -> list[Row]:
    """The compared ablations of ``cfg.compare.ablations`` (one row per distinct ablation)."""
    preset = preset_choice(cfg)
    rows: dict[str, Row] = {}
    for entry, overrides in zip(cfg.compare.ablations, check_entries(list(cfg.compare.ablations))):
        try:
            job = compose_config("analyze", [*base_overrides, *overrides])
        except Exception as err:  # noqa: BLE001 - Hydra's own message, made one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PolymorphError(f"ablation '{entry}' does not compose: {first}") from None
        ablation = derive(job, build_family(job), preset=preset, for_analysis=True)
        root = output_root(job)
        if ablation.label in rows:
            rows[ablation.label].requested.append(str(entry))
            continue
        folder = (Path(str(job.analysis.output_dir)) if job.analysis.get("output_dir")
                  else ablation.folder(root) / ANALYSIS_DIR)
        rows[ablation.label] = Row(ablation, [str(entry)], folder, ablation.runs_dir(root))
    out = list(rows.values())
    common = dict(out[0].ablation.keys.items())
    for row in out[1:]:
        common = {k: v for k, v in common.items() if row.ablation.keys.get(k) == v}
    for row in out:
        row.common = common
    return out


def _seed_text(seeds: list[int]) -> str:
    seeds = sorted(set(seeds))
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(map(str, seeds)) if seeds else "0..8"


def check_present(rows: list[Row], base_overrides: list[str]) -> None:
    """One line naming every ablation without an analysis and the commands that make one."""
    present = [r for r in rows if (r.analysis_dir / RESULTS_FILE).is_file()]
    seeds: list[int] = []
    for r in present:
        seeds = read_json(r.analysis_dir / RESULTS_FILE)["meta"]["context"].get("seeds") or []
        if seeds:
            break
    missing = [r for r in rows if r not in present]
    if not missing:
        return
    base = " ".join(base_overrides)
    parts = []
    for r in missing:
        overrides = " ".join(r.requested[0].split())
        extra = f"{base} {overrides}".strip()
        analyse = f"python analyze.py {extra}"
        finished = [s for s, run in find_seed_runs(r.runs_dir).items() if run.is_finished()]
        if len(finished) >= 2:
            parts.append(f"{r.name} (no {r.analysis_dir / RESULTS_FILE}): {analyse}")
        else:
            train = f"python train.py -m seed={_seed_text(seeds)} {extra}"
            parts.append(f"{r.name} (no runs in {r.runs_dir}): {train} && {analyse}")
    raise PolymorphError("never analysed: " + "; ".join(parts))


def compare(cfg: DictConfig, base_overrides: list[str]) -> tuple[dict, Path]:
    """Compare the ablations of ``cfg.compare`` and write the comparison folder; returns the
    comparison's contents and its folder. ``base_overrides``: the command line's overrides
    that apply to every ablation (``experiment=smoke``, ``paths.root=...``)."""
    specs = parse_specs(cfg.compare.get("headline"))
    rows = collect(cfg, base_overrides)
    check_present(rows, base_overrides)
    for row in rows:
        row.results = read_json(row.analysis_dir / RESULTS_FILE)
        row.numbers = headlines(row.results, specs)
    out_dir = (Path(str(cfg.compare.output_dir)) if cfg.compare.get("output_dir")
               else output_root(cfg) / str(cfg.name) / COMPARISON_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw(rows, out_dir / "figures")
    data = to_json(rows, specs, base_overrides, figures, out_dir)
    atomic_write_json(out_dir / COMPARISON_JSON, data)
    atomic_write_text(out_dir / COMPARISON_MD, render(rows, data, figures, out_dir))
    return data, out_dir


def to_json(rows: list[Row], specs, base_overrides: list[str], figures: list[Path],
            out_dir: Path) -> dict[str, Any]:
    return {
        "experiment": rows[0].ablation.experiment,
        "reference": rows[0].name,
        "common_keys": rows[0].common,
        "command": " ".join(["python compare.py", *base_overrides,
                             "ablations=[" + ",".join(_quoted(r.requested[0]) for r in rows)
                             + "]"]),
        "ablations": [{
            "name": r.name,
            "label": r.ablation.label,
            "keys": r.ablation.keys,
            "requested_as": r.requested,
            "analysis": str(r.analysis_dir),
            "runs": str(r.runs_dir),
            "seeds": r.results["meta"]["context"].get("seeds"),
            "partial": bool(r.results["meta"].get("partial")),
            "scored_batch": r.results["meta"]["context"].get("scored_batch"),
            "headline": [n.to_dict() for n in r.numbers],
        } for r in rows],
        "definitions": {s.metric: s.definition for s in specs} | {
            "point": "the value the analysis reports (a mean over seed pairs where several)",
            "ci_low / ci_high": "the interval the analysis reports for it (its level and "
                                "n_boot beside it); absent where the analysis reported none",
            "reading": "each ablation against the reference (the first): the largest relative "
                       "changes, those whose reported intervals do not overlap first",
        },
        "reading": reading(rows),
        "figures": [str(p.relative_to(out_dir)) for p in figures],
    }


def _quoted(entry: str) -> str:
    return f"'{entry}'" if " " in entry else entry


def _table(rows: list[Row], question: str) -> list[str]:
    cells: dict[tuple[str, str | None], dict[str, Headline]] = {}
    for r in rows:
        for n in r.numbers:
            if n.question == question:
                cells.setdefault((n.metric, n.site), {})[r.name] = n
    if not cells:
        return []
    cols = list(cells)
    head = ["ablation"] + [f"{m.split('/', 1)[1]}" + (f" @ {s}" if s else "") for m, s in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [cells[c].get(r.name).text() if r.name in cells[c] else "absent" for c in cols]
        lines.append("| " + " | ".join([f"`{r.name}`"] + vals) + " |")
    return lines


def _change(ref: Headline, new: Headline) -> tuple[bool, float] | None:
    if ref.point is None or new.point is None:
        return None
    scale = max(abs(ref.point), abs(new.point), 1e-12)
    rel = abs(new.point - ref.point) / scale
    separated = (ref.has_interval and new.has_interval
                 and (new.ci_low > ref.ci_high or new.ci_high < ref.ci_low))
    return separated, rel


def reading(rows: list[Row]) -> list[str]:
    """A few generated sentences: what moved in each ablation against the reference."""
    ref = rows[0]
    ref_numbers = {(n.metric, n.site): n for n in ref.numbers}
    out = []
    for r in rows[1:]:
        changes = []
        for n in r.numbers:
            base = ref_numbers.get((n.metric, n.site))
            c = _change(base, n) if base else None
            if c is not None and (c[0] or c[1] >= UNCHANGED):
                changes.append((not c[0], -c[1], base, n, c[0]))
        changes.sort(key=lambda t: (t[0], t[1]))
        if not changes:
            out.append(f"`{r.name}` against `{ref.name}`: no headline number moved by "
                       f"{UNCHANGED:.0%} or more.")
            continue
        parts = []
        for _, _, base, n, separated in changes[:READING_CHANGES]:
            where = f" at {n.site}" if n.site else ""
            note = ("intervals do not overlap" if separated else
                    "intervals overlap" if base.has_interval and n.has_interval else
                    "no interval reported")
            parts.append(f"{n.metric}{where} {base.text()} -> {n.text()} ({note})")
        more = len(changes) - READING_CHANGES
        tail = f"; {more} more moved by {UNCHANGED:.0%} or more" if more > 0 else ""
        out.append(f"`{r.name}` against `{ref.name}`: " + "; ".join(parts) + tail + ".")
    return out


def render(rows: list[Row], data: dict, figures: list[Path], out_dir: Path) -> str:
    lines = [f"# polymorph comparison: `{data['experiment']}`", "",
             f"- rerun: `{data['command']}`",
             f"- reference: `{data['reference']}` (the first ablation)"]
    if data["common_keys"]:
        lines.append("- every ablation also has: " + ", ".join(
            f"`{k}={v}`" for k, v in data["common_keys"].items()))
    lines.append("")
    lines += ["| ablation | requested as | seeds | analysis | partial |", "|---|---|---|---|---|"]
    for a in data["ablations"]:
        lines.append(f"| `{a['name']}` | {', '.join(f'`{x}`' for x in a['requested_as'])} | "
                     f"{a['seeds']} | `{a['analysis']}` | {'yes' if a['partial'] else 'no'} |")
    lines += ["", "## What changed", ""] + [f"- {s}" for s in data["reading"]] + [""]
    questions = list(dict.fromkeys(n.question for r in rows for n in r.numbers))
    for q in questions:
        lines += [f"## {q}", ""] + _table(rows, q) + [""]
        for p in figures:
            if p.stem == _slug(q):
                lines += [f"![{q}]({p.relative_to(out_dir)})", ""]
    lines += ["## Definitions", ""] + [f"- `{k}`: {v}" for k, v in data["definitions"].items()]
    lines += ["", "Values are as each analysis reports them: `point [ci_low, ci_high]` where it "
              "reported an interval, the point alone where it did not; `absent`: the analysis "
              "has no such number (a callback switched off, or a site it did not analyse)."]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def draw(rows: list[Row], fig_dir: Path) -> list[Path]:
    """One figure per question: each metric per site, one marker per ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    questions = list(dict.fromkeys(n.question for r in rows for n in r.numbers))
    for q in questions:
        metrics = list(dict.fromkeys(n.metric for r in rows for n in r.numbers if n.question == q))
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6),
                                 squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            sites = list(dict.fromkeys(n.site for r in rows for n in r.numbers
                                       if n.metric == metric))
            width = 0.8 / max(len(rows), 1)
            for i, r in enumerate(rows):
                found = {n.site: n for n in r.numbers if n.metric == metric}
                xs, ys, lo, hi = [], [], [], []
                for j, site in enumerate(sites):
                    n = found.get(site)
                    if n is None or n.point is None:
                        continue
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(n.point)
                    lo.append(n.point - n.ci_low if n.has_interval else 0.0)
                    hi.append(n.ci_high - n.point if n.has_interval else 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=r.name)
            ax.set_xticks(range(len(sites)))
            ax.set_xticklabels([_short(s) for s in sites], rotation=30, ha="right", fontsize=7)
            ax.set_title(metric, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{q}: per ablation (bars: the interval each analysis reports, if any)",
                     fontsize=9)
        fig.tight_layout()
        path = fig_dir / f"{_slug(q)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _short(site: str | None) -> str:
    if site is None:
        return "all"
    return site.replace("blocks.", "b").replace(".hook_resid_", ".").replace("hook_", "")


def headline_numbers(results: dict, cfg: DictConfig) -> list[Headline]:
    """The headline numbers of one analysis (for its W&B run)."""
    compare_cfg = cfg.get("compare")
    if compare_cfg is None:
        return []
    return headlines(results, parse_specs(compare_cfg.get("headline")))


def job_overrides() -> list[str]:
    """The running compare/report job's command-line overrides that apply to every ablation
    (all but ``compare.*``)."""
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task
            if not o.split("=", 1)[0].lstrip("+~").startswith("compare")]
