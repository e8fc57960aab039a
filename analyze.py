"""Cross-seed analysis of one ablation's finished seeds (the same overrides as its training).

    python analyze.py                       # the default experiment: outputs/default/analysis/
    python analyze.py experiment=smoke      # another preset
    python analyze.py -m io=independent,shared   # each ablation: .../io=shared/analysis/
    python analyze.py analysis.pairs=all analysis.score_on=fit '~analysis.callbacks.steering'

Side by side: python compare.py ablations=[io=independent,io=shared]
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
