"""Loading published checkpoints: raw weights, where a model is looked for, and what fails how."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from polymorph.errors import PolymorphError
from polymorph.models.pretrained import load_pretrained, pick_dtype, resolve_model


@pytest.mark.parametrize("fixture", ["tiny_lm", "tiny_gpt2"])
def test_loader_keeps_raw_weights_for_each_architecture(fixture, request):
    from transformers import AutoModelForCausalLM

    tiny = request.getfixturevalue(fixture)
    model = load_pretrained(tiny["model_id_template"].format(seed=1), "step143000")
    assert model.polymorph_source.source == "local"
    hf = AutoModelForCausalLM.from_pretrained(str(model.polymorph_source.folder))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4)
    assert model.cfg.normalization_type == "LN"  # raw: folding would have made it LNPre
    # GPT-NeoX (Pythia) runs attention and MLP in parallel: no resid_mid; GPT-2 has one
    parallel = tiny["architecture"] == "gpt_neox"
    assert bool(model.cfg.parallel_attn_mlp) == parallel
    assert ("blocks.0.hook_resid_mid" in model.hook_dict) != parallel


def test_missing_local_revision_is_a_clear_error(tiny_lm):
    with pytest.raises(PolymorphError, match="step77.*sub-folders named after the revision"):
        resolve_model(tiny_lm["model_id_template"].format(seed=1), "step77")


def test_offline_uncached_hub_model_fails_fast_with_instructions():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(PolymorphError) as err:
        resolve_model("EleutherAI/pythia-70m-seed9", "step99999")
    message = str(err.value)
    assert "EleutherAI/pythia-70m-seed9" in message and "step99999" in message
    assert "snapshot_download" in message and "local folder" in message
    assert time.perf_counter() - start < 30


def test_an_architecture_transformer_lens_cannot_convert_is_one_line_before_loading(tiny_lm,
                                                                                     tmp_path):
    import shutil

    folder = tmp_path / "odd" / "main"
    shutil.copytree(tiny_lm["root"] / "seed1" / "step143000", folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["SomethingNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"never read")  # the check precedes any weight
    with pytest.raises(PolymorphError, match="SomethingNewForCausalLM.*TransformerLens cannot "
                                             "convert.*GPTNeoXForCausalLM"):
        load_pretrained(str(tmp_path / "odd"), "main")


def test_dtype_choice():
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(PolymorphError, match="family.dtype=half is unknown"):
        pick_dtype("half", torch.device("cpu"))
