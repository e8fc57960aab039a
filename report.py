"""Build the W&B report across ablations (wandb-workspaces Reports API).

    python report.py --dry-run                 # offline: writes comparison/wandb_report.json
    python report.py                           # saves the report to W&B (needs `wandb login`)
    python report.py experiment=smoke ablations=[io=independent,io=shared] --dry-run

It first writes the comparison (as compare.py does, same overrides), then a report with one
panel grid per question, run sets filtered by experiment and grouped by ablation, and the
comparison table. Upload the offline runs first: wandb sync outputs/**/offline-run-*
"""

import sys

import hydra
from omegaconf import DictConfig

from polymorph.sweep import expand_argv, pop_flag, rewrite_ablations

DRY_RUN = pop_flag("--dry-run")
expand_argv()
rewrite_ablations()


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from polymorph.compare import job_overrides
    from polymorph.errors import PolymorphError
    from polymorph.reports.build import make_report

    try:
        message = make_report(cfg, job_overrides(), dry_run=DRY_RUN)
    except PolymorphError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(message)


if __name__ == "__main__":
    main()
