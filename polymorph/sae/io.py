"""Saving and loading one SAE folder in SAELens format, plus polymorph's own JSON files.

An SAE folder holds::

    cfg.json                  sae-lens config; its "metadata" has hook_name, model_name, ...
    sae_weights.safetensors   sae-lens weights (W_enc, b_enc, W_dec, b_dec)
    polymorph.json            polymorph metadata: model seed, site, config id, init seed,
                              the SAE config, library versions
    metrics.json              evaluate_sae(...) on the stored activations

``sae_lens.SAE.load_from_disk(folder)`` reads the first two files on its own. The folder is
written in a hidden sibling temp folder and renamed into place, so a folder with the final
name is always complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_lens import SAE

from polymorph.files import atomic_folder
from polymorph.versions import library_versions

SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
POLYMORPH_FILE = "polymorph.json"
METRICS_FILE = "metrics.json"
SAE_FOLDER_FILES = (SAE_CFG_FILE, SAE_WEIGHTS_FILE, POLYMORPH_FILE, METRICS_FILE)

REGENERATE_HINT = (
    "regenerate it by rerunning the SAE stage for that seed, e.g. "
    "`python train.py seed=<N> stage=sae retrain_saes=true` (plus the same sae.* overrides)"
)


@dataclass(frozen=True)
class SavedSAE:
    """One SAE folder read back: the inference SAE and polymorph's two JSON files."""

    folder: Path
    sae: SAE
    metadata: dict[str, Any]
    metrics: dict[str, Any]


def save_sae(
    sae: SAE, folder: str | Path, *, metadata: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    """Write ``sae`` to ``folder`` (replacing an existing one) atomically; return the path.

    ``metadata`` and ``metrics`` must be JSON-serialisable (plain dicts, lists, numbers,
    strings); a ``versions`` entry (polymorph, sae-lens, torch) is added to ``metadata``
    unless present. The model identity belongs in ``sae.cfg.metadata`` (``hook_name``,
    ``model_name``), which :func:`polymorph.sae.train.train_sae` fills.
    """
    folder = Path(folder)
    if not sae.cfg.metadata.get("hook_name") or not sae.cfg.metadata.get("model_name"):
        raise ValueError(
            "the SAE's sae-lens metadata lacks hook_name or model_name; train it with "
            "polymorph.sae.train_sae(..., hook_name=..., model_name=...) or set "
            "sae.cfg.metadata.hook_name / .model_name before saving"
        )
    record = dict(metadata)
    record.setdefault("versions", library_versions())
    polymorph_text = _dumps(record, "metadata")
    metrics_text = _dumps(metrics, "metrics")

    with atomic_folder(folder) as tmp:
        sae.save_model(tmp)
        (tmp / POLYMORPH_FILE).write_text(polymorph_text)
        (tmp / METRICS_FILE).write_text(metrics_text)
    return folder


def load_sae(folder: str | Path, *, device: str = "cpu") -> SavedSAE:
    """Read an SAE folder written by :func:`save_sae`.

    Raises FileNotFoundError if the folder or one of its files is missing and ValueError if
    a file cannot be parsed; both messages name the folder and say how to regenerate it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder {folder} does not exist; {REGENERATE_HINT}")
    missing = [name for name in SAE_FOLDER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SAE folder {folder} is incomplete (missing {missing}); {REGENERATE_HINT}"
        )
    try:
        sae = SAE.load_from_disk(folder, device=device)
    except Exception as err:  # sae-lens / safetensors raise many types for a bad file
        raise ValueError(
            f"SAE folder {folder} has an unreadable {SAE_CFG_FILE} or {SAE_WEIGHTS_FILE} "
            f"({type(err).__name__}: {err}); {REGENERATE_HINT}"
        ) from err
    metadata = _read_json(folder, POLYMORPH_FILE)
    metrics = _read_json(folder, METRICS_FILE)
    return SavedSAE(folder=folder, sae=sae, metadata=metadata, metrics=metrics)


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"SAE folder {folder} has an unreadable {name} ({err}); {REGENERATE_HINT}"
        ) from err
    if isinstance(data, dict):
        return data
    raise ValueError(f"SAE folder {folder}: {name} is not a JSON object; {REGENERATE_HINT}")


def _dumps(data: Any, what: str) -> str:
    try:
        return json.dumps(data, indent=1, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"SAE {what} must be JSON-serialisable (convert tensors with .tolist() and "
            f"DictConfig with OmegaConf.to_container): {err}"
        ) from err
