"""Command-line conveniences Hydra's grammar lacks, applied before Hydra parses argv.

* ``seed=0..8`` means seeds 0 through 8. Hydra 1.3 reads ``seed=0..8`` as one string and
  silently runs a single job, so every ``key=A..B`` argument becomes Hydra's comma list
  (``seed=0,1,...,8``). ``range(0,9)`` and explicit comma lists pass through untouched.
* ``{seed}`` placeholders in values are quoted (Hydra reads ``{`` as a dictionary).
* A config-group choice that does not exist (``family=nope``, ``experiment=smal``) fails with
  one line naming the available ones, instead of Hydra's multi-line block; a launcher whose
  plugin is not installed says how to install it, and a misspelt launcher setting
  (``hydra.launcher.partiton=gpu``) names the launcher's settings.
* compare.py / report.py: ``ablations=[io=independent,io=shared]`` (Hydra's grammar has no
  ``=`` inside list items) becomes ``compare.ablations=['io=independent','io=shared']``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: hydra/launcher choices and the package that brings each
LAUNCHER_PLUGINS = {"joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
                    # train.py's default (conf/hydra/launcher/parallel.yaml): joblib, sized
                    "parallel": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
                    "submitit_local": ("hydra_plugins.hydra_submitit_launcher",
                                       "hydra-submitit-launcher"),
                    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher",
                                       "hydra-submitit-launcher")}
_CHOICE = re.compile(r"^(?P<key>[A-Za-z_][\w\-/]*)=(?P<value>[^=]*)$")

_RANGE = re.compile(r"^(?P<key>[+~]{0,2}[A-Za-z_][\w.\-/@]*)=(?P<a>[^=,/]*)\.\.(?P<b>[^=,/]*)$")
_INT = re.compile(r"^[+-]?\d+$")


class SweepSyntaxError(ValueError):
    pass


def expand_ranges(args: list[str]) -> list[str]:
    """Rewrite ``key=A..B`` into ``key=A,A+1,...,B``; clear errors for bad ranges."""
    out = []
    for arg in args:
        m = _RANGE.match(arg)
        if not m:
            out.append(arg)
            continue
        key, a, b = m.group("key"), m.group("a").strip(), m.group("b").strip()
        if not (_INT.match(a) and _INT.match(b)):
            raise SweepSyntaxError(
                f"'{arg}': a range needs two integers, as in {key}=0..8 (inclusive); "
                f"got '{a}' and '{b}'"
            )
        lo, hi = int(a), int(b)
        if lo > hi:
            raise SweepSyntaxError(
                f"'{arg}': the range is reversed ({lo} > {hi}); write {key}={hi}..{lo}"
            )
        out.append(f"{key}=" + ",".join(str(i) for i in range(lo, hi + 1)))
    return out


_PLACEHOLDER = re.compile(r"^(?P<key>[+~]{0,2}[A-Za-z_][\w.\-/@]*)=(?P<value>[^'\"].*\{seed\}.*)$")


def quote_placeholders(args: list[str]) -> list[str]:
    """Quote values holding a ``{seed}`` placeholder (``family.model_id=/data/run/seed{seed}``):
    Hydra's override grammar reads an unquoted ``{`` as the start of a dictionary."""
    out = []
    for arg in args:
        m = _PLACEHOLDER.match(arg)
        out.append(f"{m.group('key')}='{m.group('value')}'" if m and "'" not in m.group("value")
                   else arg)
    return out


