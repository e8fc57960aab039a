"""Cross-seed analysis of one experiment's finished seeds.

    python analyze.py                       # the default experiment
    python analyze.py experiment=smoke      # another preset
    python analyze.py analysis.pairs=all analysis.score_on=fit '~analysis.callbacks.steering'
"""

import sys

import hydra
from omegaconf import DictConfig

from polymorph.sweep import expand_argv

expand_argv()


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from polymorph.analysis.runner import analysis_dir, analyze
    from polymorph.errors import PolymorphError

    try:
        results, _ = analyze(cfg)
    except PolymorphError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    out = analysis_dir(cfg)
    state = "PARTIAL results" if results["meta"]["partial"] else "results"
    print(f"{state}: {out / 'results.json'}\nreport:  {out / 'report.md'}")


if __name__ == "__main__":
    main()
