"""The cross-seed stage's settings (the Hydra group ``shared``), checked from the config alone.

``conf/shared/universal.yaml`` and ``conf/shared/crosscoder.yaml`` are the two methods. Every
check here runs before any model, activation or dictionary is loaded, so a bad setting costs a
second and one line saying what to write instead. Light: the SAE stage (and with it torch) is
imported only to read the universal SAE's ladder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError
from polymorph.sae.config import SAETrainConfig
from polymorph.sae.crosscoder_config import CrosscoderConfig
from polymorph.sae.shared_layout import METHODS

GROUPS = ("O", "SO")
#: set by the stage from the seeds and the activations, never by the config
_CROSSCODER_RUNTIME_KEYS = ("n_seeds", "d_in")
#: a width for checking crosscoder rungs before any activation is read (k <= d_latent is
#: checked again with the real width before anything trains)
_PLACEHOLDER_D_IN = 1 << 20


@dataclass(frozen=True)
class SharedSettings:
    """``cfg.shared`` validated.

    Attributes:
        method: "universal" or "crosscoder".
        seeds: the model seeds to span (None: every finished seed of the experiment).
        min_rungs: dictionaries per site needed for a matched-L0 comparison.
        reference: the seed whose frame the consensus is expressed in (universal; falls back
            to the first seed when it is not among them).
        group: "O" or "SO" for the consensus maps (universal).
        fit_batch: the token-batch spec the consensus maps are fitted on (universal).
        sae_configs: the universal SAE's rungs (the job's ``sae`` / ``sae_ladder`` configs).
        crosscoder_rungs: the crosscoder rungs, full configs without ``n_seeds`` / ``d_in``.
    """

    method: str
    seeds: tuple[int, ...] | None
    min_rungs: int
    reference: int | None = None
    group: str = "O"
    fit_batch: DictConfig | None = None
    sae_configs: tuple[SAETrainConfig, ...] = ()
    crosscoder_rungs: tuple[dict[str, Any], ...] = ()

    @property
    def n_rungs(self) -> int:
        return len(self.sae_configs) if self.method == "universal" else len(self.crosscoder_rungs)


def parse_shared(cfg: DictConfig) -> SharedSettings:
    """``cfg.shared`` checked and resolved; raises PolymorphError with one line per mistake."""
    node = cfg.get("shared")
    if node is None:
        raise PolymorphError("stage=shared needs a method: shared=universal (one SAE on every "
                             "seed's consensus-frame activations) or shared=crosscoder "
                             "(conf/shared/)")
    method = str(node.get("method"))
    if method not in METHODS:
        raise PolymorphError(f"shared.method={method} is unknown; use one of {', '.join(METHODS)}"
                             " (conf/shared/)")
    seeds = _seeds(node.get("seeds"))
    min_rungs = node.get("min_rungs", 3)
    if isinstance(min_rungs, bool) or not isinstance(min_rungs, int) or min_rungs < 1:
        raise PolymorphError(f"shared.min_rungs={min_rungs!r} must be an integer >= 1")
    if method == "universal":
        return _universal(cfg, node, seeds, min_rungs)
    return _crosscoder(cfg, node, seeds, min_rungs)


def _seeds(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = list(value) if not isinstance(value, (int, str)) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad or not values:
        raise PolymorphError(f"shared.seeds={value!r} must be null (every finished seed) or a "
                             "list of non-negative seeds, e.g. shared.seeds=[0,1,2]")
    if len(set(values)) != len(values):
        raise PolymorphError(f"shared.seeds={values} lists a seed twice")
    return tuple(sorted(values))


def _universal(cfg: DictConfig, node: DictConfig, seeds, min_rungs: int) -> SharedSettings:
    group = str(node.get("group", "O"))
    if group not in GROUPS:
        raise PolymorphError(f"shared.group={group} is unknown; use O or SO")
    fit_batch = _fit_batch(cfg, node.get("fit_batch"))
    from polymorph.sae.stage import ladder_configs  # the SAE stage's own rung parsing

    configs = tuple(ladder_configs(cfg))  # PolymorphError naming a bad rung
    if len(configs) < min_rungs:
        raise PolymorphError(
            f"shared=universal trains one universal SAE per SAE config of this job (the `sae` "
            f"group, or every rung of `sae_ladder`): {len(configs)} config(s) is fewer than "
            f"shared.min_rungs={min_rungs} needed to compare at matched L0; add the ladder the "
            f"per-seed SAEs were trained with, e.g. sae_ladder=topk (conf/sae_ladder/)")
    reference = node.get("reference")
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int)):
        raise PolymorphError(f"shared.reference={reference!r} must be a seed (an integer)")
    return SharedSettings(method="universal", seeds=seeds, min_rungs=min_rungs,
                          reference=reference, group=group, fit_batch=fit_batch,
                          sae_configs=configs)


def _fit_batch(cfg: DictConfig, node) -> DictConfig:
    """The fit-batch spec without its unset keys, with every key the family's batches need
    (those of the SAE ``activations`` spec, bar the forward-pass settings)."""
    if not isinstance(node, DictConfig):
        raise PolymorphError("shared.fit_batch must be a token-batch spec like analysis.fit_batch "
                             "(n_sequences, seed, ... for Dyck; n_sequences, seq_len, offset for a "
                             "corpus): the batch the consensus maps are fitted on")
    spec = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}
    needed = [k for k in cfg.activations if k not in ("batch_size", "dtype")]
    absent = [k for k in needed if k not in spec]
    if absent:
        raise PolymorphError(
            f"shared.fit_batch lacks {absent}: this family's token batches are specified by "
            f"{needed} (as `activations` is); set them, e.g. shared.fit_batch.{absent[0]}=...")
    return OmegaConf.create(spec)


def _crosscoder(cfg: DictConfig, node: DictConfig, seeds, min_rungs: int) -> SharedSettings:
    base = node.get("crosscoder")
    if not isinstance(base, DictConfig):
        raise PolymorphError("shared=crosscoder needs a `shared.crosscoder` mapping of crosscoder "
                             "config keys (conf/shared/crosscoder.yaml)")
    base = OmegaConf.to_container(base, resolve=True)
    rungs = node.get("rungs")
    rungs = OmegaConf.to_container(rungs, resolve=True) if rungs is not None else None
    if not isinstance(rungs, list) or not rungs:
        raise PolymorphError("shared.rungs must be a non-empty list of partial crosscoder configs, "
                             "e.g. [{k: 8}, {k: 16}, {k: 32}] (conf/shared/crosscoder.yaml)")
    allowed = [f.name for f in fields(CrosscoderConfig) if f.name not in _CROSSCODER_RUNTIME_KEYS]
    d_guess = _model_width(cfg)
    out, seen = [], {}
    for i, rung in enumerate(rungs):
        if not isinstance(rung, dict):
            raise PolymorphError(f"shared.rungs[{i}] must be a mapping of crosscoder config keys, "
                                 f"got {rung!r}")
        merged = {**base, **rung}
        fixed = [k for k in _CROSSCODER_RUNTIME_KEYS if k in merged]
        if fixed:
            raise PolymorphError(f"shared crosscoder rung {i} sets {fixed}: the stage sets them "
                                 "from the seeds and the activations; remove them")
        unknown = sorted(set(merged) - set(allowed))
        if unknown:
            raise PolymorphError(f"shared crosscoder rung {i} has unknown key(s) {unknown}; the "
                                 f"allowed keys are {allowed}")
        try:
            CrosscoderConfig.from_dict({**merged, "n_seeds": 2, "d_in": d_guess})
        except ValueError as err:
            raise PolymorphError(f"bad shared crosscoder rung {i} {rung}: {err}") from err
        key = json.dumps(merged, sort_keys=True)
        if key in seen:
            raise PolymorphError(f"shared.rungs {seen[key]} and {i} give the same crosscoder "
                                 "config; drop one of them")
        seen[key] = i
        out.append(merged)
    if len(out) < min_rungs:
        raise PolymorphError(f"shared.rungs has {len(out)} crosscoder config(s), fewer than "
                             f"shared.min_rungs={min_rungs} needed to compare at matched L0; add "
                             "rungs (e.g. shared.rungs='[{k:8},{k:16},{k:32}]')")
    return SharedSettings(method="crosscoder", seeds=seeds, min_rungs=min_rungs,
                          crosscoder_rungs=tuple(out))


def _model_width(cfg: DictConfig) -> int:
    """d_model when the config alone says it (the Dyck toy), else a placeholder width."""
    model = cfg.get("model")
    if isinstance(model, DictConfig) and isinstance(model.get("d_model"), int):
        return int(model.d_model)
    return _PLACEHOLDER_D_IN


def crosscoder_config(rung: dict[str, Any], n_seeds: int, d_in: int) -> CrosscoderConfig:
    """The full crosscoder config of one rung at the seeds' real count and width."""
    try:
        return CrosscoderConfig.from_dict({**rung, "n_seeds": int(n_seeds), "d_in": int(d_in)})
    except ValueError as err:
        raise PolymorphError(f"bad shared crosscoder rung {rung} at d_in={d_in}: {err}") from err
