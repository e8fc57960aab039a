"""Readings generated from comparisons: a number, its interval, and what it is read against.

A reading never states a relation the numbers do not support. A value is *above* a reference
when its whole interval lies more than ``margin`` above it, *below* when it lies more than
``margin`` below, and *at* the reference otherwise (its interval reaches within ``margin`` of
it); without an interval the point value is compared. The margin is a region of practical
equivalence in the quantity's units (config, per callback).

Reference values may carry their own uncertainty (a null fitted several times, a ceiling
measured on several seeds): :func:`relation_to_band` compares against a band instead of a point.
"""

from __future__ import annotations

import math

RELATIONS = ("above", "at", "below")


def bounds(value: float | None, ci: dict | None) -> tuple[float, float] | None:
    """(low, high) of an interval dict, or (value, value) without one; None without a value."""
    if ci is not None and ci.get("ci_low") is not None and ci.get("ci_high") is not None:
        return float(ci["ci_low"]), float(ci["ci_high"])
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value), float(value)


def relation(value: float | None, ci: dict | None, reference: float | None,
             margin: float) -> str | None:
    """"above", "at" or "below" ``reference`` (see the module docstring); None if either is
    missing."""
    if reference is None or not math.isfinite(float(reference)):
        return None
    return relation_to_band(value, ci, (float(reference), float(reference)), margin)


def relation_to_band(value: float | None, ci: dict | None,
                     band: tuple[float, float] | None, margin: float) -> str | None:
    """:func:`relation` against a reference band (low, high): above if the value's interval
    lies above ``high + margin``, below if under ``low - margin``, at otherwise."""
    b = bounds(value, ci)
    if b is None or band is None:
        return None
    lo, hi = b
    if lo > band[1] + margin:
        return "above"
    if hi < band[0] - margin:
        return "below"
    return "at"


def fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return format(float(value), spec)


def fmt_ci(value: float | None, ci: dict | None, spec: str = ".3f") -> str:
    """``0.532 [0.511, 0.551]`` (the point only without an interval)."""
    if value is None:
        return "n/a"
    if not ci or ci.get("ci_low") is None:
        return fmt(value, spec)
    return f"{fmt(value, spec)} [{fmt(ci['ci_low'], spec)}, {fmt(ci['ci_high'], spec)}]"


def between(value: float | None, low: float | None, high: float | None) -> float | None:
    """Where ``value`` lies between ``low`` (0) and ``high`` (1); None if undefined."""
    if None in (value, low, high):
        return None
    span = float(high) - float(low)
    if not math.isfinite(span) or abs(span) < 1e-12:
        return None
    return (float(value) - float(low)) / span
