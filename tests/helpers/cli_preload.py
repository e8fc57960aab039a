"""What the entry points' fork server (tests/helpers/cli.py) imports once: the libraries every
job imports, and polymorph's job modules."""

import hydra  # noqa: F401
import lightning  # noqa: F401
import sae_lens  # noqa: F401
import transformer_lens  # noqa: F401
import wandb.sdk.launch  # noqa: F401  (wandb.init imports it in every offline run's process)

import polymorph.analysis.runner
import polymorph.compare
import polymorph.pipeline
import polymorph.reports.build  # noqa: F401
