"""An analysis' headline numbers, read from its results.json by the specs in ``headline``.

Every analysis callback reports many numbers (per pair, per site, per head ...). The headline
numbers are the few a comparison across ablations and the W&B report put side by side; which
ones, and how each is defined, is config (``compare.headline`` in
``conf/compare/default.yaml``, part of every analysis config, so analyze.py logs them and
compare.py tabulates them). A spec reads one quantity of one callback:

* ``from: rows`` (a list of row dicts): the rows grouped by ``by`` (a site), ``value`` read in
  each; several rows (several seed pairs) are averaged;
* ``from: per_site`` (a dict keyed by site, vector, ...): ``value`` read in every entry;
* ``from: summary`` with ``match: "eval/*/mean_argmax_agreement"``: every key of that dict the
  glob matches, its ``*`` naming the entry (a head).

Intervals are read where the analysis reports them, never made up here: a value that is itself
``{point|value|mean, ci_low, ci_high, n_boot}``, or one with ``<key>_ci`` ([low, high] or such a
dict) or ``<key>_ci_low``/``<key>_ci_high`` beside it, or a per-entry summary holding such an
interval elsewhere in the callback's result. An average over several rows carries no interval
unless the analysis reports one for it; then the point value is shown alone.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from polymorph.errors import PolymorphError

SPEC_KEYS = {"question", "callback", "from", "value", "by", "match", "name", "definition"}


@dataclass(frozen=True)
class HeadlineSpec:
    """Where one headline quantity is in results.json, and what it means (see the module)."""

    question: str
    callback: str
    source: str
    definition: str
    value: str | None = None
    by: str = "site"
    match: str | None = None
    name: str | None = None

    @property
    def metric(self) -> str:
        """``<callback>/<name>``: the headline's name in tables and W&B keys."""
        name = self.name or (self.value or self.match or "").split(".")[-1]
        return f"{self.callback}/{name}"


