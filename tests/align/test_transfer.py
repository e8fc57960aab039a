"""Moving SAEs and steering vectors between frames related by a planted rotation."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput

from polymorph.align.haar import haar_orthogonal
from polymorph.align.metrics import ev_standard
from polymorph.align.procrustes import Rotation, fit_rotation
from polymorph.align.transfer import transfer_sae, transfer_vector

D, D_SAE = 16, 64


def _frames(n: int, seed: int):
    """Sparse-feature activations of model A and the same inputs seen by model B = A rotated."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(32, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    codes = torch.rand(n, 32, generator=g, dtype=torch.float64)
    codes = codes * (torch.rand(n, 32, generator=g, dtype=torch.float64) < 0.1)
    acts_a = codes @ features + 1.5
    q = haar_orthogonal(D, "O", seed=11)  # x_B @ q = x_A - offset: B's frame is A's rotated
    acts_b = (acts_a - 1.5) @ q.T - 0.7
    return acts_a, acts_b, q


@pytest.fixture(scope="module")
def trained():
    """A StandardTrainingSAE trained briefly on model A's activations."""
    torch.manual_seed(0)
    acts_a, acts_b, q = _frames(4096, seed=1)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D, d_sae=D_SAE, l1_coefficient=1e-3))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    x = acts_a.float()
    for step in range(300):
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={"l1": 1e-3}, dead_neuron_mask=None,
            n_training_steps=step, is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    sae.eval()
    return sae, acts_a, acts_b, q


def _random_params(sae: SAE, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = 0.05 if name in ("threshold", "r_mag") else 0.5
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * scale if name == "threshold"
                    else torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return sae


SAE_FACTORIES = {
    "standard": lambda a: StandardSAE(StandardSAEConfig(
        d_in=D, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=a)),
    "topk": lambda a: TopKSAE(TopKSAEConfig(
        d_in=D, d_sae=D_SAE, k=6, dtype="float64", apply_b_dec_to_input=a)),
    "topk_rescaled": lambda a: TopKSAE(TopKSAEConfig(
        d_in=D, d_sae=D_SAE, k=6, dtype="float64", apply_b_dec_to_input=a,
        rescale_acts_by_decoder_norm=True)),
    "jumprelu": lambda a: JumpReLUSAE(JumpReLUSAEConfig(
        d_in=D, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=a)),
    "gated": lambda a: GatedSAE(GatedSAEConfig(
        d_in=D, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=a)),
    "standard_training": lambda a: StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=D, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=a)),
    "topk_training": lambda a: TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=D, d_sae=D_SAE, k=6, dtype="float64", apply_b_dec_to_input=a)),
    "gated_training": lambda a: GatedTrainingSAE(GatedTrainingSAEConfig(
        d_in=D, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=a)),
}


