"""Command-line conveniences Hydra's grammar lacks: inclusive ranges and seed placeholders.

``seed=0..8`` means seeds 0 through 8.

Hydra 1.3 reads ``seed=0..8`` as one string and silently runs a single job, so
train.py and analyze.py rewrite every ``key=A..B`` argument into Hydra's comma
list (``seed=0,1,...,8``) before Hydra parses the command line. ``range(0,9)``
and explicit comma lists pass through untouched.
"""

from __future__ import annotations

import re
import sys

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


def expand_argv() -> None:
    """Apply :func:`expand_ranges` and :func:`quote_placeholders` to ``sys.argv`` in place,
    exiting with one clear line on error."""
    try:
        sys.argv[1:] = quote_placeholders(expand_ranges(sys.argv[1:]))
    except SweepSyntaxError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
