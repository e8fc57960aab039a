"""A small experiment with everything the shared-dictionary comparison reads: three smoke seeds
with a TopK ladder at one site, a universal SAE and a crosscoder ladder over them; and the same
with seeds planted as exact rotations of seed 0."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.config import compose, only_callbacks, smoke_overrides

SITE = "blocks.1.hook_resid_post"
NAME = "shared"
# sae.k=8 is the middle rung, so the analysis context finds its SAE config too
LADDER = ["sae=topk", "sae.k=8", "sae.steps=100", "sae.batch_size=256", "sae_ladder=topk",
          "sae_ladder.rungs=[{k:4},{k:8},{k:16}]"]
UNIVERSAL = ["stage=shared", "shared=universal", "shared.fit_batch.n_sequences=512"]
CROSSCODER = ["stage=shared", "shared=crosscoder", "shared.rungs=[{k:4},{k:8},{k:16}]"]
ANALYSIS = ["analysis.fit_batch.n_sequences=512", "analysis.eval_batch.n_sequences=256",
            "analysis.callbacks.shared_dictionaries.n_boot=200",
            *only_callbacks("shared_dictionaries")]


def overrides(root: Path, *extra: str, name: str = NAME) -> list[str]:
    return smoke_overrides(root, f"name={name}", f"sites=[{SITE}]", *LADDER, *extra)


def train_stage(root: Path, stage: list[str], *extra: str, name: str = NAME):
    from polymorph.pipeline import train

    return train(compose(overrides(root, *stage, *extra, name=name)))


def build_experiment(root: Path, seeds=(0, 1, 2)) -> None:
    for seed in seeds:
        train_stage(root, [f"seed={seed}"])
    train_stage(root, UNIVERSAL)
    train_stage(root, CROSSCODER)


def analyze_shared(root: Path, *extra: str, name: str = NAME):
    from polymorph.analysis.runner import analyze

    cfg = compose(overrides(root, *ANALYSIS, *extra, name=name), config_name="analyze")
    results, objects = analyze(cfg, show_progress=False)
    return results, objects["out_dir"], objects["context"]


def copy_experiment(src_root: Path, dst_root: Path, name: str = NAME, shared: bool = True) -> None:
    ignore = None if shared else shutil.ignore_patterns("shared")
    shutil.copytree(src_root / name, dst_root / name, ignore=ignore)


def plant_rotated_copies(src_root: Path, dst_root: Path, seeds=(7, 8)) -> dict:
    """Experiment NAME in ``dst_root``: seed 0 of ``src_root`` and ``seeds``, each seed 0 with
    its residual stream rotated by a known Haar Q (the same function); their SAEs are seed 0's
    moved along, their activation caches recomputed. Returns {seed: Q}."""
    import torch

    from polymorph.align.haar import haar_orthogonal
    from polymorph.align.procrustes import Rotation
    from polymorph.align.transfer import transfer_sae
    from polymorph.checkpoints import save_weights
    from polymorph.families.dyck import DyckFamily
    from polymorph.layout import RunLayout
    from polymorph.models.rotation import rotate_residual_stream
    from polymorph.sae.io import load_sae, save_sae

    src = RunLayout.for_seed(src_root, NAME, 0)
    shutil.copytree(src.root, RunLayout.for_seed(dst_root, NAME, 0).root)
    model = DyckFamily().load(src)
    d = model.cfg.d_model
    qs = {}
    for i, seed in enumerate(seeds):
        run = RunLayout.for_seed(dst_root, NAME, seed)
        shutil.copytree(src.root, run.root, ignore=shutil.ignore_patterns("activations", "saes"))
        q = haar_orthogonal(d, "O", seed=31 + i).double()
        save_weights(rotate_residual_stream(model, q), run.best)
        to_anchor = Rotation(matrix=q.T, source_mean=torch.zeros(d), target_mean=torch.zeros(d))
        for folder in (src.saes / SITE).iterdir():
            saved = load_sae(folder)
            save_sae(transfer_sae(saved.sae, to_anchor), run.saes / SITE / folder.name,
                     metadata=saved.metadata, metrics=saved.metrics)
        qs[seed] = q
    return qs
