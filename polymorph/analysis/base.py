"""The analysis-callback interface.

A callback answers one question about an experiment. It receives the shared
:class:`~polymorph.analysis.context.AnalysisContext` (activations, rotations,
SAEs, computed once) and returns a JSON-serialisable dict that becomes its
top-level entry in ``results.json``. It may also draw figures and write a
section of ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from polymorph.errors import PolymorphError

if TYPE_CHECKING:
    from polymorph.analysis.context import AnalysisContext


class AnalysisCallback:
    #: key in results.json and the W&B namespace; set by each subclass
    name: str = ""
    #: names of the family readouts this callback can use (None: any family)
    readouts: tuple[str, ...] | None = None

    def check(self, family, where: str) -> None:
        """Refuse, before anything loads, a family this callback cannot analyse."""
        name = family.readout.name
        if self.readouts is not None and name not in self.readouts:
            raise PolymorphError(
                f"{where} ({type(self).__name__}) reads {' or '.join(self.readouts)} outputs, but "
                f"family={family.name} has {name} outputs; switch it off with ~{where} or give "
                "it a strategy for this family (see conf/analysis/default.yaml)")

    def run(self, ctx: AnalysisContext) -> dict[str, Any]:
        raise NotImplementedError

    def figures(self, ctx: AnalysisContext, result: dict, fig_dir: Path) -> list[Path]:
        """Draw PNG figures into ``fig_dir``; return their paths."""
        return []

    def report(self, ctx: AnalysisContext, result: dict, figures: list[Path]) -> str:
        """A markdown section for report.md (figures are relative to the analysis folder)."""
        return ""

    def scalars(self, result: dict) -> dict[str, float]:
        """Flat scalars to log to W&B as ``<name>/<key>``."""
        return {}

    def tables(self, result: dict) -> dict[str, tuple[list[str], list[list]]]:
        """W&B tables: name -> (columns, rows)."""
        return {}

    def histograms(self, result: dict) -> dict[str, list[float]]:
        """W&B histograms: name -> values."""
        return {}
