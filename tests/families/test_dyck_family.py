"""The Dyck family's runs: layout, idempotence, resume, cohorts and bad input (smoke preset)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from polymorph.errors import PolymorphError
from polymorph.families.dyck import DyckFamily
from polymorph.files import read_json
from polymorph.layout import RunLayout
from polymorph.pipeline import train
from tests.helpers.config import compose, smoke_overrides
from tests.helpers.interrupt import train_interrupted_at

TRANSFORMER = "stage=transformer"


def test_smoke_runs_have_the_documented_layout(smoke_runs):
    root, results = smoke_runs
    assert sorted(results) == [0, 1]
    for seed in (0, 1):
        run = RunLayout.for_seed(root, "smoke", seed)
        assert run.is_finished() and run.config.is_file() and run.run_info.is_file()
        assert sorted(run.step_checkpoints()) == [10, 20]
        assert run.best.is_file() and run.last.is_file() and run.resume_state.is_file()
        index = read_json(run.checkpoint_index)
        assert sorted(index) == ["10", "20"] and "val/min_acc" in index["20"]
        assert 0 < index["20"]["lr"] < index["10"]["lr"]  # the lr each checkpoint was taken at
        info = read_json(run.run_info)
        assert info["seed"] == seed and info["status"] == "finished"
        assert info["trainable_parameters"] == 104_448 and "torch" in info["versions"]
        metrics = read_json(run.final_metrics)
        assert metrics["steps"] == 20 and 0.0 <= metrics["best/val/min_acc"] <= 1.0


def test_seeds_differ_and_checkpoints_load_without_pickle(smoke_runs):
    root, _ = smoke_runs
    m0 = DyckFamily().load(RunLayout.for_seed(root, "smoke", 0))
    m1 = DyckFamily().load(RunLayout.for_seed(root, "smoke", 1))
    assert not torch.equal(m0.embed.W_E, m1.embed.W_E)
    # the positional code is shared by construction
    assert torch.equal(m0.pos_embed.W_pos, m1.pos_embed.W_pos)


def test_finished_run_is_reused_and_retrain_flag_retrains(tmp_path):
    cfg = compose(smoke_overrides(tmp_path, TRANSFORMER))
    train(cfg)
    run = RunLayout.for_seed(tmp_path, "smoke", 0)
    before = {p: p.stat().st_mtime_ns for p in run.checkpoints.iterdir()}
    train(cfg)
    assert {p: p.stat().st_mtime_ns for p in run.checkpoints.iterdir()} == before
    train(compose(smoke_overrides(tmp_path, TRANSFORMER, "retrain=true")))
    assert run.best.stat().st_mtime_ns != before[run.best]


def test_interrupted_run_resumes_with_nothing_lost(tmp_path, monkeypatch):
    reference_root, broken_root = tmp_path / "ref", tmp_path / "broken"
    train(compose(smoke_overrides(reference_root, TRANSFORMER)))
    train_interrupted_at(compose(smoke_overrides(broken_root, TRANSFORMER)), 15, monkeypatch)
    broken = RunLayout.for_seed(broken_root, "smoke", 0)
    assert not broken.is_finished()  # never mistaken for a finished run
    assert sorted(broken.step_checkpoints()) == [10]

    train(compose(smoke_overrides(broken_root, TRANSFORMER)))
    assert broken.is_finished()
    assert read_json(broken.run_info)["resumed_from_step"] == 10
    reference = RunLayout.for_seed(reference_root, "smoke", 0)
    a, b = load_file(str(reference.last)), load_file(str(broken.last))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_changed_config_on_an_existing_run_is_refused(tmp_path):
    # name= puts both configs into one folder: the saved-config guard refuses, naming the key
    train(compose(smoke_overrides(tmp_path, TRANSFORMER, "name=mine")))
    with pytest.raises(PolymorphError, match="training.lr.*retrain=true"):
        train(compose(smoke_overrides(tmp_path, TRANSFORMER, "name=mine", "training.lr=0.01")))


def test_corrupt_resume_state_gives_a_clear_error(tmp_path):
    run = RunLayout.for_seed(tmp_path, "smoke", 0)
    train(compose(smoke_overrides(tmp_path, TRANSFORMER)))
    run.final_metrics.unlink()  # pretend it was interrupted ...
    run.resume_state.write_bytes(b"not a checkpoint")  # ... while writing its checkpoint
    with pytest.raises(PolymorphError, match="corrupt.*retrain=true"):
        train(compose(smoke_overrides(tmp_path, TRANSFORMER)))


def test_corrupt_or_missing_weights_give_a_clear_error(tmp_path):
    run = RunLayout.for_seed(tmp_path, "smoke", 0)
    train(compose(smoke_overrides(tmp_path, TRANSFORMER)))
    run.best.write_bytes(b"\x00" * 10)
    with pytest.raises(PolymorphError, match="corrupt"):
        DyckFamily().load(run)
    run.best.unlink()
    with pytest.raises(PolymorphError, match="does not exist"):
        DyckFamily().load(run)


def test_shared_io_loads_the_anchors_io_weights_frozen_and_trains_the_anchor_once(tmp_path):
    shared = ["io=shared", TRANSFORMER]
    # The non-anchor job runs first: it must train the anchor itself (under the anchor's lock).
    train(compose(smoke_overrides(tmp_path, "seed=1", *shared)))
    anchor = RunLayout.for_seed(tmp_path, "smoke", 0, "io=shared")  # the ablation's own anchor
    assert anchor.is_finished()
    stamp = anchor.best.stat().st_mtime_ns
    train(compose(smoke_overrides(tmp_path, "seed=0", *shared)))  # the anchor's own job
    assert anchor.best.stat().st_mtime_ns == stamp  # not trained twice
    a = load_file(str(anchor.best))
    b = load_file(str(RunLayout.for_seed(tmp_path, "smoke", 1, "io=shared").best))
    for name in ("embed.W_E", "unembed.W_U"):
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["blocks.0.attn.W_Q"], b["blocks.0.attn.W_Q"])
    info = read_json(RunLayout.for_seed(tmp_path, "smoke", 1, "io=shared").run_info)
    assert info["trainable_parameters"] == 104_448 - 40 * 64 - 64 * 51
    assert not (tmp_path / "smoke" / "seed=0").exists()  # the plain preset's folder is untouched


def test_shared_io_refuses_an_anchor_with_another_model_config(tmp_path):
    # only a shared name= can pair an anchor with another model config: ablations never do
    train(compose(smoke_overrides(tmp_path, "seed=0", "io=shared", TRANSFORMER, "name=mine")))
    with pytest.raises(PolymorphError, match="anchor run"):
        train(compose(smoke_overrides(tmp_path, "seed=1", "io=shared", TRANSFORMER, "name=mine",
                                      "model.d_mlp=128")))


def test_checkpoints_list_every_kept_step_with_its_metrics_and_load(smoke_runs):
    root, _ = smoke_runs
    run = RunLayout.for_seed(root, "smoke", 0)
    checkpoints = DyckFamily().checkpoints(run)
    assert [c.step for c in checkpoints] == [10, 20]
    index = read_json(run.checkpoint_index)
    for c in checkpoints:
        assert c.metrics == index[str(c.step)] and c.label == f"step={c.step:06d}.safetensors"
    last = checkpoints[-1].load()
    best = DyckFamily().load(run)
    if read_json(run.final_metrics)["best_step"] == 20:
        assert torch.equal(last.embed.W_E, best.embed.W_E)


def test_unknown_io_mode_is_refused_before_training(tmp_path):
    with pytest.raises(PolymorphError, match="io.mode=half is unknown"):
        train(compose(smoke_overrides(tmp_path, TRANSFORMER, "io.mode=half")))
    assert not (tmp_path / "smoke" / "seed=0" / "checkpoints").exists()
