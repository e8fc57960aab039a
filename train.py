"""Train one Dyck-3 transformer and its SAEs per seed (or, for pretrained models, the SAEs).

    python train.py                          # seed 0, default preset
    python train.py -m seed=0..8             # nine seeds (inclusive range): outputs/default/seed=N/,
                                             # side by side, one process per core (parallel.*)
    python train.py -m seed=0..8 io=shared   # an ablation: outputs/default/io=shared/seed=N/
    python train.py -m seed=0..8 sae.expansion=32        # SAEs only, beside the preset's
    python train.py -m seed=1..9 experiment=polypythia   # the PolyPythias (needs the Hub)
"""

import sys

import hydra
from omegaconf import DictConfig

from polymorph.sweep import expand_argv

expand_argv(default_launcher="parallel")  # conf/train.yaml: -m runs seeds side by side


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from polymorph.errors import PolymorphError
    from polymorph.pipeline import train

    try:
        metrics, _ = train(cfg)
    except PolymorphError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    return metrics.get("best/val/min_acc")


if __name__ == "__main__":
    main()
