"""The SAE training configuration (the Hydra group ``sae``), init seeds and folder names.

This module is deliberately light (no torch, no sae-lens): Hydra configs can be validated and
folder names computed without importing the training stack.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

ARCHITECTURES = ("relu_l1", "topk")
INIT_SEED_MODES = ("shared", "per_model")

# The per_model init seed mixes (shared_init_seed, model_seed) through SHA-256 under this tag:
# a fixed, documented function whose values are well spread over [0, 2^63), so seeds of
# different models (and the small integers used as shared seeds) do not coincide in practice.
_PER_MODEL_TAG = "polymorph.sae.init_seed.per_model.v1"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class SAETrainConfig:
    """Everything that determines one trained SAE, given its activations and init seed.

    ``init_seed`` is the *mode* (``shared`` | ``per_model``); the integer seed actually used
    to initialise an SAE comes from :func:`resolve_init_seed`. ``l1_coefficient`` is only used
    (and required) by ``relu_l1``; ``k`` only by ``topk``: a value set for the other
    architecture is rejected rather than silently ignored.
    """

    architecture: str
    expansion: int
    l1_coefficient: float | None
    k: int | None
    lr: float
    batch_size: int
    steps: int
    init_seed: str
    shared_init_seed: int
    data_seed: int

    def __post_init__(self) -> None:
        _validate(self)
        # 1 and 1.0 train the same SAE: store floats so to_dict (and config_id) agree.
        object.__setattr__(self, "lr", float(self.lr))
        if self.l1_coefficient is not None:
            object.__setattr__(self, "l1_coefficient", float(self.l1_coefficient))

    @classmethod
    def from_dict(cls, mapping: Any) -> SAETrainConfig:
        """Build from a plain mapping or an OmegaConf ``DictConfig`` (e.g. ``cfg.sae``).

        Raises ValueError naming the key for a missing key, an unknown key or a bad value.
        """
        data = _to_plain_dict(mapping)
        expected = [f.name for f in fields(cls)]
        missing = [name for name in expected if name not in data]
        unknown = sorted(set(data) - set(expected))
        if unknown:
            raise ValueError(
                f"unknown SAE config key(s) {unknown}; the allowed keys are {expected} "
                "(see conf/sae/relu_l1.yaml)"
            )
        if missing:
            raise ValueError(
                f"SAE config is missing key(s) {missing}; every one of {expected} must be set "
                "(see conf/sae/relu_l1.yaml)"
            )
        return cls(**{name: data[name] for name in expected})

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict with exactly the keys of ``conf/sae/*.yaml``."""
        return asdict(self)

    def d_sae(self, d_in: int) -> int:
        """Dictionary size for activations of width ``d_in``: ``expansion * d_in``."""
        return self.expansion * d_in


def resolve_init_seed(cfg: SAETrainConfig, model_seed: int) -> int:
    """The integer seed that initialises the SAE of the model trained with ``model_seed``.

    ``shared``: ``cfg.shared_init_seed`` for every model (as in the published runs; this is the
    confound: an untrained or dead feature keeps its initial decoder row, which is then
    identical across models). ``per_model``: the first 63 bits of
    SHA-256("<tag>:<shared_init_seed>:<model_seed>"), so distinct model seeds get distinct,
    well-mixed seeds, and ``shared_init_seed`` still selects a whole family of them.
    """
    _check_int("model_seed", model_seed, minimum=0)
    if cfg.init_seed == "shared":
        return cfg.shared_init_seed
    digest = hashlib.sha256(
        f"{_PER_MODEL_TAG}:{cfg.shared_init_seed}:{model_seed}".encode()
    ).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def config_id(cfg: SAETrainConfig) -> str:
    """A readable, filesystem-safe folder name for ``cfg``.

    The readable part names the hyperparameters one usually sweeps; the 6-hex suffix is a
    hash of *every* field of the config, so two configs that would train different SAEs
    never share a name (e.g. ``relu_l1-x8-l1_0.001-init_shared-s1000-3fa2c1``).
    """
    sparsity = f"l1_{cfg.l1_coefficient:g}" if cfg.architecture == "relu_l1" else f"k{cfg.k}"
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:6]
    name = (
        f"{cfg.architecture}-x{cfg.expansion}-{sparsity}-init_{cfg.init_seed}-s{cfg.steps}-{digest}"
    )
    if not _SAFE_NAME.match(name):  # pragma: no cover - every field is validated above
        raise ValueError(f"config id {name!r} is not filesystem-safe")
    return name


# --------------------------------------------------------------------------- validation


def _to_plain_dict(mapping: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ()  # type: ignore[assignment]
    if DictConfig and isinstance(mapping, DictConfig):
        mapping = OmegaConf.to_container(mapping, resolve=True)
    if isinstance(mapping, Mapping):
        return dict(mapping)
    raise ValueError(
        f"the SAE config must be a mapping (dict or DictConfig), got {type(mapping).__name__}"
    )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SAE config {name} must be an integer >= {minimum}, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"SAE config {name} must be a finite number > 0, got {value!r}")


def _validate(cfg: SAETrainConfig) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"SAE config architecture must be one of {list(ARCHITECTURES)}, "
            f"got {cfg.architecture!r}"
        )
    _check_int("expansion", cfg.expansion, minimum=1)
    if cfg.architecture == "relu_l1":
        if cfg.l1_coefficient is None:
            raise ValueError(
                "SAE config l1_coefficient must be set (a number > 0) for architecture relu_l1"
            )
        _check_positive_float("l1_coefficient", cfg.l1_coefficient)
        if cfg.k is not None:
            raise ValueError(
                f"SAE config k is only used by architecture topk; set k: null for relu_l1 "
                f"(got k={cfg.k!r})"
            )
    else:
        if cfg.k is None:
            raise ValueError("SAE config k must be set (an integer >= 1) for architecture topk")
        _check_int("k", cfg.k, minimum=1)
        if cfg.l1_coefficient is not None:
            raise ValueError(
                "SAE config l1_coefficient is only used by architecture relu_l1; set "
                f"l1_coefficient: null for topk (got {cfg.l1_coefficient!r})"
            )
    _check_positive_float("lr", cfg.lr)
    _check_int("batch_size", cfg.batch_size, minimum=1)
    _check_int("steps", cfg.steps, minimum=1)
    if cfg.init_seed not in INIT_SEED_MODES:
        raise ValueError(
            f"SAE config init_seed must be one of {list(INIT_SEED_MODES)}, got {cfg.init_seed!r}"
        )
    _check_int("shared_init_seed", cfg.shared_init_seed, minimum=0)
    _check_int("data_seed", cfg.data_seed, minimum=0)
