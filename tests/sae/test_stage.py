"""The SAE stage of a seed's job: layout, round trip, stage=sae reuse, the activation cache."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE

from polymorph.activations import load_activations
from polymorph.errors import PolymorphError
from polymorph.files import read_json
from polymorph.layout import RunLayout
from polymorph.pipeline import train
from polymorph.sae import evaluate_sae
from tests.helpers.config import compose, smoke_overrides

SMOKE_SITES = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


def test_every_seed_has_one_loadable_sae_per_site(smoke_runs):
    root, _ = smoke_runs
    for seed in (0, 1):
        run = RunLayout.for_seed(root, "smoke", seed)
        for site in SMOKE_SITES:
            folders = list((run.saes / site).iterdir())
            assert len(folders) == 1
            folder = folders[0]
            sae = SAE.load_from_disk(str(folder))
            assert sae.cfg.metadata.hook_name == site
            assert f"seed={seed}" in sae.cfg.metadata.model_name
            meta = read_json(folder / "polymorph.json")
            assert meta["model_seed"] == seed and meta["site"] == site
            # the saved metrics are reproduced exactly from the stored activations
            acts = load_activations(run.activation_file(site))
            saved = read_json(folder / "metrics.json")
            again = evaluate_sae(sae, acts)
            for key in ("ev_published", "ev_standard", "mse", "l0", "dead_fraction"):
                assert again[key] == saved[key], key


def test_activation_rows_align_across_seeds(smoke_runs):
    root, _ = smoke_runs
    a = load_activations(RunLayout.for_seed(root, "smoke", 0).activation_file(SMOKE_SITES[0]))
    b = load_activations(RunLayout.for_seed(root, "smoke", 1).activation_file(SMOKE_SITES[0]))
    assert a.shape == b.shape and a.shape[1] == 64 and not torch.equal(a, b)


def test_stage_sae_adds_configs_side_by_side_without_touching_the_transformer(tmp_path):
    base = smoke_overrides(tmp_path, "sites=[blocks.1.hook_resid_post]")
    train(compose(base))
    run = RunLayout.for_seed(tmp_path, "smoke", 0)
    stamps = {p: p.stat().st_mtime_ns for p in run.checkpoints.iterdir()}
    (first,) = list((run.saes / "blocks.1.hook_resid_post").iterdir())
    first_stamp = (first / "sae_weights.safetensors").stat().st_mtime_ns
    train(compose([*base, "stage=sae", "sae.expansion=16"]))
    folders = sorted((run.saes / "blocks.1.hook_resid_post").iterdir())
    assert len(folders) == 2
    assert {p: p.stat().st_mtime_ns for p in run.checkpoints.iterdir()} == stamps
    assert (first / "sae_weights.safetensors").stat().st_mtime_ns == first_stamp
    x16 = next(f for f in folders if "-x16-" in f.name)
    assert SAE.load_from_disk(str(x16)).cfg.d_sae == 16 * 64
    # rerunning the same SAE config reuses it; retrain_saes=true redoes it
    x16_stamp = (x16 / "sae_weights.safetensors").stat().st_mtime_ns
    train(compose([*base, "stage=sae", "sae.expansion=16"]))
    assert (x16 / "sae_weights.safetensors").stat().st_mtime_ns == x16_stamp
    train(compose([*base, "stage=sae", "sae.expansion=16", "retrain_saes=true"]))
    assert (x16 / "sae_weights.safetensors").stat().st_mtime_ns != x16_stamp


def test_unknown_site_lists_the_valid_ones(tmp_path):
    with pytest.raises(PolymorphError, match=r"blocks\.7\.hook_resid_post.*blocks\.0\.hook_resid_pre"):
        train(compose(smoke_overrides(tmp_path, "sites=[blocks.7.hook_resid_post]")))


def test_a_stale_or_unreadable_activation_cache_is_recomputed(smoke_runs, tmp_path):
    import shutil

    from polymorph.families.dyck import DyckFamily
    from polymorph.sae.cache import cached_activations

    root, _ = smoke_runs
    run = RunLayout(tmp_path / "seed=0")
    shutil.copytree(RunLayout.for_seed(root, "smoke", 0).root, run.root)
    family, site = DyckFamily(), SMOKE_SITES[1]
    model = family.load(run)
    cfg = compose(smoke_overrides(root))
    batch = family.token_batch(cfg.activations, root / "smoke", model)
    identity = {**family.batch_identity(cfg.activations), "checkpoint": family.final_label(run)}
    kept = load_activations(run.activation_file(site)).clone()
    again = cached_activations(run, model, batch.tokens, batch.mask, [site], identity)[site]
    assert torch.equal(again, kept)  # the matching cache is read, not recomputed
    run.activation_file(site).unlink()  # a new file: the cache may be memory-mapped
    run.activation_file(site).write_bytes(b"garbage")
    redone = cached_activations(run, model, batch.tokens, batch.mask, [site], identity)[site]
    torch.testing.assert_close(redone, kept)
    stale = {**identity, "seed": "999"}
    cached_activations(run, model, batch.tokens, batch.mask, [site], stale)
    from safetensors import safe_open

    with safe_open(str(run.activation_file(site)), framework="pt") as f:
        assert f.metadata()["seed"] == "999"  # recomputed under the new record


def test_per_model_init_seed_differs_between_seeds_and_shared_does_not(tmp_path):
    from polymorph.sae import SAETrainConfig, resolve_init_seed

    shared = compose(smoke_overrides(tmp_path)).sae
    per_model = compose(smoke_overrides(tmp_path, "sae.init_seed=per_model")).sae
    s = SAETrainConfig.from_dict(dict(shared))
    p = SAETrainConfig.from_dict(dict(per_model))
    assert resolve_init_seed(s, 0) == resolve_init_seed(s, 1)
    assert resolve_init_seed(p, 0) != resolve_init_seed(p, 1)
