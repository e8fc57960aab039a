"""The cross-seed crosscoder on planted rotations: reconstruction, rotated decoders, sparsity,
loss normalisation, folding, minibatch order, bad input, config ids and the folder format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymorph.align.haar import haar_orthogonal
from polymorph.align.metrics import explained_variance
from polymorph.sae import ShuffledMinibatches
from polymorph.sae.crosscoder import Crosscoder
from polymorph.sae.crosscoder_config import CrosscoderConfig, crosscoder_config_id
from polymorph.sae.crosscoder_io import (
    CROSSCODER_FOLDER_FILES,
    load_crosscoder,
    save_crosscoder,
)
from polymorph.sae.crosscoder_train import batch_indices, train_crosscoder

REPO = Path(__file__).resolve().parents[2]
N_SEEDS, D = 3, 16
RELU = {"architecture": "relu_l1", "n_seeds": N_SEEDS, "d_in": D, "expansion": 8,
        "l1_coefficient": 0.1, "k": None, "lr": 2e-3, "batch_size": 1024, "steps": 300,
        "init_seed": 0, "data_seed": 0}
TOPK = {**RELU, "architecture": "topk", "l1_coefficient": None, "k": 8}


@pytest.fixture(scope="module")
def rotated(planted):
    """Three seeds seeing the planted sparse data in Haar-rotated frames, with own noise."""
    g = torch.Generator().manual_seed(77)
    qs = [haar_orthogonal(D, seed=10 + s).float() for s in range(N_SEEDS)]
    acts = [planted @ q + 0.01 * torch.randn(planted.shape, generator=g) for q in qs]
    return acts, qs


def _train(acts, overrides):
    cfg = CrosscoderConfig.from_dict(overrides)
    cc, info = train_crosscoder(acts, cfg, progress_bar=False)
    return cc, info, cfg


@pytest.fixture(scope="module")
def relu_cc(rotated):
    return _train(rotated[0], RELU)


@pytest.fixture(scope="module")
def topk_cc(rotated):
    return _train(rotated[0], TOPK)


def _l0(cc, acts) -> float:
    with torch.no_grad():
        return float((cc.encode(acts) != 0).sum(-1).float().mean())


# --------------------------------------------------------------------------- planted truth


@pytest.mark.parametrize("fixture", ["relu_cc", "topk_cc"])
def test_reconstructs_every_seed(fixture, rotated, request):
    cc, info, cfg = request.getfixturevalue(fixture)
    acts, _ = rotated
    history = info["loss_history"]
    assert len(history) == info["steps"] == cfg.steps and not info["stopped_early"]
    assert sum(history[-10:]) < 0.25 * sum(history[:10])
    with torch.no_grad():
        x_hat = cc(acts)
    for s in range(N_SEEDS):
        ev = explained_variance(x_hat[s], acts[s])
        assert ev["ev_standard"] > 0.9 and ev["ev_published"] > 0.9, (s, ev)


@pytest.mark.parametrize("fixture", ["relu_cc", "topk_cc"])
def test_per_seed_decoders_are_related_by_the_planted_rotations(fixture, rotated, request):
    cc, _, _ = request.getfixturevalue(fixture)
    acts, qs = rotated
    with torch.no_grad():
        live = (cc.encode(acts) != 0).any(dim=0)
    assert live.float().mean() > 0.9
    w = cc.W_dec.detach()
    for s in range(1, N_SEEDS):
        predicted = w[0] @ qs[0].T @ qs[s]  # x_s = x Q_s, so W_dec[s] = W_dec[0] Q_0^T Q_s
        cos = torch.nn.functional.cosine_similarity(predicted[live], w[s][live], dim=1)
        assert float(cos.mean()) > 0.98, float(cos.mean())
    # folded: each latent's decoder norms sum to 1 over the seeds, spread evenly here
    norms = cc.decoder_norms()
    m = cc.cfg.d_latent
    assert norms.shape == (m, N_SEEDS)
    torch.testing.assert_close(norms.sum(dim=1), torch.ones(m), atol=1e-5, rtol=0)
    spread = norms[live].min(dim=1).values / norms[live].max(dim=1).values
    assert float(spread.mean()) > 0.9


def test_l0_follows_l1_and_k(relu_cc, topk_cc, rotated):
    acts, _ = rotated
    strong, _, _ = _train(acts, {**RELU, "l1_coefficient": 1.0, "steps": 150})
    assert _l0(strong, acts) < 0.6 * _l0(relu_cc[0], acts)
    with torch.no_grad():
        per_row = (topk_cc[0].encode(acts) != 0).sum(-1)
    assert int(per_row.max()) <= TOPK["k"]
    few, _, _ = _train(acts, {**TOPK, "k": 2, "steps": 50})
    assert _l0(few, acts) <= 2 < _l0(topk_cc[0], acts)


# --------------------------------------------------------------------------- maths


def _toy(arch: str = "relu_l1", seed: int = 0) -> Crosscoder:
    over = RELU if arch == "relu_l1" else TOPK
    cc = Crosscoder(CrosscoderConfig.from_dict({**over, "expansion": 2}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # uneven decoder norms and non-zero biases, unlike the init
        cc.W_dec.mul_(torch.rand(N_SEEDS, 2 * D, 1, generator=g) * 3 + 0.1)
        cc.b_enc.copy_(0.01 * torch.randn(2 * D, generator=g))
        cc.b_dec.copy_(0.1 * torch.randn(N_SEEDS, D, generator=g))
    return cc


def test_loss_uses_sae_lens_normalisation_and_summed_decoder_norms():
    cc = _toy()
    x = torch.randn(5, N_SEEDS, D, generator=torch.Generator().manual_seed(1))
    out = cc.training_forward(x)
    pre = sum((x[:, s] - cc.b_dec[s]) @ cc.W_enc[s] for s in range(N_SEEDS)) + cc.b_enc
    f = torch.relu(pre)
    x_hat = torch.stack([f @ cc.W_dec[s] + cc.b_dec[s] for s in range(N_SEEDS)], dim=1)
    mse = (x_hat - x).pow(2).sum(dim=(1, 2)).mean()  # summed over seeds and d, mean over rows
    weight = sum(cc.W_dec[s].norm(dim=1) for s in range(N_SEEDS))
    l1 = RELU["l1_coefficient"] * (f * weight).sum(dim=1).mean()
    torch.testing.assert_close(out.losses["mse_loss"], mse)
    torch.testing.assert_close(out.losses["l1_loss"], l1)
    torch.testing.assert_close(out.loss, mse + l1)
    torch.testing.assert_close(out.per_seed_mse.sum(), mse.detach())
    torch.testing.assert_close(out.feature_acts, f)


@pytest.mark.parametrize("arch", ["relu_l1", "topk"])
def test_folding_keeps_reconstructions_and_makes_inference_match_training(arch):
    cc = _toy(arch)
    x = torch.randn(64, N_SEEDS, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = cc.training_forward(x)
        # topk's training code is in folded units (selection on pre * summed decoder norm)
        code = out.feature_acts / cc.summed_decoder_norms() if arch == "topk" else out.feature_acts
        train_hat, train_loss = cc.decode_stacked(code), out.loss
        cc.fold_decoder_norms()
        torch.testing.assert_close(cc.summed_decoder_norms(), torch.ones(2 * D))
        torch.testing.assert_close(torch.stack(cc(x), dim=1), train_hat, atol=1e-5, rtol=1e-5)
        # the objective is parametrisation-free: folding does not change it
        torch.testing.assert_close(cc.training_forward(x).loss, train_loss, atol=1e-4,
                                   rtol=1e-5)


def test_inference_api_shapes_and_equivalences():
    cc = _toy()
    xs = [torch.randn(2, 7, D) for _ in range(N_SEEDS)]  # leading dims are kept
    f = cc.encode(xs)
    assert f.shape == (2, 7, 2 * D)
    torch.testing.assert_close(cc.encode(torch.stack(xs, dim=-2)), f)
    decoded = cc.decode(f)
    assert len(decoded) == N_SEEDS and decoded[0].shape == (2, 7, D)
    for s in range(N_SEEDS):
        torch.testing.assert_close(cc.decode_seed(f, s), decoded[s])
    with pytest.raises(ValueError, match="seed must be"):
        cc.decode_seed(f, N_SEEDS)


def test_initial_weights_depend_only_on_the_init_seed():
    cfg = CrosscoderConfig.from_dict(RELU)
    before = torch.get_rng_state()
    a = Crosscoder(cfg).state_dict()
    torch.manual_seed(123)
    b = Crosscoder(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.set_rng_state(before)
    Crosscoder(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    # sae-lens' convention per seed: rows of norm 0.1, encoder = decoder transposed
    cc = Crosscoder(cfg)
    torch.testing.assert_close(cc.W_dec.norm(dim=-1), torch.full((N_SEEDS, 8 * D), 0.1))
    torch.testing.assert_close(cc.W_enc, cc.W_dec.transpose(1, 2))
    assert not torch.equal(cc.W_dec[0], cc.W_dec[1])
    other = Crosscoder(CrosscoderConfig.from_dict({**RELU, "init_seed": 1}))
    assert not torch.equal(other.W_dec, cc.W_dec)


def test_minibatches_follow_the_sae_order():
    rows = torch.arange(10, dtype=torch.float32)[:, None]
    sae_order = [b[:, 0].long() for b in ShuffledMinibatches(rows, batch_size=4, steps=6, seed=3)]
    ours = list(batch_indices(10, batch_size=4, steps=6, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(sae_order, ours, strict=True))


# --------------------------------------------------------------------------- bad input


def test_bad_activations_name_the_seed(planted):
    cfg = CrosscoderConfig.from_dict({**RELU, "steps": 1})
    good = planted[:100]
    with pytest.raises(ValueError, match=r"seed 2 \(activations\[2\]\) has shape \(99, 16\).*"
                                         r"\(100, 16\)"):
        train_crosscoder([good, good, good[:99]], cfg, progress_bar=False)
    with pytest.raises(ValueError, match=r"seed 1 \(activations\[1\]\).*width 8.*16"):
        train_crosscoder([good, good[:, :8], good], cfg, progress_bar=False)
    with pytest.raises(ValueError, match="n_seeds=3, got 2"):
        train_crosscoder([good, good], cfg, progress_bar=False)
    with pytest.raises(ValueError, match=r"seed 0 .*float32"):
        train_crosscoder([good.double(), good, good], cfg, progress_bar=False)
    with pytest.raises(TypeError, match="list"):
        train_crosscoder(good, cfg, progress_bar=False)
    cc = Crosscoder(cfg)
    with pytest.raises(ValueError, match=r"seed 1: input has shape \(4, 16\) but seed 0 has "
                                         r"\(5, 16\)"):
        cc.encode([good[:5], good[:4], good[:5]])
    with pytest.raises(ValueError, match="seed 2: input has shape"):
        cc.encode([good[:5], good[:5], good[:5, :8]])
    with pytest.raises(ValueError, match="reads 3 seeds"):
        cc.encode([good[:5]])


# --------------------------------------------------------------------------- config


def test_config_round_trip_ids_and_validation():
    cfg = CrosscoderConfig.from_dict(RELU)
    assert CrosscoderConfig.from_dict(cfg.to_dict()) == cfg and cfg.d_latent == 128
    cid = crosscoder_config_id(cfg)
    assert cid.startswith("crosscoder_relu_l1-n3-d16-x8-l1_0.1-init0-s300-")
    assert crosscoder_config_id(CrosscoderConfig.from_dict(TOPK)).startswith(
        "crosscoder_topk-n3-d16-x8-k8-init0-s300-")
    variants = [{"init_seed": 1}, {"data_seed": 1}, {"lr": 1e-3}, {"batch_size": 512},
                {"n_seeds": 9}, {"l1_coefficient": 0.2}]
    ids = {cid} | {crosscoder_config_id(CrosscoderConfig.from_dict({**RELU, **v}))
                   for v in variants}
    assert len(ids) == len(variants) + 1
    with pytest.raises(ValueError, match=r"missing key\(s\) \['data_seed'\]"):
        CrosscoderConfig.from_dict({k: v for k, v in RELU.items() if k != "data_seed"})
    with pytest.raises(ValueError, match="unknown.*'l1'"):
        CrosscoderConfig.from_dict({**RELU, "l1": 1.0})
    for over, needle in [({"architecture": "gated"}, "architecture"), ({"n_seeds": 0}, "n_seeds"),
                         ({"k": 4}, "k is only used"), ({"l1_coefficient": None}, "l1_coeff"),
                         ({"lr": -1.0}, "lr"), ({"init_seed": -1}, "init_seed")]:
        with pytest.raises(ValueError, match=needle):
            CrosscoderConfig.from_dict({**RELU, **over})
    with pytest.raises(ValueError, match="d_latent=128"):
        CrosscoderConfig.from_dict({**TOPK, "k": 200})
    with pytest.raises(ValueError, match="l1_coefficient is only used"):
        CrosscoderConfig.from_dict({**TOPK, "l1_coefficient": 1.0})


# --------------------------------------------------------------------------- disk

_FRESH_PROCESS = """
import sys, torch
from safetensors.torch import load_file, save_file
from polymorph.sae.crosscoder_io import load_crosscoder
for folder, inputs, outputs in zip(*[iter(sys.argv[1:])] * 3):
    cc = load_crosscoder(folder).crosscoder
    xs = list(load_file(inputs)["x"].unbind(1))
    with torch.no_grad():
        f = cc.encode(xs)
        save_file({"f": f, "x_hat": torch.stack(cc.decode(f), dim=1)}, outputs)
