"""Where everything lives inside an experiment folder: the one place for file names.

```
outputs/<experiment>/             the plain preset's runs; an ablation's runs are in
                                  outputs/<experiment>/<ablation keys>/ (polymorph.ablations)
  seed=<N>/                       one run per model seed
    config.yaml                   resolved config the transformer was trained with
    run.json                      seed, versions, parameter counts, status, timings
    metrics.json                  final metrics; written last: its presence means "finished"
    checkpoints/
      step=<000200>.safetensors   model weights every `training.eval_every` steps (kept)
      best.safetensors            best by val/min_acc      last.safetensors: most recent
      index.json                  step -> validation metrics of every saved checkpoint
      last.ckpt                   full Lightning state, used only to resume training
    activations/<site>.safetensors   SAE training activations (non-PAD positions)
    saes/<site>/<sae config id>/     one SAE in SAELens format (+ metrics.json, polymorph.json)
    logs/                         W&B offline run / CSV logs
  analysis/                       written by analyze.py
  <SAE or analysis keys>/analysis/  an SAE-only or analysis-only ablation's analysis
  comparison/                     written by compare.py (every compared ablation)
  _hydra/                         Hydra's own job logs
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SEED_DIR_PATTERN = re.compile(r"^seed=(\d+)$")
#: an ablation's analysis (results.json, report.md, figures/), inside the ablation's folder
ANALYSIS_DIR = "analysis"
#: a comparison across ablations, inside the experiment folder
COMPARISON_DIR = "comparison"


def experiment_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one seed's run folder."""

    root: Path

    @classmethod
    def for_seed(cls, output_root: str | Path, experiment: str, seed: int,
                 ablation: str = "") -> RunLayout:
        """The run of ``seed`` in ``experiment`` (``ablation``: its run-level key chain, e.g.
        ``io=shared``; empty for the plain preset)."""
        folder = experiment_dir(output_root, experiment)
        return cls.in_folder(folder / ablation if ablation else folder, seed)

    @classmethod
    def in_folder(cls, runs_dir: str | Path, seed: int) -> RunLayout:
        """The run of ``seed`` in a folder of seed runs."""
        return cls(Path(runs_dir) / f"seed={seed}")

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def final_metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step={step:06d}.safetensors"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def checkpoint_index(self) -> Path:
        return self.checkpoints / "index.json"

    @property
    def resume_state(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    def activation_file(self, site: str) -> Path:
        return self.activations / f"{site}.safetensors"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    def sae_dir(self, site: str, config_id: str) -> Path:
        return self.saes / site / config_id

    def is_finished(self) -> bool:
        return self.final_metrics.is_file()

    def step_checkpoints(self) -> dict[int, Path]:
        """Every kept step checkpoint, by step."""
        out = {}
        for path in sorted(self.checkpoints.glob("step=*.safetensors")):
            out[int(path.stem.split("=", 1)[1])] = path
        return out


def find_seed_runs(output_root: str | Path, experiment: str = "",
                   ablation: str = "") -> dict[int, RunLayout]:
    """All seed folders of an experiment's plain preset (or of its run-level ``ablation``),
    finished or not, by seed; with only ``output_root``, the seed folders in that folder."""
    exp = experiment_dir(output_root, experiment) if experiment else Path(output_root)
    if ablation:
        exp = exp / ablation
    runs = {}
    if exp.is_dir():
        for child in exp.iterdir():
            m = SEED_DIR_PATTERN.match(child.name)
            if m and child.is_dir():
                runs[int(m.group(1))] = RunLayout(child)
    return dict(sorted(runs.items()))
