"""evaluate_sae on a hand-built SAE whose metrics are known exactly."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from polymorph.align.metrics import ev_published, ev_standard
from polymorph.sae import METRIC_DEFINITIONS, evaluate_sae


@pytest.fixture
def hand_sae():
    """f0 = relu(x0), f1 = relu(x1), f2 never fires (bias -100); decoder rows e0, e1, e0."""
    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -100.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
        sae.b_dec.zero_()
    return sae


X = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, -1.0], [0.0, 0.0]])
X_HAT = torch.tensor([[1.0, 2.0], [0.0, 3.0], [2.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("batch_size", [1, 3, 8192])
def test_metrics_match_hand_computation(hand_sae, batch_size):
    m = evaluate_sae(hand_sae, X, batch_size=batch_size)
    assert m["n_rows"] == 4
    assert m["l0"] == pytest.approx(4 / 4)  # active features per row: 2, 1, 1, 0
    assert m["firing_frequency"] == pytest.approx([2 / 4, 2 / 4, 0.0])
    assert m["dead_fraction"] == pytest.approx(1 / 3)
    assert m["mse"] == pytest.approx(2 / 8)  # two entries off by 1, eight entries
    assert m["ev_published"] == pytest.approx(ev_published(X_HAT, X))
    assert m["ev_standard"] == pytest.approx(ev_standard(X_HAT, X))
    assert m["ev_published"] != pytest.approx(m["ev_standard"])


def test_definitions_cover_every_metric(hand_sae):
    m = evaluate_sae(hand_sae, X)
    metric_keys = set(m) - {"definitions"}
    assert metric_keys == {
        "ev_published",
        "ev_standard",
        "mse",
        "l0",
        "dead_fraction",
        "firing_frequency",
        "n_rows",
    }
    assert set(m["definitions"]) == metric_keys == set(METRIC_DEFINITIONS)
    assert "grand mean" in m["definitions"]["ev_published"]


def test_width_mismatch(hand_sae):
    with pytest.raises(ValueError, match="d_in=2"):
        evaluate_sae(hand_sae, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="no rows"):
        evaluate_sae(hand_sae, torch.zeros(0, 2))
