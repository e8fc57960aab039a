"""Composing configs the way the entry points do, and the overrides the tests share."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"


def compose(overrides: list[str], config_name: str = "train", return_hydra: bool = False):
    """Compose a config the way the entry point would, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from polymorph.parallel import register_resolver

    register_resolver()  # as the entry points do (polymorph.sweep.expand_argv)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name=config_name, overrides=overrides, return_hydra_config=return_hydra
        )


def only_callbacks(*keep: str) -> list[str]:
    """Overrides that switch off every analysis callback of conf/analysis/default.yaml but
    ``keep``: for a test that reads only those callbacks' results."""
    from omegaconf import OmegaConf

    names = OmegaConf.load(CONF_DIR / "analysis" / "default.yaml").callbacks
    unknown = set(keep) - set(names)
    assert not unknown, f"no such callbacks: {sorted(unknown)}"
    return [f"~analysis.callbacks.{name}" for name in names if name not in keep]


def smoke_overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "logger=none", f"paths.root={root}", *extra]


def tiny_lm_overrides(tiny: dict, root: Path, *extra: str, analysis: bool = False) -> list[str]:
    """family=pretrained (the polypythia preset) pointed at tiny local models and corpus.

    ``analysis=True`` adds the analyze.py settings (compose with config_name="analyze").
    """
    base = [
        "experiment=polypythia",
        "logger=none",
        f"paths.root={root}",
        f"name={tiny.get('name', 'tiny_lm')}",
        f"family.model_id='{tiny['model_id_template']}'",
        f"family.revision={tiny['revisions'][0]}",
        f"family.revisions=[{','.join(tiny['drift_revisions'])}]",
        "corpus.path=json",
        f"corpus.data_files={tiny['corpus']}",
        "corpus.shuffle_buffer=100",
        f"sites=[{','.join(tiny['sites'])}]",
        "activations.n_sequences=64",
        "activations.seq_len=32",
        "sae.steps=20",
        "sae.batch_size=256",
        "trainer.enable_progress_bar=false",
    ]
    if not analysis:
        return base + list(extra)
    return base + [
        "analysis.fit_batch.seq_len=32",
        "analysis.eval_batch.seq_len=32",
        "analysis.fit_batch.offset=64",
        "analysis.eval_batch.offset=128",
        "analysis.haar_null_samples=50",
        f"analysis.callbacks.steering.site={tiny['sites'][-1]}",
        "analysis.callbacks.steering.n_boot=100",
        "analysis.callbacks.map_family.ranks=[1,4]",  # as the smoke preset: two of the five
        *extra,
    ]
