"""The cross-seed crosscoder configuration and its folder name (no torch, like ``sae.config``)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from polymorph.sae.config import _to_plain_dict

CROSSCODER_ARCHITECTURES = ("relu_l1", "topk")
_KEYS_HINT = "see polymorph.sae.crosscoder_config.CrosscoderConfig"


@dataclass(frozen=True)
class CrosscoderConfig:
    """Everything that determines one trained crosscoder, given its seeds' activations.

    ``n_seeds`` row-aligned activation matrices of width ``d_in`` share one code of
    ``d_latent = expansion * d_in`` latents. ``relu_l1`` uses ``l1_coefficient`` (the L1 of
    each latent weighted by the sum over seeds of its decoder row norms, in sae-lens'
    normalisation: squared error summed over d_in and over seeds); ``topk`` uses ``k`` (latents
    kept per row). The other key must be null. ``init_seed`` is the integer seed of the initial
    weights (one crosscoder covers every seed, so there is no per-model mode); ``data_seed``
    orders the minibatches.
    """

    architecture: str
    n_seeds: int
    d_in: int
    expansion: int
    l1_coefficient: float | None
    k: int | None
    lr: float
    batch_size: int
    steps: int
    init_seed: int
    data_seed: int

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "lr", float(self.lr))
        if self.l1_coefficient is not None:
            object.__setattr__(self, "l1_coefficient", float(self.l1_coefficient))

    @property
    def d_latent(self) -> int:
        """Size of the shared code: ``expansion * d_in``."""
        return self.expansion * self.d_in

    @classmethod
    def from_dict(cls, mapping: Any) -> CrosscoderConfig:
        """Build from a plain mapping or an OmegaConf ``DictConfig``; every key is required.

        Raises ValueError naming the key for a missing key, an unknown key or a bad value.
        """
        data = _to_plain_dict(mapping)
        expected = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(expected))
        missing = [name for name in expected if name not in data]
        if unknown:
            raise ValueError(f"unknown crosscoder config key(s) {unknown}; the allowed keys are "
                             f"{expected} ({_KEYS_HINT})")
        if missing:
            raise ValueError(f"crosscoder config is missing key(s) {missing}; every one of "
                             f"{expected} must be set ({_KEYS_HINT})")
        return cls(**{name: data[name] for name in expected})

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict with every key."""
        return asdict(self)


def crosscoder_config_id(cfg: CrosscoderConfig) -> str:
    """A readable folder name; the 6-hex suffix hashes every field, as ``sae.config_id`` does.

    E.g. ``crosscoder_relu_l1-n9-d64-x8-l1_0.001-init0-s1000-1a2b3c``.
    """
    sparsity = f"l1_{cfg.l1_coefficient:g}" if cfg.architecture == "relu_l1" else f"k{cfg.k}"
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:6]
    return (f"crosscoder_{cfg.architecture}-n{cfg.n_seeds}-d{cfg.d_in}-x{cfg.expansion}-"
            f"{sparsity}-init{cfg.init_seed}-s{cfg.steps}-{digest}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"crosscoder config {name} must be an integer >= {minimum}, got "
                         f"{value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"crosscoder config {name} must be a finite number > 0, got {value!r}")


def _validate(cfg: CrosscoderConfig) -> None:
    if cfg.architecture not in CROSSCODER_ARCHITECTURES:
        raise ValueError(f"crosscoder config architecture must be one of "
                         f"{list(CROSSCODER_ARCHITECTURES)}, got {cfg.architecture!r}")
    for name, minimum in (("n_seeds", 1), ("d_in", 1), ("expansion", 1), ("batch_size", 1),
                          ("steps", 1), ("init_seed", 0), ("data_seed", 0)):
        _check_int(name, getattr(cfg, name), minimum=minimum)
    _check_positive_float("lr", cfg.lr)
    if cfg.architecture == "relu_l1":
        if cfg.l1_coefficient is None:
            raise ValueError("crosscoder config l1_coefficient must be set (a number > 0) for "
                             "architecture relu_l1")
        _check_positive_float("l1_coefficient", cfg.l1_coefficient)
        if cfg.k is not None:
            raise ValueError(f"crosscoder config k is only used by architecture topk; set k: "
                             f"null for relu_l1 (got k={cfg.k!r})")
    else:
        if cfg.k is None:
            raise ValueError("crosscoder config k must be set (an integer >= 1) for "
                             "architecture topk")
        _check_int("k", cfg.k, minimum=1)
        if cfg.k > cfg.d_latent:
            raise ValueError(f"crosscoder config k={cfg.k} exceeds d_latent={cfg.d_latent} "
                             f"(expansion {cfg.expansion} x d_in {cfg.d_in})")
        if cfg.l1_coefficient is not None:
            raise ValueError("crosscoder config l1_coefficient is only used by architecture "
                             "relu_l1; set l1_coefficient: null for topk (got "
                             f"{cfg.l1_coefficient!r})")
