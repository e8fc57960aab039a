"""Small matplotlib helpers shared by the analysis callbacks (Agg backend, PNG out)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {"ceiling": "#2b8a3e", "naive": "#c92a2a", "rotated": "#1c7ed6", "floor": "#868e96"}


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ev_bars(summary: dict[str, dict[str, float]], kinds, definition: str, path: Path, title: str) -> Path:
    """Grouped bars: one group per site, one bar per kind (ceiling/naive/rotated/floor)."""
    sites = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sites)), 4))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        vals = [summary[s][f"{kind}_{definition}"] for s in sites]
        xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(sites))]
        ax.bar(xs, vals, width, label=kind, color=COLOURS.get(kind))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels([s.replace("blocks.", "").replace("hook_resid_", "") for s in sites])
    ax.set_ylabel(f"explained variance ({definition})")
    ax.set_title(title, fontsize=10)
    lo = min(min(summary[s][f"{k}_{definition}"] for k in kinds) for s in sites)
    ax.set_ylim(max(lo - 0.1, -2.0), 1.05)
    ax.legend(fontsize=8)
    return save(fig, path)
