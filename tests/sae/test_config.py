"""SAETrainConfig validation, the two Hydra files, init-seed resolution and config ids."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from polymorph.sae import SAETrainConfig, config_id, resolve_init_seed

CONF = Path(__file__).resolve().parents[2] / "conf" / "sae"
RELU = {
    "architecture": "relu_l1",
    "expansion": 8,
    "l1_coefficient": 1.0e-3,
    "k": None,
    "lr": 5.0e-4,
    "batch_size": 4096,
    "steps": 1000,
    "init_seed": "shared",
    "shared_init_seed": 0,
    "data_seed": 0,
}
TOPK = {**RELU, "architecture": "topk", "l1_coefficient": None, "k": 32}


@pytest.mark.parametrize("name", ["relu_l1", "topk"])
def test_yaml_files_load_and_round_trip(name):
    node = OmegaConf.load(CONF / f"{name}.yaml")
    cfg = SAETrainConfig.from_dict(node)  # a DictConfig, as Hydra hands it over
    assert cfg.architecture == name
    assert (cfg.expansion, cfg.lr, cfg.batch_size) == (8, 5.0e-4, 4096)
    assert cfg.init_seed == "shared"
    assert set(cfg.to_dict()) == set(OmegaConf.to_container(node))
    assert SAETrainConfig.from_dict(cfg.to_dict()) == cfg
    if name == "relu_l1":
        assert (cfg.l1_coefficient, cfg.k) == (1.0e-3, None)
    else:
        assert (cfg.l1_coefficient, cfg.k) == (None, 32)


@pytest.mark.parametrize("key", sorted(RELU))
def test_missing_key_is_named(key):
    data = {k: v for k, v in RELU.items() if k != key}
    with pytest.raises(ValueError, match=rf"missing key\(s\) \['{key}'\]"):
        SAETrainConfig.from_dict(data)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="l1_coeff"):
        SAETrainConfig.from_dict({**RELU, "l1_coeff": 1e-3})


BAD_VALUES = [
    (RELU, "architecture", "gated", "relu_l1"),
    (RELU, "expansion", 0, "expansion"),
    (RELU, "expansion", 8.0, "expansion"),
    (RELU, "expansion", True, "expansion"),
    (RELU, "l1_coefficient", -1e-3, "l1_coefficient"),
    (RELU, "l1_coefficient", None, "l1_coefficient"),
    (RELU, "l1_coefficient", float("nan"), "l1_coefficient"),
    (RELU, "k", 32, "k"),
    (TOPK, "k", None, "k"),
    (TOPK, "k", 0, "k"),
    (TOPK, "l1_coefficient", 1e-3, "l1_coefficient"),
    (RELU, "lr", 0.0, "lr"),
    (RELU, "lr", "fast", "lr"),
    (RELU, "batch_size", 0, "batch_size"),
    (RELU, "steps", -1, "steps"),
    (RELU, "init_seed", "random", "per_model"),
    (RELU, "shared_init_seed", -1, "shared_init_seed"),
    (RELU, "data_seed", 1.5, "data_seed"),
]


@pytest.mark.parametrize(("base", "key", "value", "needle"), BAD_VALUES)
def test_bad_values_raise_value_error_naming_the_key(base, key, value, needle):
    with pytest.raises(ValueError, match=needle):
        SAETrainConfig.from_dict({**base, key: value})


def test_not_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        SAETrainConfig.from_dict(["architecture", "relu_l1"])


def test_shared_init_seed_is_the_same_for_every_model():
    cfg = SAETrainConfig.from_dict({**RELU, "shared_init_seed": 7})
    assert {resolve_init_seed(cfg, seed) for seed in range(9)} == {7}


def test_per_model_init_seed_is_deterministic_and_distinct_per_model():
    cfg = SAETrainConfig.from_dict({**RELU, "init_seed": "per_model"})
    seeds = [resolve_init_seed(cfg, s) for s in range(1000)]
    assert len(set(seeds)) == 1000
    assert seeds == [resolve_init_seed(cfg, s) for s in range(1000)]
    assert all(0 <= s < 2**63 for s in seeds)
    # shared_init_seed selects a different family; per_model never reduces to the shared seed
    other = SAETrainConfig.from_dict({**RELU, "init_seed": "per_model", "shared_init_seed": 1})
    assert resolve_init_seed(other, 0) != seeds[0]
    assert cfg.shared_init_seed not in seeds[:9]


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_model_seed(seed):
    cfg = SAETrainConfig.from_dict(RELU)
    with pytest.raises(ValueError, match="model_seed"):
        resolve_init_seed(cfg, seed)


def test_config_id_is_readable_and_deterministic():
    relu = SAETrainConfig.from_dict(RELU)
    topk = SAETrainConfig.from_dict(TOPK)
    assert re.fullmatch(r"relu_l1-x8-l1_0\.001-init_shared-s1000-[0-9a-f]{6}", config_id(relu))
    assert re.fullmatch(r"topk-x8-k32-init_shared-s1000-[0-9a-f]{6}", config_id(topk))
    assert config_id(relu) == config_id(SAETrainConfig.from_dict(dict(RELU)))
    # 5e-4 given as an int-like or float value trains the same SAE: same name
    assert config_id(SAETrainConfig.from_dict({**RELU, "l1_coefficient": 1})) == config_id(
        SAETrainConfig.from_dict({**RELU, "l1_coefficient": 1.0})
    )


def test_distinct_configs_never_share_an_id():
    variations = {
        "expansion": [8, 32, 4],
        "l1_coefficient": [1e-3, 1e-5, 1.0000001e-3],  # the last prints like 1e-3 with :g
        "lr": [5e-4, 1e-3],
        "batch_size": [4096, 1024],
        "steps": [1000, 3000],
        "init_seed": ["shared", "per_model"],
        "shared_init_seed": [0, 1],
        "data_seed": [0, 1],
    }
    keys = list(variations)
    configs = [
        SAETrainConfig.from_dict({**RELU, **dict(zip(keys, values))})
        for values in itertools.product(*variations.values())
    ]
    configs += [
        SAETrainConfig.from_dict({**TOPK, "k": k, "expansion": e})
        for k in (8, 16, 32)
        for e in (8, 32)
    ]
    ids = [config_id(c) for c in configs]
    assert len(set(configs)) == len(configs)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)


# Folder names of SAEs already on disk (outputs/<experiment>/.../saes/<site>/<config id>/) are
# these ids: adding architectures or keys must never rename them. Values computed on the
# configs of commit ebcd546, before any new architecture existed, whose SAEs were all trained
# with sae-lens' loss: that is mse_normalisation null (the default is now the published loss).
PINNED_IDS = [
    ("relu_l1.yaml", {}, "relu_l1-x8-l1_0.001-init_shared-s1000-af9919"),
    ("topk.yaml", {}, "topk-x8-k32-init_shared-s1000-c96ebe"),
    ("relu_l1.yaml", {"init_seed": "per_model"}, "relu_l1-x8-l1_0.001-init_per_model-s1000-11c798"),
    ("relu_l1.yaml", {"expansion": 32, "l1_coefficient": 1e-5},
     "relu_l1-x32-l1_1e-05-init_shared-s1000-cdf26e"),
    # two rungs of conf/sae_ladder/sparsity.yaml merged over relu_l1.yaml, as sae_stage does
    ("relu_l1.yaml", {"l1_coefficient": 10.0}, "relu_l1-x8-l1_10-init_shared-s1000-d04e40"),
    ("relu_l1.yaml", {"architecture": "topk", "l1_coefficient": None, "k": 4},
     "topk-x8-k4-init_shared-s1000-7e4ec0"),
]


@pytest.mark.parametrize(("preset", "overrides", "expected"), PINNED_IDS)
def test_existing_config_ids_are_pinned(preset, overrides, expected):
    base = OmegaConf.to_container(OmegaConf.load(CONF / preset))
    cfg = SAETrainConfig.from_dict({**base, "mse_normalisation": None, **overrides})
    assert config_id(cfg) == expected
    assert config_id(SAETrainConfig.from_dict(cfg.to_dict())) == expected


def test_the_published_coefficient_reaches_sae_lens_times_d_in():
    from polymorph.sae import SAETrainConfig, config_id
    from tests.helpers.config import compose

    default = SAETrainConfig.from_dict(compose([]).sae)
    assert default.mse_normalisation == "mean" and default.l1_coefficient == 1e-3
    assert default.sae_lens_coefficient(64) == pytest.approx(0.064)
    legacy = SAETrainConfig.from_dict({**default.to_dict(), "mse_normalisation": None})
    assert legacy.sae_lens_coefficient(64) == pytest.approx(1e-3)
    # a different loss is a different SAE: its folder name says which normalisation it used
    assert config_id(default) != config_id(legacy) and "-l1mean_0.001-" in config_id(default)
    with pytest.raises(ValueError, match="mse_normalisation only matters"):
        SAETrainConfig.from_dict({**default.to_dict(), "architecture": "topk",
                                  "l1_coefficient": None, "k": 4})
    with pytest.raises(ValueError, match="mean .* or null"):
        SAETrainConfig.from_dict({**default.to_dict(), "mse_normalisation": "sum"})


def test_the_built_sae_lens_model_gets_the_converted_coefficient():
    from polymorph.sae import SAETrainConfig, build_training_sae
    from tests.helpers.config import compose

    cfg = SAETrainConfig.from_dict(compose([]).sae)
    sae = build_training_sae(cfg, 64, init_seed=0, hook_name="h", model_name="m")
    assert sae.cfg.l1_coefficient == pytest.approx(0.064)


@pytest.mark.parametrize("ladder", sorted(p.stem for p in (CONF.parent / "sae_ladder").glob("*.yaml")))
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF.parent / "experiment").glob("*.yaml")))
def test_every_shipped_ladder_validates_over_every_preset(ladder, preset):
    """The documented `stage=sae sae_ladder=<name>` commands must not fail on their own rungs:
    each rung is merged over the preset's `sae` group (relu_l1 with mse_normalisation: mean)."""
    from polymorph.sae.stage import ladder_configs
    from tests.helpers.config import compose

    configs = ladder_configs(compose([f"experiment={preset}", f"sae_ladder={ladder}"]))
    assert len(configs) == len(compose([f"sae_ladder={ladder}"]).sae_ladder.rungs) >= 2
