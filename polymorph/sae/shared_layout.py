"""Where the shared dictionaries of an experiment live: the one place for their file names.

A shared dictionary spans every seed of an experiment, so it lives beside the seed folders, not
inside one (``python train.py stage=shared shared=<method>`` writes it once per experiment)::

    outputs/<experiment>/shared/
      <site>/
        universal/
          <cohort id>/                      one consensus frame: these seeds, this fit batch
            cohort.json                     seeds, each seed's run fingerprint, activation and
                                            fit-batch specs, group, reference seed, the fit's
                                            residual fraction and iterations, versions
            consensus.safetensors           the per-seed maps into the consensus frame
            <sae config id>/                one universal SAE in SAELens format (cfg.json,
                                            sae_weights.safetensors) + polymorph.json +
                                            metrics.json; the id is the per-seed SAE's id of the
                                            same config, so the two are twins
        crosscoder/
          <cohort id>/                      these seeds' SAE-training activations
            cohort.json
            <crosscoder config id>/         crosscoder_cfg.json + crosscoder_weights.safetensors
                                            (polymorph.sae.crosscoder_io), metrics inside the
                                            cfg's metadata
      logs/                                 the stage's W&B / CSV logs
      .lock                                 held while a stage runs (one at a time)

A cohort id is ``seeds_<s1>-<s2>-...-<hash>``: the hash covers everything that defines the
training rows (the seeds, a fingerprint of each seed's finished run, the activation batch and,
for the universal SAE, the fit batch, group and reference seed of the maps), so a retrained
seed or another batch gives a new folder instead of silently reusing stale dictionaries. A
cohort folder is complete when ``cohort.json`` exists (written last); a dictionary folder when
its ``metrics.json`` (SAE) or ``crosscoder_cfg.json`` (crosscoder) exists (folders are renamed
into place whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHARED_DIR = "shared"
COHORT_FILE = "cohort.json"
CONSENSUS_FILE = "consensus.safetensors"
METHODS = ("universal", "crosscoder")
#: the file whose presence marks a finished dictionary folder, per method
FINISHED_FILE = {"universal": "metrics.json", "crosscoder": "crosscoder_cfg.json"}


@dataclass(frozen=True)
class SharedLayout:
    """Paths inside ``outputs/<experiment>/shared/``."""

    root: Path

    @classmethod
    def for_experiment(cls, experiment_dir: str | Path) -> SharedLayout:
        return cls(Path(experiment_dir) / SHARED_DIR)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def method_dir(self, site: str, method: str) -> Path:
        return self.root / site / method

    def cohort_dir(self, site: str, method: str, cohort: str) -> Path:
        return self.method_dir(site, method) / cohort

    def cohort_record(self, site: str, method: str, cohort: str) -> Path:
        return self.cohort_dir(site, method, cohort) / COHORT_FILE

    def consensus_file(self, site: str, cohort: str) -> Path:
        return self.cohort_dir(site, "universal", cohort) / CONSENSUS_FILE

    def dictionary_dir(self, site: str, method: str, cohort: str, config_id: str) -> Path:
        return self.cohort_dir(site, method, cohort) / config_id

    def is_finished(self, site: str, method: str, cohort: str, config_id: str) -> bool:
        return (self.dictionary_dir(site, method, cohort, config_id)
                / FINISHED_FILE[method]).is_file()

    def cohorts(self, site: str, method: str) -> list[Path]:
        """Every complete cohort folder of ``method`` at ``site`` (cohort.json present)."""
        folder = self.method_dir(site, method)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if (p / COHORT_FILE).is_file())

    def dictionaries(self, cohort_dir: Path, method: str) -> list[Path]:
        """Every finished dictionary folder inside one cohort folder, by name."""
        return sorted(p for p in cohort_dir.iterdir()
                      if p.is_dir() and (p / FINISHED_FILE[method]).is_file())

    def any_trained(self) -> bool:
        """True when the experiment has at least one complete cohort of either method."""
        return self.root.is_dir() and any(self.root.glob(f"*/*/*/{COHORT_FILE}"))
