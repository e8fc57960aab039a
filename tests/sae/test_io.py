"""SAELens-format folders: round trip, exact metrics, atomic writes, clear load errors."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from polymorph.sae import SAE_FOLDER_FILES, config_id, evaluate_sae, load_sae, save_sae


def _metadata(cfg):
    return {
        "model_seed": 0,
        "site": "blocks.0.hook_resid_post",
        "config_id": config_id(cfg),
        "init_seed": 0,
        "sae": cfg.to_dict(),
    }


@pytest.mark.parametrize("fixture", ["relu_trained", "topk_trained"])
def test_round_trip_reproduces_reconstructions_and_metrics_exactly(
    fixture, planted, tmp_path, request
):
    sae, _, cfg = request.getfixturevalue(fixture)
    folder = tmp_path / "seed=0" / "saes" / "blocks.0.hook_resid_post" / config_id(cfg)
    metrics = evaluate_sae(sae, planted)
    assert save_sae(sae, folder, metadata=_metadata(cfg), metrics=metrics) == folder

    assert sorted(p.name for p in folder.iterdir()) == sorted(SAE_FOLDER_FILES)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp leftovers
    loaded = SAE.load_from_disk(folder)
    with torch.no_grad():
        assert torch.equal(loaded(planted), sae(planted))
    saved_metrics = json.loads((folder / "metrics.json").read_text())
    assert evaluate_sae(loaded, planted) == saved_metrics
    assert saved_metrics["ev_published"] == metrics["ev_published"]

    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg_json["metadata"]["model_name"] == "toy-seed0"
    record = load_sae(folder)
    assert record.metadata["sae"] == cfg.to_dict()
    assert record.metadata["config_id"] == config_id(cfg)
    assert {"polymorph", "sae-lens", "torch"} <= set(record.metadata["versions"])
    assert record.metrics == saved_metrics
    assert torch.equal(record.sae.W_dec, sae.W_dec)


def test_resave_replaces_and_failed_save_keeps_previous(relu_trained, tmp_path, monkeypatch):
    sae, _, cfg = relu_trained
    folder = tmp_path / "sae"
    save_sae(sae, folder, metadata=_metadata(cfg), metrics={"run": 1})
    save_sae(sae, folder, metadata=_metadata(cfg), metrics={"run": 2})
    assert load_sae(folder).metrics == {"run": 2}

    def crash(path):
        path.mkdir(parents=True)
        (path / "cfg.json").write_text("{")
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(sae, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save_sae(sae, folder, metadata=_metadata(cfg), metrics={"run": 3})
    assert load_sae(folder).metrics == {"run": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_unserialisable_metadata_leaves_nothing(relu_trained, tmp_path):
    sae, _, _ = relu_trained
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_sae(sae, tmp_path / "sae", metadata={"w": torch.zeros(2)}, metrics={})
    assert list(tmp_path.iterdir()) == []


def test_save_requires_model_identity(tmp_path):
    bare = StandardSAE(StandardSAEConfig(d_in=2, d_sae=4))
    with pytest.raises(ValueError, match="hook_name"):
        save_sae(bare, tmp_path / "sae", metadata={}, metrics={})


def test_load_missing_folder_names_it_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*stage=sae"):
        load_sae(tmp_path / "nowhere")


@pytest.fixture
def saved(relu_trained, tmp_path):
    sae, _, cfg = relu_trained
    return save_sae(sae, tmp_path / "sae", metadata=_metadata(cfg), metrics={"ok": True})


def test_load_incomplete_folder(saved):
    (saved / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics\.json.*stage=sae"):
        load_sae(saved)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("sae_weights.safetensors", b"\x00\x01truncated"),
        ("cfg.json", b"{not json"),
        ("polymorph.json", b"[1, 2"),
        ("metrics.json", b"[1, 2]"),
    ],
)
def test_load_corrupt_file_names_folder_and_fix(saved, name, content):
    (saved / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{saved.name}.*{name.split('.')[0]}.*stage=sae"):
        load_sae(saved)
