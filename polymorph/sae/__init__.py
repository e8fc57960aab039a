"""SAE layer: train sae-lens SAEs on activation matrices, evaluate them, save/load them.

The configuration helpers import eagerly (no torch); the training, evaluation and I/O functions
load torch, Lightning and sae-lens on first use, so composing or validating configs stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from polymorph.sae.config import SAETrainConfig, config_id, resolve_init_seed

_LAZY = {
    "train_sae": "polymorph.sae.train",
    "ShuffledMinibatches": "polymorph.sae.train",
    "SAETrainingModule": "polymorph.sae.module",
    "build_training_sae": "polymorph.sae.module",
    "evaluate_sae": "polymorph.sae.evaluate",
    "METRIC_DEFINITIONS": "polymorph.sae.evaluate",
    "save_sae": "polymorph.sae.io",
    "load_sae": "polymorph.sae.io",
    "SavedSAE": "polymorph.sae.io",
    "SAE_FOLDER_FILES": "polymorph.sae.io",
    "CrosscoderConfig": "polymorph.sae.crosscoder_config",
    "crosscoder_config_id": "polymorph.sae.crosscoder_config",
    "Crosscoder": "polymorph.sae.crosscoder",
    "CrosscoderTrainingModule": "polymorph.sae.crosscoder_train",
    "train_crosscoder": "polymorph.sae.crosscoder_train",
    "save_crosscoder": "polymorph.sae.crosscoder_io",
    "load_crosscoder": "polymorph.sae.crosscoder_io",
    "SavedCrosscoder": "polymorph.sae.crosscoder_io",
}

__all__ = [
    "METRIC_DEFINITIONS",
    "SAE_FOLDER_FILES",
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderTrainingModule",
    "SAETrainConfig",
    "SAETrainingModule",
    "SavedCrosscoder",
    "SavedSAE",
    "ShuffledMinibatches",
    "build_training_sae",
    "config_id",
    "crosscoder_config_id",
    "evaluate_sae",
    "load_crosscoder",
    "load_sae",
    "resolve_init_seed",
    "save_crosscoder",
    "save_sae",
    "train_crosscoder",
    "train_sae",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polymorph.sae' has no attribute {name!r}")
