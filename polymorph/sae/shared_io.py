"""Reading and writing what the cross-seed stage leaves beside the seed folders: cohort records
(which seeds and rows a shared dictionary was trained on) and the consensus maps.

``consensus.safetensors`` holds, for S seeds in the order of ``cohort.json``'s ``seeds``:
``matrix`` [S, d, d] (R_s, float64: ``x_s`` maps to ``(x_s - source_mean[s]) R_s +
target_mean[s]``), ``source_mean`` [S, d] and ``target_mean`` [S, d] (every row the reference
seed's mean), ``singular_values`` [S, d] (of each seed's cross-covariance with the consensus at
the last iteration: small values mark directions the map is not determined on) and ``seeds`` [S] (int64, the same order, so the file alone is unambiguous). Its
safetensors metadata repeats the group and the cohort id. Both files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polymorph.align.procrustes import Rotation
from polymorph.files import atomic_write_json, read_json, save_tensors
from polymorph.layout import RunLayout
from polymorph.versions import library_versions

FORMAT = "polymorph.shared.v1"


def run_fingerprint(layout: RunLayout) -> str:
    """A short hash of a finished run's ``metrics.json``: it changes when the run is rebuilt
    (``retrain=true``), so a shared dictionary of the old weights is never mistaken for one of
    the new."""
    return hashlib.sha256(layout.final_metrics.read_bytes()).hexdigest()[:12]


def cohort_id(seeds: list[int], identity: dict[str, Any]) -> str:
    """``seeds_<s1>-<s2>-...-<hash8>`` (``<n>seeds-<hash8>`` beyond 12 seeds); the hash covers
    ``identity`` (everything that defines the training rows)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    label = ("seeds_" + "-".join(str(s) for s in seeds)) if len(seeds) <= 12 else \
        f"{len(seeds)}seeds"
    return f"{label}-{digest.hexdigest()[:8]}"


def write_cohort(path: Path, record: dict[str, Any]) -> None:
    """``cohort.json`` (the ``format`` tag and library versions added); written last."""
    atomic_write_json(path, {"format": FORMAT, **record, "versions": library_versions()})


def read_cohort(path: Path) -> dict[str, Any]:
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} cohort record; delete its folder and rerun "
                         "python train.py stage=shared ...")
    return record


def save_consensus(path: Path, seeds: list[int], maps: list[Rotation], cohort: str) -> None:
    """The per-seed maps into the consensus frame (module docstring), in ``seeds`` order."""
    if len(seeds) != len(maps) or not maps:
        raise ValueError(f"one map per seed: {len(seeds)} seeds, {len(maps)} maps")
    tensors = {
        "matrix": torch.stack([m.matrix for m in maps]).double(),
        "source_mean": torch.stack([m.source_mean for m in maps]).double(),
        "target_mean": torch.stack([m.target_mean for m in maps]).double(),
        "singular_values": torch.stack([_singular(m) for m in maps]).double(),
        "seeds": torch.tensor([int(s) for s in seeds], dtype=torch.int64),
    }
    save_tensors(path, tensors, {"format": FORMAT, "group": maps[0].group, "cohort": cohort,
                                 "n_fit_rows": str(maps[0].n_fit_rows)})


def _singular(rotation: Rotation) -> torch.Tensor:
    sv = rotation.singular_values
    return sv if sv.numel() == rotation.d else torch.full((rotation.d,), float("nan"))


@dataclass(frozen=True)
class SavedConsensus:
    """The maps of one consensus frame, by model seed (``maps[s].apply(x_s)`` ~ consensus)."""

    maps: dict[int, Rotation]
    group: str

    @property
    def seeds(self) -> list[int]:
        return list(self.maps)


def load_consensus(path: Path) -> SavedConsensus:
    """Read a file written by :func:`save_consensus`; ValueError naming the file if it is not
    one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        seeds = [int(s) for s in tensors["seeds"].tolist()]
        matrix, src, tgt = tensors["matrix"], tensors["source_mean"], tensors["target_mean"]
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises several types for a bad file
        raise ValueError(f"{path} is not a readable consensus file ({type(err).__name__}: "
                         f"{err}); delete its cohort folder and rerun python train.py "
                         "stage=shared shared=universal") from err
    group = meta.get("group", "O")
    n_fit = int(meta.get("n_fit_rows", 0))
    sv = tensors.get("singular_values")
    maps = {seed: Rotation(matrix=matrix[i], source_mean=src[i], target_mean=tgt[i],
                           group=group, n_fit_rows=n_fit,
                           singular_values=sv[i] if sv is not None else torch.empty(0))
            for i, seed in enumerate(seeds)}
    return SavedConsensus(maps=maps, group=group)
