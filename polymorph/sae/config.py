"""The SAE training configuration (the Hydra group ``sae``), init seeds and folder names.

This module is deliberately light (no torch, no sae-lens): Hydra configs can be validated and
folder names computed without importing the training stack.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

ARCHITECTURES = ("relu_l1", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
INIT_SEED_MODES = ("shared", "per_model")

# The keys every config has (those of conf/sae/relu_l1.yaml and topk.yaml, in field order), and
# the architecture-specific keys added later. The later keys are optional in from_dict and are
# left out of to_dict (hence of the config_id hash) when unset, so configs written before they
# existed keep their dicts and their folder names byte for byte.
CORE_KEYS = ("architecture", "expansion", "l1_coefficient", "k", "lr", "batch_size", "steps",
             "init_seed", "shared_init_seed", "data_seed")
OPTIONAL_KEYS = ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold",
                 "matryoshka_expansions", "mse_normalisation")
# How the reconstruction error the sparsity coefficient is weighed against is normalised:
# "mean" (the published loss: mean((x_hat - x)^2) over the batch AND the d_in dimensions), or
# unset/null: sae-lens' own loss (squared error summed over d_in, mean over the batch). The
# published coefficient therefore reaches sae-lens multiplied by d_in.
MSE_NORMALISATIONS = ("mean",)
# Architectures whose loss weighs a coefficient against the reconstruction error.
COEFFICIENT_ARCHITECTURES = ("relu_l1", "jumprelu")
# Which architectures use (and require) each sparsity key; every other architecture must leave
# it null, so a value that would be silently ignored is an error instead.
USED_BY: dict[str, tuple[str, ...]] = {
    "l1_coefficient": ("relu_l1",),
    "k": ("topk", "batchtopk", "matryoshka_batchtopk"),
    "l0_coefficient": ("jumprelu",),
    "jumprelu_bandwidth": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
    "matryoshka_expansions": ("matryoshka_batchtopk",),
}

# The per_model init seed mixes (shared_init_seed, model_seed) through SHA-256 under this tag:
# a fixed, documented function whose values are well spread over [0, 2^63), so seeds of
# different models (and the small integers used as shared seeds) do not coincide in practice.
_PER_MODEL_TAG = "polymorph.sae.init_seed.per_model.v1"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class SAETrainConfig:
    """Everything that determines one trained SAE, given its activations and init seed.

    ``init_seed`` is the *mode* (``shared`` | ``per_model``); the integer seed actually used
    to initialise an SAE comes from :func:`resolve_init_seed`. Sparsity keys by architecture
    (sae-lens training class in brackets; a key set for an architecture that does not use it is
    rejected rather than silently ignored):

    * ``relu_l1`` (StandardTrainingSAE): ``l1_coefficient``, the L1 weight; with
      ``mse_normalisation="mean"`` (the default configs) in the published normalisation (squared
      error averaged over d_in) and converted for sae-lens (x d_in), with ``None`` in sae-lens'
      own (squared error summed over d_in).
    * ``topk`` (TopKTrainingSAE): ``k``, an integer, active features per row.
    * ``batchtopk`` (BatchTopKTrainingSAE): ``k``, a number > 0, active features per row *on
      average over a minibatch* (the top ``k * batch_size`` pre-activations of the batch).
    * ``matryoshka_batchtopk`` (MatryoshkaBatchTopKTrainingSAE): ``k`` as for batchtopk and
      ``matryoshka_expansions``, the nested dictionary prefixes as multiples of d_in (strictly
      increasing integers, the last equal to ``expansion``; e.g. [1, 2, 4, 8] gives prefixes of
      64, 128, 256 and 512 latents at d_in 64), each trained to reconstruct on its own.
    * ``jumprelu`` (JumpReLUTrainingSAE, DeepMind's "step" L0 loss): ``l0_coefficient`` (weight
      of the expected L0), ``jumprelu_bandwidth`` (width of the straight-through window that
      gives the thresholds a gradient) and ``jumprelu_init_threshold``.

    ``mse_normalisation`` (relu_l1 and jumprelu only): ``mean`` states the coefficient in the
    published normalisation (squared error averaged over d_in), which polymorph converts for
    sae-lens by multiplying it by d_in (:meth:`sae_lens_coefficient`); null means the
    coefficient is already in sae-lens' own (squared error summed over d_in).

    The keys of ``OPTIONAL_KEYS`` may be omitted; ``to_dict`` omits them when unset.
    """

    architecture: str
    expansion: int
    l1_coefficient: float | None
    k: int | float | None
    lr: float
    batch_size: int
    steps: int
    init_seed: str
    shared_init_seed: int
    data_seed: int
    l0_coefficient: float | None = None
    jumprelu_bandwidth: float | None = None
    jumprelu_init_threshold: float | None = None
    matryoshka_expansions: tuple[int, ...] | None = None
    mse_normalisation: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.matryoshka_expansions, list):  # from YAML/JSON; frozen => hashable
            object.__setattr__(self, "matryoshka_expansions", tuple(self.matryoshka_expansions))
        _validate(self)
        # 1 and 1.0 train the same SAE: store floats so to_dict (and config_id) agree.
        object.__setattr__(self, "lr", float(self.lr))
        for name in ("l1_coefficient", "l0_coefficient", "jumprelu_bandwidth",
                     "jumprelu_init_threshold"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.architecture in ("batchtopk", "matryoshka_batchtopk"):
            object.__setattr__(self, "k", float(self.k))  # an average over rows, not a count

    @classmethod
    def from_dict(cls, mapping: Any) -> SAETrainConfig:
        """Build from a plain mapping or an OmegaConf ``DictConfig`` (e.g. ``cfg.sae``).

        Raises ValueError naming the key for a missing key, an unknown key or a bad value.
        Keys in ``OPTIONAL_KEYS`` may be absent (they default to null).
        """
        data = _to_plain_dict(mapping)
        allowed = [f.name for f in fields(cls)]
        missing = [name for name in CORE_KEYS if name not in data]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown SAE config key(s) {unknown}; the allowed keys are {allowed} "
                "(see conf/sae/relu_l1.yaml and conf/sae/jumprelu.yaml)"
            )
        if missing:
            raise ValueError(
                f"SAE config is missing key(s) {missing}; every one of {list(CORE_KEYS)} must "
                "be set (see conf/sae/relu_l1.yaml)"
            )
        return cls(**{name: data[name] for name in allowed if name in data})

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict with exactly the keys of ``conf/sae/*.yaml``.

        The ``CORE_KEYS`` always; each of ``OPTIONAL_KEYS`` only when set (so relu_l1 and topk
        configs give the same dict, and the same :func:`config_id`, as before those keys
        existed).
        """
        out = asdict(self)
        for name in OPTIONAL_KEYS:
            if out[name] is None:
                del out[name]
        if "matryoshka_expansions" in out:
            out["matryoshka_expansions"] = list(out["matryoshka_expansions"])
        return out

    def sae_lens_coefficient(self, d_in: int) -> float | None:
        """The sparsity coefficient (L1, or L0 for jumprelu) in sae-lens' normalisation."""
        value = self.l1_coefficient if self.architecture == "relu_l1" else self.l0_coefficient
        if value is None:
            return None
        return value * d_in if self.mse_normalisation == "mean" else value

    def d_sae(self, d_in: int) -> int:
        """Dictionary size for activations of width ``d_in``: ``expansion * d_in``."""
        return self.expansion * d_in

    def matryoshka_widths(self, d_in: int) -> list[int]:
        """sae-lens' ``matryoshka_widths`` (latents per nested prefix) at width ``d_in``."""
        if self.matryoshka_expansions is None:
            raise ValueError(f"architecture {self.architecture} has no matryoshka levels")
        return [m * d_in for m in self.matryoshka_expansions]


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
    never share a name (e.g. ``relu_l1-x8-l1_0.001-init_shared-s1000-3fa2c1``,
    ``jumprelu-x8-l0_1-init_shared-s1000-...``,
    ``matryoshka_batchtopk-x8-k32-m1_2_4_8-init_shared-s1000-...``). The hash is of
    :meth:`SAETrainConfig.to_dict`, which leaves unset optional keys out: adding keys did not
    rename any relu_l1 or topk folder.
    """
    sparsity = _sparsity_label(cfg)
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


def _sparsity_label(cfg: SAETrainConfig) -> str:
    unit = "mean" if cfg.mse_normalisation == "mean" else ""
    if cfg.architecture == "relu_l1":
        return f"l1{unit}_{cfg.l1_coefficient:g}"
    if cfg.architecture == "topk":
        return f"k{cfg.k}"
    if cfg.architecture == "jumprelu":
        return f"l0{unit}_{cfg.l0_coefficient:g}"
    label = f"k{cfg.k:g}"
    if cfg.architecture == "matryoshka_batchtopk":
        label += "-m" + "_".join(str(m) for m in cfg.matryoshka_expansions)
    return label


def _check_non_negative_float(name: str, value: Any) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0:
        raise ValueError(f"SAE config {name} must be a finite number >= 0, got {value!r}")


def _check_sparsity_keys(cfg: SAETrainConfig) -> None:
    arch = cfg.architecture
    for name, users in USED_BY.items():
        value = getattr(cfg, name)
        if arch not in users:
            if value is not None:
                raise ValueError(
                    f"SAE config {name} is only used by architecture {' / '.join(users)}; "
                    f"set {name}: null for {arch} (got {name}={value!r})"
                )
            continue
        if value is None:
            raise ValueError(f"SAE config {name} must be set for architecture {arch}")
        if name == "k" and arch == "topk":
            _check_int("k", value, minimum=1)
        elif name == "jumprelu_init_threshold":
            _check_non_negative_float(name, value)
        elif name == "matryoshka_expansions":
            _check_matryoshka(cfg)
        else:
            _check_positive_float(name, value)


def _check_matryoshka(cfg: SAETrainConfig) -> None:
    levels = cfg.matryoshka_expansions
    if not isinstance(levels, tuple) or len(levels) < 2:
        raise ValueError(
            "SAE config matryoshka_expansions must be a list of at least two nested dictionary "
            f"sizes in multiples of d_in, e.g. [1, 2, 4, {cfg.expansion}] (got {levels!r}; one "
            "level is plain batchtopk)"
        )
    for m in levels:
        _check_int("matryoshka_expansions entry", m, minimum=1)
    if any(b <= a for a, b in itertools.pairwise(levels)):
        raise ValueError(f"SAE config matryoshka_expansions must be strictly increasing, got "
                         f"{list(levels)}")
    if levels[-1] != cfg.expansion:
        raise ValueError(
            f"SAE config matryoshka_expansions must end with expansion={cfg.expansion} (the "
            f"whole dictionary), got {list(levels)}"
        )


def _validate(cfg: SAETrainConfig) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"SAE config architecture must be one of {list(ARCHITECTURES)}, "
            f"got {cfg.architecture!r}"
        )
    _check_int("expansion", cfg.expansion, minimum=1)
    _check_sparsity_keys(cfg)
    if cfg.mse_normalisation is not None:
        if cfg.mse_normalisation not in MSE_NORMALISATIONS:
            raise ValueError(
                f"SAE config mse_normalisation must be mean (the published loss: squared error "
                f"averaged over d_in) or null (sae-lens' sum over d_in), got "
                f"{cfg.mse_normalisation!r}")
        if cfg.architecture not in COEFFICIENT_ARCHITECTURES:
            raise ValueError(
                f"SAE config mse_normalisation only matters for {' / '.join(COEFFICIENT_ARCHITECTURES)} "
                f"(a coefficient weighed against the reconstruction error); set "
                f"mse_normalisation: null for {cfg.architecture}")
    _check_positive_float("lr", cfg.lr)
    _check_int("batch_size", cfg.batch_size, minimum=1)
    _check_int("steps", cfg.steps, minimum=1)
    if cfg.init_seed not in INIT_SEED_MODES:
        raise ValueError(
            f"SAE config init_seed must be one of {list(INIT_SEED_MODES)}, got {cfg.init_seed!r}"
        )
    _check_int("shared_init_seed", cfg.shared_init_seed, minimum=0)
    _check_int("data_seed", cfg.data_seed, minimum=0)
