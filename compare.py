"""Compare ablations: every headline number of each ablation's analysis, side by side.

    python compare.py                                        # conf/compare/default.yaml's list
    python compare.py ablations=[io=independent,io=shared]   # any list of ablations
    python compare.py experiment=smoke ablations=[io=independent,io=shared,sae.expansion=32]
    python compare.py ablations=[io=shared,'io=shared model.d_model=128']   # several keys: quote

Overrides outside ablations=[...] apply to every ablation. Writes
outputs/<experiment>/comparison/ (comparison.json, comparison.md, figures/).
"""

import sys

import hydra
from omegaconf import DictConfig

from polymorph.sweep import expand_argv, rewrite_ablations

expand_argv()
rewrite_ablations()


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from polymorph.compare import compare, job_overrides
    from polymorph.errors import PolymorphError

    try:
        _, out = compare(cfg, job_overrides())
    except PolymorphError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"comparison: {out / 'comparison.md'}\ntable:      {out / 'comparison.json'}")


if __name__ == "__main__":
    main()
