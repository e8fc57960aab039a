"""Model weights on disk as safetensors: loading never unpickles anything.

Lightning's ``last.ckpt`` (needed to resume the optimiser and schedules) is the only
pickle-format file polymorph writes, and it is read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from polymorph.files import save_tensors


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or doesn't fit the model."""


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    """The model's state dict as safetensors (atomically), with JSON-encoded ``metadata``."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_tensors(path, dict(model.state_dict()), meta)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and polymorph metadata of a weights file, with a clear error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train the run first "
            f"(python train.py seed=<N> ...) or check the experiment name"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({err}); delete it and retrain the run "
            f"with retrain=true"
        ) from err
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return state, meta


def load_weights(model: torch.nn.Module, path: Path) -> dict:
    """Load weights into ``model`` in place; returns the file's metadata."""
    state, meta = read_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({str(err).splitlines()[0]}); was it written "
            f"with a different model config?"
        ) from err
    return meta
