"""Writing files so that a reader never sees half of one: the project's one atomic-write helper.

Every file polymorph writes (JSON records, YAML configs, safetensors weights and activations, SAE
folders) goes through these functions: the content is written to a temporary sibling and renamed
into place, so an interrupted job leaves either the old file or the new one, never a truncated
one. ``metrics.json`` being written last, atomically, is what marks a run finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class CorruptFileError(RuntimeError):
    """A file polymorph wrote earlier is unreadable (e.g. a disk filled up mid-write)."""


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` (float32, float16, bfloat16, float64), or a clear error."""
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"{what}={name} is unknown; use one of {', '.join(DTYPES)}") from None


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (by any library); it is renamed
    onto ``path`` when the block succeeds and deleted when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder path to fill (the writer may create it; it is created if the
    writer did not); it replaces ``folder`` (old content and all) when the block succeeds, so
    a folder with the final name is always complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(folder)
    try:
        yield tmp
        tmp.mkdir(exist_ok=True)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """safetensors file written atomically (tensors made contiguous and moved to the CPU)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)


def read_json(path: Path) -> dict:
    """A JSON file polymorph wrote; FileNotFoundError if absent, CorruptFileError if unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is corrupt (not valid JSON: {err}); delete it and rerun") from err