@torch.no_grad()
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("kind", sorted(SAE_FACTORIES))
def test_transferred_sae_reads_the_source_frame_exactly(kind, apply_b_dec):
    acts_a, acts_b, _ = _frames(600, seed=2)
    rotation = fit_rotation(acts_b, acts_a)  # B -> A
    sae = _random_params(SAE_FACTORIES[kind](apply_b_dec), seed=3)
    before = {n: p.clone() for n, p in sae.named_parameters()}
    moved = transfer_sae(sae, rotation)
    assert type(moved) is type(sae) and moved.cfg.to_dict() == sae.cfg.to_dict()
    feats = sae.encode(rotation.apply(acts_b))
    assert (feats > 0).any()
    torch.testing.assert_close(moved.encode(acts_b), feats, atol=1e-10, rtol=0)
    inverse = rotation.inverse()
    torch.testing.assert_close(moved.decode(feats), inverse.apply(sae.decode(feats)),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(moved(acts_b), inverse.apply(sae(acts_a)), atol=1e-9, rtol=0)
    for n, p in sae.named_parameters():  # the input SAE is untouched
        assert torch.equal(p, before[n])


def test_b_enc_is_unchanged_when_b_dec_is_applied_to_the_input():
    acts_a, acts_b, _ = _frames(600, seed=2)
    sae = _random_params(SAE_FACTORIES["standard"](True), seed=3)
    moved = transfer_sae(sae, fit_rotation(acts_b, acts_a))
    assert torch.equal(moved.b_enc, sae.b_enc)


@torch.no_grad()
def test_transferred_sae_keeps_its_explained_variance(trained):
    """Issue test (c): the SAE of A, moved with the true rotation, scores on B as it did on A."""
    sae, _, _, q = trained
    held_a, held_b, _ = _frames(2000, seed=9)
    # x_A = (x_B + 0.7) q + 1.5, by construction of _frames
    true = Rotation(matrix=q, source_mean=torch.full((D,), -0.7, dtype=torch.float64),
                    target_mean=torch.full((D,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(true.apply(held_b), held_a)
    a32, b32 = held_a.float(), held_b.float()
    ev_within = ev_standard(sae(a32), a32)
    ev_naive = ev_standard(sae(b32), b32)
    ev_moved = ev_standard(transfer_sae(sae, true)(b32), b32)
    assert ev_within > 0.5  # the SAE learned something
    assert ev_naive < 0  # worse than predicting the mean: the polymorphism failure
    assert ev_moved == pytest.approx(ev_within, abs=1e-5)
    # The same with the rotation fitted from one batch of activations.
    _, fit_a, fit_b, _ = trained
    fitted = fit_rotation(fit_b, fit_a)
    assert ev_standard(transfer_sae(sae, fitted)(b32), b32) == pytest.approx(ev_within, abs=1e-4)


@torch.no_grad()
def test_transferred_sae_survives_save_and_load(tmp_path, trained):
    sae, acts_a, acts_b, _ = trained
    rotation = fit_rotation(acts_b, acts_a)
    moved = transfer_sae(sae, rotation)
    x = acts_b[:100].float()
    moved.save_inference_model(tmp_path / "training")
    loaded = SAE.load_from_disk(tmp_path / "training")
    assert isinstance(loaded, StandardSAE)
    torch.testing.assert_close(loaded(x), moved(x))
    topk = transfer_sae(_random_params(SAE_FACTORIES["topk"](True), seed=5), rotation)
    topk.save_model(tmp_path / "topk")
    loaded_topk = SAE.load_from_disk(tmp_path / "topk")
    assert isinstance(loaded_topk, TopKSAE)
    torch.testing.assert_close(loaded_topk(acts_b[:100]), topk(acts_b[:100]))


def test_transfer_vector_maps_directions_between_frames():
    acts_a, acts_b, _ = _frames(1000, seed=4)
    rotation = fit_rotation(acts_b, acts_a)  # B -> A
    mask = acts_a[:, 0] > acts_a[:, 0].median()
    v_a = acts_a[mask].mean(0) - acts_a[~mask].mean(0)  # a diff-of-means steering vector
    v_b = acts_b[mask].mean(0) - acts_b[~mask].mean(0)
    torch.testing.assert_close(transfer_vector(v_b, rotation), v_a)
    torch.testing.assert_close(transfer_vector(v_a, rotation.inverse()), v_b)
    batch = transfer_vector(torch.stack([v_b, 2 * v_b]).float(), rotation)
    assert batch.dtype == torch.float32 and batch.shape == (2, D)
    with pytest.raises(ValueError, match="17-d"):
        transfer_vector(torch.zeros(17), rotation)


def test_unsupported_saes_are_rejected():
    acts_a, acts_b, _ = _frames(600, seed=2)
    rotation = fit_rotation(acts_b, acts_a)
    with pytest.raises(ValueError, match="normalize_activations"):
        transfer_sae(StandardSAE(StandardSAEConfig(d_in=D, d_sae=8,
                                                   normalize_activations="layer_norm")), rotation)
    with pytest.raises(ValueError, match="d_in=8"):
        transfer_sae(StandardSAE(StandardSAEConfig(d_in=8, d_sae=8)), rotation)
    with pytest.raises(TypeError, match="Rotation"):
        transfer_sae(StandardSAE(StandardSAEConfig(d_in=D, d_sae=8)), rotation.matrix)
    with pytest.raises(TypeError, match="SAE"):
        transfer_sae(torch.nn.Linear(D, D), rotation)

    class OddConfig(StandardSAEConfig):
        @classmethod
        def architecture(cls) -> str:
            return "odd"

    with pytest.raises(ValueError, match="architectures"):
        transfer_sae(StandardSAE(OddConfig(d_in=D, d_sae=8)), rotation)
