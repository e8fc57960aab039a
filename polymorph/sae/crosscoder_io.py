"""Saving and loading one crosscoder folder.

A crosscoder folder holds::

    crosscoder_cfg.json            {"format": "polymorph.crosscoder.v1",
                                    "config": CrosscoderConfig.to_dict(),
                                    "config_id": crosscoder_config_id(config),
                                    "tensors": {name: [shape]},
                                    "metadata": {site, seeds, experiment, ..., versions}}
    crosscoder_weights.safetensors W_enc [n_seeds, d_in, d_latent], W_dec [n_seeds, d_latent,
                                    d_in], b_enc [d_latent], b_dec [n_seeds, d_in]; float32

Seed axis order = the order of the activation matrices the crosscoder was trained on; record
which model seeds those were in ``metadata["seeds"]`` (a list, one per index). The weights are
stored as they are in the module; :func:`polymorph.sae.crosscoder_train.train_crosscoder`
returns (and so normally saves) the folded form, where every latent's decoder norms sum to 1
over the seeds. As with SAE folders (:mod:`polymorph.sae.io`), the folder is written in a
hidden sibling temp folder and renamed into place, so a folder with the final name is always
complete; loading needs only torch, safetensors and sae-lens (no Lightning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polymorph.files import atomic_folder
from polymorph.sae.crosscoder import Crosscoder
from polymorph.sae.crosscoder_config import CrosscoderConfig, crosscoder_config_id
from polymorph.versions import library_versions

CROSSCODER_CFG_FILE = "crosscoder_cfg.json"
CROSSCODER_WEIGHTS_FILE = "crosscoder_weights.safetensors"
CROSSCODER_FOLDER_FILES = (CROSSCODER_CFG_FILE, CROSSCODER_WEIGHTS_FILE)
FORMAT = "polymorph.crosscoder.v1"
TENSOR_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")


@dataclass(frozen=True)
class SavedCrosscoder:
    """One crosscoder folder read back."""

    folder: Path
    crosscoder: Crosscoder
    config_id: str
    metadata: dict[str, Any]


def save_crosscoder(crosscoder: Crosscoder, folder: str | Path, *,
                    metadata: dict[str, Any]) -> Path:
    """Write ``crosscoder`` to ``folder`` (replacing an existing one) atomically; return it.

    ``metadata`` must be JSON-serialisable (e.g. ``{"site": ..., "seeds": [...],
    "experiment": ...}``); a ``versions`` entry (polymorph, sae-lens, torch) is added unless
    present.
    """
    if not isinstance(crosscoder, Crosscoder):
        raise TypeError(f"expected a polymorph Crosscoder, got {type(crosscoder).__name__}")
    folder = Path(folder)
    record = dict(metadata)
    record.setdefault("versions", library_versions())
    tensors = {name: getattr(crosscoder, name).detach().to("cpu", torch.float32).contiguous()
               for name in TENSOR_NAMES}
    cfg_text = _dumps({
        "format": FORMAT,
        "config": crosscoder.cfg.to_dict(),
        "config_id": crosscoder_config_id(crosscoder.cfg),
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "metadata": record,
    })

    with atomic_folder(folder) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / CROSSCODER_WEIGHTS_FILE))
        (tmp / CROSSCODER_CFG_FILE).write_text(cfg_text)
    return folder


def load_crosscoder(folder: str | Path, *, device: str = "cpu") -> SavedCrosscoder:
    """Read a folder written by :func:`save_crosscoder`.

    Raises FileNotFoundError if the folder or a file is missing and ValueError if a file cannot
    be parsed or its tensors do not match the stored config; messages name the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"crosscoder folder {folder} does not exist")
    missing = [name for name in CROSSCODER_FOLDER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"crosscoder folder {folder} is incomplete (missing {missing})")
    try:
        record = json.loads((folder / CROSSCODER_CFG_FILE).read_text())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        cfg = CrosscoderConfig.from_dict(record["config"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise ValueError(f"crosscoder folder {folder} has an unreadable {CROSSCODER_CFG_FILE} "
                         f"({type(err).__name__}: {err})") from err
    try:
        tensors = load_file(str(folder / CROSSCODER_WEIGHTS_FILE), device=device)
    except Exception as err:  # safetensors raises several types for a bad file
        raise ValueError(f"crosscoder folder {folder} has an unreadable "
                         f"{CROSSCODER_WEIGHTS_FILE} ({type(err).__name__}: {err})") from err
    crosscoder = Crosscoder(cfg, init=False).to(device)
    expected = {name: tuple(getattr(crosscoder, name).shape) for name in TENSOR_NAMES}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise ValueError(f"crosscoder folder {folder}: the weights have tensors {found}, its "
                         f"config needs {expected}")
    crosscoder.load_state_dict(tensors)
    crosscoder.eval()
    return SavedCrosscoder(folder=folder, crosscoder=crosscoder,
                           config_id=crosscoder_config_id(cfg),
                           metadata=dict(record.get("metadata", {})))


def _dumps(data: Any) -> str:
    try:
        return json.dumps(data, indent=1, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "crosscoder metadata must be JSON-serialisable (convert tensors with .tolist() and "
            f"DictConfig with OmegaConf.to_container): {err}"
        ) from err
