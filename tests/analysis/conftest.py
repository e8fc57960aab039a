"""A shared analysis context over the session's smoke runs (seeds 0 and 1)."""

from __future__ import annotations

import pytest

from tests.conftest import compose, smoke_overrides


@pytest.fixture(scope="session")
def smoke_context(smoke_runs, tmp_path_factory):
    from polymorph.analysis.context import build_context

    root, _ = smoke_runs
    out = tmp_path_factory.mktemp("analysis_out")
    cfg = compose(smoke_overrides(root), config_name="analyze")
    return build_context(cfg, root, out, show_progress=False)


def plant_rotated_seed(src_root, src_name: str, dst_root, dst_name: str, sites, seed: int = 7,
                       q_seed: int = 11):
    """Experiment ``dst_name``: seed 0 of ``src_name`` plus seed ``seed`` = seed 0 with its
    residual stream rotated by a known Haar Q (function-preserving), every SAE moved along.

    Returns Q. Ground truth for every rotated metric: it must equal its within-seed value.
    """
    import shutil

    import torch

    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.procrustes import Rotation
    from polymorph.align.transfer import transfer_sae
    from polymorph.checkpoints import save_weights
    from polymorph.layout import RunLayout
    from polymorph.models.rotation import rotate_residual_stream
    from polymorph.pipeline import load_run_model
    from polymorph.sae.io import load_sae, save_sae

    src = RunLayout.for_seed(src_root, src_name, 0)
    shutil.copytree(src.root, RunLayout.for_seed(dst_root, dst_name, 0).root)
    rotated = RunLayout.for_seed(dst_root, dst_name, seed)
    shutil.copytree(src.root, rotated.root)
    model, _ = load_run_model(src)
    d = model.cfg.d_model
    q = haar_orthogonal(d, "O", seed=q_seed).double()
    save_weights(rotate_residual_stream(model, q), rotated.best)
    # the rotated seed's SAEs: seed 0's, rewritten to read its frame (x_rot = x_0 Q)
    to_anchor = Rotation(matrix=q.T, source_mean=torch.zeros(d), target_mean=torch.zeros(d))
    for site in sites:
        for folder in (src.saes / site).iterdir():
            saved = load_sae(folder)
            save_sae(transfer_sae(saved.sae, to_anchor), rotated.saes / site / folder.name,
                     metadata=saved.metadata, metrics=saved.metrics)
    return q