@dataclass(frozen=True)
class Headline:
    """One headline number of one analysis: a metric at one site (or head, vector)."""

    question: str
    metric: str
    site: str | None
    point: float | None
    definition: str
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_boot: int | None = None
    level: float | None = None
    n_rows: int = 1

    @property
    def key(self) -> str:
        """The W&B key of this number (``headline/<callback>/<name>/<site>``)."""
        return f"headline/{self.metric}" + (f"/{self.site}" if self.site else "")

    @property
    def has_interval(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    def text(self, fmt: str = "{:.3g}") -> str:
        if self.point is None:
            return "n/a"
        out = fmt.format(self.point)
        if self.has_interval:
            out += f" [{fmt.format(self.ci_low)}, {fmt.format(self.ci_high)}]"
        return out


def parse_specs(nodes: Iterable | None) -> list[HeadlineSpec]:
    """The ``headline`` config list as specs, every entry checked (config only)."""
    if nodes is None:
        return []
    if isinstance(nodes, (DictConfig, ListConfig)):
        nodes = OmegaConf.to_container(nodes, resolve=True)
    specs = []
    for i, node in enumerate(nodes):
        where = f"compare.headline[{i}]"
        if not isinstance(node, dict):
            raise PolymorphError(f"{where} must be a mapping (question, callback, from, value, "
                                 f"definition), got {node!r}")
        unknown = set(node) - SPEC_KEYS
        if unknown:
            raise PolymorphError(f"{where} has unknown keys {sorted(unknown)}; the keys are "
                                 f"{', '.join(sorted(SPEC_KEYS))}")
        for key in ("question", "callback", "from", "definition"):
            if not node.get(key):
                raise PolymorphError(f"{where} needs `{key}` (see conf/compare/default.yaml)")
        if not node.get("value") and not node.get("match"):
            raise PolymorphError(f"{where} needs `value` (a key in each entry) or `match` (a "
                                 "glob over the keys of `from`)")
        specs.append(HeadlineSpec(question=str(node["question"]), callback=str(node["callback"]),
                                  source=str(node["from"]), definition=str(node["definition"]),
                                  value=node.get("value"), by=str(node.get("by") or "site"),
                                  match=node.get("match"), name=node.get("name")))
    metrics = [s.metric for s in specs]
    dupes = sorted({m for m in metrics if metrics.count(m) > 1})
    if dupes:
        raise PolymorphError(f"compare.headline metrics {dupes} are named twice; give one a `name`")
    return specs


# -- reading numbers -------------------------------------------------------------------------


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _dig(node: Any, path: str | None) -> tuple[Any, Any, str | None]:
    """(parent, value, last key) of the dotted ``path`` inside ``node``."""
    if not path:
        return None, node, None
    parent, key = None, None
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, None, None
        parent, key, node = node, part, node[part]
    return parent, node, key


def read_value(parent: dict | None, key: str | None, node: Any) -> dict[str, Any]:
    """A reported number and its interval, if the analysis reported one beside it."""
    out: dict[str, Any] = {"point": None, "mean": None, "ci_low": None, "ci_high": None,
                           "n_boot": None, "level": None}
    if isinstance(node, dict):
        point = next((node[k] for k in ("point", "value", "mean") if _number(node.get(k))
                      is not None), None)
        out.update(point=_number(point), mean=_number(node.get("mean")),
                   ci_low=_number(node.get("ci_low")), ci_high=_number(node.get("ci_high")),
                   n_boot=node.get("n_boot"), level=_number(node.get("level")))
        return out
    out["point"] = _number(node)
    if not isinstance(parent, dict) or key is None:
        return out
    ci = parent.get(f"{key}_ci", parent.get(f"{key}_interval"))
    if isinstance(ci, dict):
        out.update(ci_low=_number(ci.get("ci_low")), ci_high=_number(ci.get("ci_high")),
                   n_boot=ci.get("n_boot"), mean=_number(ci.get("mean")),
                   level=_number(ci.get("level")))
    elif isinstance(ci, (list, tuple)) and len(ci) == 2:
        out.update(ci_low=_number(ci[0]), ci_high=_number(ci[1]))
    for field in ("ci_low", "ci_high", "n_boot", "mean"):
        if out[field] is None and f"{key}_{field}" in parent:
            out[field] = parent[f"{key}_{field}"]
    if out["ci_low"] is not None and out["n_boot"] is None:
        out["n_boot"] = parent.get("n_boot")
    return out


def _reported_interval(result: Any, entry: str, value: str, depth: int = 0) -> dict | None:
    """An interval the callback reports for ``value`` at ``entry`` (a site) outside its rows,
    e.g. a per-site summary ``{site: {value: {point, ci_low, ci_high}}}``."""
    if depth > 6:
        return None
    if isinstance(result, dict):
        inner = result.get(entry)
        if isinstance(inner, dict):
            parent, node, key = _dig(inner, value)
            found = read_value(parent, key, node)
            if found["ci_low"] is not None and found["ci_high"] is not None:
                return found
        for k, v in result.items():
            if k in ("definitions", "figures", "rows", "pairs"):
                continue
            found = _reported_interval(v, entry, value, depth + 1)
            if found:
                return found
    return None


def _definition(spec: HeadlineSpec, result: dict) -> str:
    """The spec's definition, with the callback's own definition of the value beside it."""
    defs = result.get("definitions") if isinstance(result, dict) else None
    own = None
    if isinstance(defs, dict):
        for name in filter(None, [spec.value, (spec.value or "").split(".")[-1], spec.match]):
            if isinstance(defs.get(name), str):
                own = defs[name]
                break
    return spec.definition if not own else f"{spec.definition} (callback: {own})"


def extract(spec: HeadlineSpec, result: dict) -> list[Headline]:
    """Every headline number ``spec`` reads from one callback's ``result``."""
    source = result.get(spec.source) if isinstance(result, dict) else None
    definition = _definition(spec, result)
    out: list[Headline] = []

    def make(site, found, n_rows=1):
        return Headline(spec.question, spec.metric, None if site is None else str(site),
                        found["point"], definition, found["mean"], found["ci_low"],
                        found["ci_high"], found["n_boot"], found["level"], n_rows)

    if isinstance(source, list):
        groups: dict[Any, list[dict]] = {}
        for row in source:
            if isinstance(row, dict):
                groups.setdefault(row.get(spec.by), []).append(row)
        for site, rows in groups.items():
            values = []
            for row in rows:
                parent, node, key = _dig(row, spec.value)
                values.append(read_value(parent, key, node))
            points = [v["point"] for v in values if v["point"] is not None]
            if len(rows) == 1:
                found = values[0]
            else:
                found = {"point": sum(points) / len(points) if points else None, "mean": None,
                         "ci_low": None, "ci_high": None, "n_boot": None, "level": None}
                reported = _reported_interval(result, str(site), spec.value or "")
                if reported:
                    found = reported
            out.append(make(site, found, len(rows)))
    elif isinstance(source, dict):
        if spec.match:
            for key, node in source.items():
                if fnmatch.fnmatchcase(str(key), spec.match):
                    star = _star(spec.match, str(key))
                    out.append(make(star, read_value(source, str(key), node)))
        else:
            for site, entry in source.items():
                parent, node, key = _dig(entry, spec.value)
                if node is None and parent is None:
                    continue
                out.append(make(site, read_value(parent, key, node)))
    return out


def _star(pattern: str, key: str) -> str | None:
    """The part of ``key`` the first ``*`` of ``pattern`` matched (None without a ``*``)."""
    if "*" not in pattern:
        return None
    head, _, tail = pattern.partition("*")
    tail = tail.split("*")[0]
    body = key[len(head):]
    return body[: len(body) - len(tail)] if tail and body.endswith(tail) else body


def headlines(results: dict, specs: list[HeadlineSpec]) -> list[Headline]:
    """Every headline number of one analysis' results.json contents."""
    out: list[Headline] = []
    for spec in specs:
        result = results.get(spec.callback)
        if isinstance(result, dict):
            out += extract(spec, result)
    return out
