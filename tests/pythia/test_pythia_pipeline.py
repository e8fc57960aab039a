"""experiment=polypythia end to end on tiny local GPT-NeoX models: no network anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from polymorph.errors import PolymorphError
from tests.conftest import REPO, compose, pythia_overrides


def test_pythia_loader_keeps_raw_weights(tiny_pythia):
    from transformers import AutoModelForCausalLM

    from polymorph.models.pythia import load_pretrained

    model_id = tiny_pythia["model_id_template"].format(seed=1)
    model = load_pretrained(model_id, "step143000")
    assert model.polymorph_source.source == "local"
    assert model.cfg.parallel_attn_mlp  # Pythia: parallel attention, so no resid_mid
    assert "blocks.0.hook_resid_mid" not in model.hook_dict
    hf = AutoModelForCausalLM.from_pretrained(str(model.polymorph_source.folder))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4)
    assert model.cfg.normalization_type == "LN"  # raw: folding would have made it LNPre


def test_pythia_missing_local_revision_is_a_clear_error(tiny_pythia):
    from polymorph.models.pythia import resolve_model

    with pytest.raises(PolymorphError, match="step77.*sub-folders named after the revision"):
        resolve_model(tiny_pythia["model_id_template"].format(seed=1), "step77")


def test_pythia_offline_uncached_hub_model_fails_fast_with_instructions():
    from polymorph.models.pythia import resolve_model

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(PolymorphError) as err:
        resolve_model("EleutherAI/pythia-70m-seed9", "step99999")
    message = str(err.value)
    assert "EleutherAI/pythia-70m-seed9" in message and "step99999" in message
    assert "snapshot_download" in message and "local folder" in message
    assert time.perf_counter() - start < 30


def test_pythia_offline_hub_corpus_fails_with_instructions():
    from polymorph.tasks.corpus import CorpusConfig, stream_documents

    with pytest.raises(PolymorphError, match="NeelNanda/pile-10k.*corpus.path=json"):
        next(stream_documents(CorpusConfig(path="NeelNanda/pile-10k")))


def test_pythia_corpus_windows_are_fixed_and_disjoint(tiny_pythia):
    from transformers import AutoTokenizer

    from polymorph.tasks.corpus import CorpusConfig, corpus_windows

    tok = AutoTokenizer.from_pretrained(str(tiny_pythia["tokenizer"]))
    corpus = CorpusConfig(path="json", data_files=str(tiny_pythia["corpus"]), shuffle_buffer=50)
    a = corpus_windows(tok, corpus, 8, 16, offset=0)
    assert a.shape == (8, 16)
    assert torch.equal(a, corpus_windows(tok, corpus, 8, 16, offset=0))
    both = corpus_windows(tok, corpus, 12, 16, offset=0)
    assert torch.equal(both[4:], corpus_windows(tok, corpus, 8, 16, offset=4))
    assert (a == tok.eos_token_id).any()  # documents are joined by the end-of-text token
    other_seed = CorpusConfig(path="json", data_files=str(tiny_pythia["corpus"]), shuffle_buffer=50, seed=1)
    assert not torch.equal(a, corpus_windows(tok, other_seed, 8, 16))
    with pytest.raises(PolymorphError, match="ran out"):
        corpus_windows(tok, corpus, 100_000, 16)


def test_pythia_train_records_model_activations_and_saes(pythia_runs, tiny_pythia):
    from safetensors import safe_open

    from polymorph.layout import RunLayout
    from polymorph.sae.io import load_sae

    root, _ = pythia_runs
    cfg = compose(pythia_overrides(tiny_pythia, root))
    for seed in tiny_pythia["seeds"]:
        layout = RunLayout.for_seed(root, "polypythia", seed)
        info = json.loads(layout.run_info.read_text())
        assert info["model"]["model_id"] == tiny_pythia["model_id_template"].format(seed=seed)
        assert info["model"]["revision"] == "step143000"
        assert info["model_source"] == "pretrained" and info["versions"]["transformer_lens"]
        metrics = json.loads(layout.final_metrics.read_text())
        assert metrics["pretrained"] is True
        assert not layout.checkpoints.exists()  # nothing was trained
        for site in cfg.sites:
            path = layout.activation_file(site)
            with safe_open(str(path), framework="pt") as f:
                acts = f.get_tensor("activations")
                assert f.metadata()["checkpoint"].endswith("@step143000")
            assert acts.dtype == torch.float16
            assert acts.shape == (64 * 31, 32)  # 64 windows of 32 tokens, first position skipped
            saes = list((layout.saes / site).iterdir())
            assert len(saes) == 1 and "l1_1e-05" in saes[0].name
            saved = load_sae(saes[0])
            assert saved.sae.cfg.d_in == 32
    # the identical token batch for every seed: one corpus cache file for the SAE batch
    assert len(list((root / "polypythia" / "corpus").glob("*offset0-n64.safetensors"))) == 1


def test_pythia_finished_run_is_reused_and_guarded(pythia_runs, tiny_pythia):
    from polymorph.layout import RunLayout
    from polymorph.pipeline import train

    root, _ = pythia_runs
    layout = RunLayout.for_seed(root, "polypythia", 1)
    before = {p: p.stat().st_mtime_ns for p in layout.saes.rglob("*.safetensors")}
    train(compose(pythia_overrides(tiny_pythia, root, "seed=1")))
    assert before == {p: p.stat().st_mtime_ns for p in layout.saes.rglob("*.safetensors")}
    with pytest.raises(PolymorphError, match="model.revision"):
        train(compose(pythia_overrides(tiny_pythia, root, "seed=1", "model.revision=step1000")))


def test_pythia_rejects_shared_io(tmp_path, tiny_pythia):
    from polymorph.pipeline import train

    with pytest.raises(PolymorphError, match="io=independent"):
        train(compose(pythia_overrides(tiny_pythia, tmp_path, "seed=1", "io=shared")))


def test_pythia_analysis_end_to_end(pythia_runs, tiny_pythia, tmp_path):
    from polymorph.analysis.runner import analyze

    root, _ = pythia_runs
    cfg = compose(pythia_overrides(tiny_pythia, root, f"analysis.output_dir={tmp_path}",
                                   analysis=True),
                  config_name="analyze")
    results, _ = analyze(cfg, show_progress=False)
    meta = results["meta"]
    assert not meta["failed"] and not meta["partial"], meta
    expected = {"universality", "sae_transfer", "haar", "map_family", "checkpoint_drift",
                "lm_function_match", "lm_steering"}
    assert expected <= set(results)
    assert "function_match" not in results and "steering" not in results  # the Dyck ones
    assert meta["context"]["fit_rows"] == 64 * 31 and meta["context"]["eval_rows"] == 64 * 31
    drift = results["checkpoint_drift"]
    assert [s["checkpoint"] for s in drift["steps"]] == tiny_pythia["drift_revisions"]
    assert [s["step"] for s in drift["steps"]] == [0, 1000]
    for row in results["sae_transfer"]["rows"]:
        assert row["rotated_ev_standard"] is not None
    report = (tmp_path / "report.md").read_text()
    # the header names the corpus slices (not the toy's generator seeds), the caveat the sink
    assert "64 windows x 32 tokens from window 64 of corpus json" in report
    assert "attention sink" in report and "positional code" not in report


def test_pythia_overlapping_corpus_slices_are_refused(pythia_runs, tiny_pythia, tmp_path):
    from polymorph.analysis.runner import analyze

    root, _ = pythia_runs
    cfg = compose(pythia_overrides(tiny_pythia, root, f"analysis.output_dir={tmp_path}",
                                   "analysis.eval_batch.offset=70", analysis=True),
                  config_name="analyze")
    with pytest.raises(PolymorphError, match="overlap"):
        analyze(cfg, show_progress=False)


def test_pythia_revisions_are_refused_for_a_trained_toy():
    from polymorph.analysis.checkpoint_drift import CheckpointDrift

    ctx = SimpleNamespace(pretrained=False, runs={0: None})
    with pytest.raises(PolymorphError, match="pretrained"):
        CheckpointDrift(revisions=["step1000"])._checkpoints(ctx, 0)


def test_pythia_gpu_and_slurm_configs_compose(tmp_path):
    from polymorph.models.pythia import pick_dtype

    cfg = compose(["experiment=polypythia", "trainer=gpu", "hydra/launcher=submitit_slurm",
                   f"paths.root={tmp_path}", "seed=3"], return_hydra=True)
    assert cfg.trainer.accelerator == "gpu" and cfg.model.dtype == "auto"
    assert cfg.model.model_id == "EleutherAI/pythia-70m-seed3"
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert cfg.activations.dtype == "float16" and cfg.analysis.fit_precision == "float32"


def test_pythia_cli_train_then_analyze(tiny_pythia, tmp_path):
    """The real entry points: a two-seed multirun of train.py, then analyze.py."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    train = subprocess.run([sys.executable, "train.py", "-m", "seed=1..2",
                            *pythia_overrides(tiny_pythia, out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    assert train.returncode == 0, train.stderr[-3000:]
    for seed in (1, 2):
        assert (tmp_path / "out" / "polypythia" / f"seed={seed}" / "metrics.json").is_file()
    analysis = subprocess.run(
        [sys.executable, "analyze.py", *pythia_overrides(tiny_pythia, out, analysis=True),
         "~analysis.callbacks.checkpoint_drift"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "polypythia" / "analysis" / "results.json").read_text())
    assert results["meta"]["context"]["seeds"] == [1, 2] and not results["meta"]["partial"]


def test_pythia_cli_offline_error_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", "seed=4", "experiment=polypythia",
                           "logger=none", f"paths.root={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model EleutherAI/pythia-70m-seed4 at revision step143000")
    assert "snapshot_download" in last and "Traceback" not in proc.stderr


def test_pythia_sae_stage_trains_on_the_configured_accelerator(pythia_runs, tiny_pythia, monkeypatch):
    """trainer=gpu must reach the SAE trainer (checked without a GPU: the call is intercepted)."""
    from polymorph import sae_stage
    from polymorph.pipeline import train

    seen = {}

    class Intercepted(Exception):
        pass

    def fake_train_sae(acts, cfg, **kwargs):
        seen.update(kwargs, rows=acts.shape[0], dtype=acts.dtype)
        raise Intercepted

    monkeypatch.setattr(sae_stage, "train_sae", fake_train_sae)
    root, _ = pythia_runs
    with pytest.raises(Intercepted):
        train(compose(pythia_overrides(tiny_pythia, root, "seed=1", "stage=sae", "trainer=gpu",
                                       "retrain_saes=true")))
    assert seen["accelerator"] == "gpu"
    assert seen["dtype"] == torch.float32 and seen["rows"] == 64 * 31  # fp16 cache, fp32 use
    assert seen["model_name"].endswith("seed1@step143000")