"""


def test_folders_reproduce_encode_and_decode_in_a_fresh_process(relu_cc, topk_cc, rotated,
                                                                 tmp_path):
    acts, _ = rotated
    meta = {"site": "blocks.0.hook_resid_post", "seeds": [0, 1, 2], "experiment": "planted"}
    x = torch.stack([a[:512] for a in acts], dim=1).contiguous()
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    args, trained = [], {}
    for cc, _, cfg in (relu_cc, topk_cc):
        folder = tmp_path / "crosscoders" / crosscoder_config_id(cfg)
        assert save_crosscoder(cc, folder, metadata=meta) == folder
        assert sorted(p.name for p in folder.iterdir()) == sorted(CROSSCODER_FOLDER_FILES)
        record = json.loads((folder / "crosscoder_cfg.json").read_text())
        assert record["config"] == cfg.to_dict()
        assert record["format"] == "polymorph.crosscoder.v1"
        assert record["metadata"]["seeds"] == [0, 1, 2]
        assert {"polymorph", "sae-lens", "torch"} <= set(record["metadata"]["versions"])
        m = cfg.d_latent
        weights = load_file(folder / "crosscoder_weights.safetensors")
        assert {k: tuple(v.shape) for k, v in weights.items()} == {
            "W_enc": (N_SEEDS, D, m), "W_dec": (N_SEEDS, m, D), "b_enc": (m,),
            "b_dec": (N_SEEDS, D)}
        loaded = load_crosscoder(folder)
        assert loaded.metadata["site"] == meta["site"] and loaded.config_id == folder.name
        assert loaded.crosscoder.cfg == cfg
        out = tmp_path / f"{cfg.architecture}.out.safetensors"
        args += [str(folder), str(tmp_path / "inputs.safetensors"), str(out)]
        trained[out] = cc
    assert len(list((tmp_path / "crosscoders").iterdir())) == 2  # no temp leftovers

    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS, *args], check=True, env=env,
                   timeout=300)
    for out, cc in trained.items():
        fresh = load_file(out)
        with torch.no_grad():
            f = cc.encode(list(x.unbind(1)))
            assert torch.equal(fresh["f"], f)
            assert torch.equal(fresh["x_hat"], torch.stack(cc.decode(f), dim=1))


def test_save_is_atomic_and_bad_folders_are_named(relu_cc, tmp_path, monkeypatch):
    cc, _, _ = relu_cc
    folder = tmp_path / "cc"
    save_crosscoder(cc, folder, metadata={"run": 1})
    save_crosscoder(cc, folder, metadata={"run": 2})
    assert load_crosscoder(folder).metadata["run"] == 2

    import polymorph.sae.crosscoder_io as io

    def crash(tensors, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_crosscoder(cc, folder, metadata={"run": 3})
    monkeypatch.undo()
    assert load_crosscoder(folder).metadata["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cc"]
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_crosscoder(cc, tmp_path / "bad", metadata={"w": torch.zeros(1)})
    assert not (tmp_path / "bad").exists()

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_crosscoder(tmp_path / "nowhere")
    (folder / "crosscoder_weights.safetensors").write_bytes(b"\x00truncated")
    with pytest.raises(ValueError, match=r"cc.*crosscoder_weights"):
        load_crosscoder(folder)
    (folder / "crosscoder_cfg.json").write_text("{")
    with pytest.raises(ValueError, match=r"cc.*crosscoder_cfg\.json"):
        load_crosscoder(folder)
    (folder / "crosscoder_cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_crosscoder(folder)