def config_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Every config group of polymorph and its options (``conf/<group>/*.yaml``)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(conf_dir.iterdir()) if d.is_dir()}


def check_choices(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """One clear line for a config-group choice that does not exist (``family=nope``) or a
    launcher whose plugin is not installed."""
    groups = config_groups(conf_dir)
    for arg in args:
        m = _CHOICE.match(arg)
        if not m:
            continue
        key, value = m.group("key"), m.group("value")
        values = [v.strip() for v in value.split(",")] if "(" not in value else []
        if key in groups:
            for v in values:
                if v and v != "null" and v not in groups[key]:
                    raise SweepSyntaxError(
                        f"{key}={v} is unknown; available: {', '.join(groups[key])} "
                        f"(conf/{key}/)")
        elif key == "hydra/launcher":
            for v in values:
                plugin = LAUNCHER_PLUGINS.get(v)
                if plugin is None:
                    continue
                import importlib.util

                if importlib.util.find_spec(plugin[0]) is None:
                    raise SweepSyntaxError(
                        f"hydra/launcher={v} needs {plugin[1]}: pip install -e '.[launchers]'")


def parse_ablation_list(text: str) -> list[str]:
    """``[io=independent,io=shared,'io=shared model.d_model=128']`` as its entries: commas at
    bracket depth 0 separate ablations, spaces separate the overrides of one."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    out, depth, quote, current = [], 0, None, ""
    for ch in body:
        if quote:
            if ch == quote:
                quote = None
            else:
                current += ch
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
            current += ch
        elif ch in "])}":
            depth -= 1
            current += ch
        elif ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return [e for e in out if e]


def check_launcher_settings(args: list[str], default_launcher: str | None = None) -> None:
    """``hydra.launcher.<key>=...`` against the chosen launcher's settings (one line for a
    misspelt key or a setting without a launcher), before Hydra composes anything.
    ``default_launcher``: the entry point's launcher when none is chosen (train.py: parallel)."""
    keys = [a.split("=", 1)[0].lstrip("+~")[len("hydra.launcher."):] for a in args
            if a.lstrip("+~").startswith("hydra.launcher.")]
    if not keys:
        return
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")]
    if not chosen and default_launcher:
        chosen = [default_launcher]
    if not chosen:
        raise SweepSyntaxError(
            f"hydra.launcher.{keys[0]} is set but no launcher is chosen; add "
            f"hydra/launcher=submitit_slurm (or submitit_local, joblib)")
    launcher = chosen[-1]
    plugin = LAUNCHER_PLUGINS.get(launcher)
    if plugin is None:
        return
    import importlib

    try:
        importlib.import_module(plugin[0] + ".config")
    except ImportError:
        return  # reported by check_choices
    from hydra.core.config_store import ConfigStore

    stored = "joblib" if launcher == "parallel" else launcher  # parallel.yaml extends joblib
    entry = ConfigStore.instance().repo.get("hydra", {}).get("launcher", {}).get(
        f"{stored}.yaml")
    if entry is None:
        return
    settings = [k for k in entry.node if not str(k).startswith("_")]
    for key in keys:
        if key.split(".")[0] not in settings:
            raise SweepSyntaxError(
                f"hydra.launcher.{key} is not a setting of hydra/launcher={launcher}; its "
                f"settings: {', '.join(settings)}")


def rewrite_ablations(argv: list[str] | None = None) -> None:
    """``ablations=[a,b c]`` -> ``compare.ablations=['a','b c']`` in ``argv`` (``sys.argv``)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("ablations="):
            entries = parse_ablation_list(arg.split("=", 1)[1])
            bad = [e for e in entries if "'" in e]
            if bad:
                print(f"error: ablation {bad[0]!r} has a quote; write overrides without quotes "
                      "inside ablations=[...]", file=sys.stderr)
                raise SystemExit(2)
            argv[i] = "compare.ablations=[" + ",".join(f"'{e}'" for e in entries) + "]"


def pop_flag(flag: str) -> bool:
    """Remove ``flag`` from ``sys.argv``; whether it was there."""
    if flag in sys.argv[1:]:
        sys.argv[1:] = [a for a in sys.argv[1:] if a != flag]
        return True
    return False


def expand_argv(default_launcher: str | None = None) -> None:
    """Apply :func:`expand_ranges`, :func:`quote_placeholders` and :func:`check_choices` to
    ``sys.argv`` in place, exiting with one clear line on error; registers the config
    resolvers the entry points' configs use (:mod:`polymorph.parallel`)."""
    from polymorph.parallel import register_resolver

    register_resolver()
    try:
        sys.argv[1:] = quote_placeholders(expand_ranges(sys.argv[1:]))
        check_choices(sys.argv[1:])
        check_launcher_settings(sys.argv[1:], default_launcher)
    except SweepSyntaxError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
