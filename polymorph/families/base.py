"""The model-family interface: everything that differs between kinds of seeded models.

polymorph compares models of one architecture trained from different seeds. Where those models
come from differs: the Dyck toy is trained here (and resumed, and checkpointed every few
hundred steps); the PolyPythias or a researcher's own checkpoints are published weights that
are resolved and recorded. So do their inputs (generated bracket sequences with three label
heads, or windows of a text corpus with next-token targets) and what a report must warn about.

A :class:`ModelFamily` is one object that owns exactly those differences, chosen by config
(``conf/family/<name>.yaml``, a ``_target_`` node). Everything else (activations, SAEs,
rotations, every analysis callback) is written once against this interface:

* :meth:`~ModelFamily.obtain` makes a seed's model exist as a finished run folder;
* :meth:`~ModelFamily.load` reads a finished run's model back;
* :meth:`~ModelFamily.checkpoints` lists the intermediate models of a run (kept steps of a
  training run, or published revisions);
* :meth:`~ModelFamily.token_batch` builds a batch of inputs, with the mask of positions that
  give activation rows, identical for every seed;
* :attr:`~ModelFamily.readout` reads the model's outputs as named heads of class logits;
* :attr:`~ModelFamily.rank_metric`, :meth:`~ModelFamily.caveats`,
  :meth:`~ModelFamily.shared_directions`: what checkpoints are ranked by, what reports warn
  about, and which residual directions every seed shares by construction.

A new family of seeded models is one config file and, at most, one subclass.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from polymorph.files import read_json
from polymorph.layout import RunLayout
from polymorph.locks import file_lock
from polymorph.runs import check_matches_saved, discard_run, is_secondary_process

log = logging.getLogger(__name__)

#: target value meaning "this position has no target for this head" (e.g. the last position of
#: a text window has no next token)
NO_TARGET = -100


@dataclass(frozen=True)
class TokenBatch:
    """A fixed batch of model inputs and the positions whose activations become rows.

    Activation rows are the ``mask``-ed positions ordered by sequence, then position, so two
    models run on the same batch give row-aligned matrices (row i of seed a and row i of seed b
    are the same token in the same context).

    Attributes:
        tokens: long [n_sequences, length].
        mask: bool [n_sequences, length], True where a position gives an activation row.
        description: one phrase for reports (which tokens these are and how they were chosen).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    description: str

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and mask "
                             f"{tuple(self.mask.shape)} must be matching [n_sequences, length]")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.mask.sum())

    def head(self, n: int | None) -> TokenBatch:
        """The first ``n`` sequences (all of them for None)."""
        if n is None or n >= self.n_sequences:
            return self
        return TokenBatch(self.tokens[:n], self.mask[:n], f"the first {n} of {self.description}")

    def row_sequences(self) -> torch.Tensor:
        """long [n_rows]: the sequence index of every activation row (for resampling whole
        sequences in a bootstrap)."""
        return self.mask.nonzero()[:, 0]

    def chunks(self, batch_size: int):
        """(start, tokens, mask) per chunk of ``batch_size`` sequences, in order."""
        for start in range(0, self.n_sequences, batch_size):
            yield start, self.tokens[start:start + batch_size], self.mask[start:start + batch_size]


@dataclass(frozen=True)
class Checkpoint:
    """One intermediate model of a run: a kept training step or a published revision.

    Attributes:
        step: training step (the revision's step for published checkpoints).
        label: how reports name it (a file name, a revision).
        load: returns the model at that checkpoint (weights read only when called).
        metrics: the family's validation metrics at that step, if it has any (e.g.
            ``val/min_acc`` and the learning rate for a trained Dyck run).
    """

    step: int
    label: str
    load: Callable[[], Any]
    metrics: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def logits_at_kept(model, tokens: torch.Tensor, mask: torch.Tensor,
                   fwd_hooks: Sequence = ()) -> torch.Tensor:
    """The model's output logits at the ``mask``-ed positions, float32 [n_kept_rows, vocab]
    (rows in activation-row order), with TransformerLens ``fwd_hooks`` active.

    The model is causal, so positions after the last kept one never change the kept ones: the
    chunk is cut there."""
    device = next(model.parameters()).device
    width = int(mask.cumsum(1).argmax(1).max()) + 1
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        out = model(tokens[:, :width].to(device))
    return out[mask[:, :width].to(device)].float()


class Readout(ABC):
    """How a family's outputs are read: named heads of class logits at the kept positions.

    Every output-level measure (do two seeds predict the same thing, how much a steering
    vector moves a model, what an SAE spliced in costs) is computed from these two methods, so
    it is written once for every family.
    """

    #: a name for reports and results.json, e.g. "dyck_heads"
    name: str = ""
    #: the heads, in a fixed order
    heads: tuple[str, ...] = ()
    #: what the loss of one head is, for results.json definitions
    loss_definition: str = ""

    @abstractmethod
    def logits(self, model, tokens: torch.Tensor, mask: torch.Tensor,
               fwd_hooks: Sequence = ()) -> dict[str, torch.Tensor]:
        """Per head, float32 logits [n_kept_rows, n_classes] at the ``mask``-ed positions of
        one chunk (rows in activation-row order), with TransformerLens ``fwd_hooks`` active."""

    @abstractmethod
    def targets(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per head, the correct class (long [n_kept_rows]) at the kept positions, or
        :data:`NO_TARGET` where a position has none."""


class ModelFamily(ABC):
    """One kind of seeded models (see the module docstring). Subclasses are built by Hydra from
    ``conf/family/<name>.yaml``; their constructor arguments are that file's keys."""

    #: the family's config name (``family=<name>``)
    name: str = ""
    #: the metric checkpoints are ranked by (higher is better), or None
    rank_metric: str | None = None

    @property
    @abstractmethod
    def readout(self) -> Readout:
        """How this family's outputs are read."""

    # -- configuration -------------------------------------------------------------------

    @abstractmethod
    def identity(self, cfg: DictConfig) -> dict[str, Any]:
        """The resolved config sections that define what a run of ``cfg`` is: a run folder is
        reused only by a config with the same identity."""

    def comparable(self, run_cfg: DictConfig) -> dict[str, Any]:
        """What must agree between the saved configs of seeds analysed together."""
        ident = self.identity(run_cfg)
        ident.pop("seed", None)
        return ident

    def validate(self, cfg: DictConfig) -> None:
        """Config-only checks, before anything is trained or loaded; raise PolymorphError."""

    def validate_seeds(self, seeds: list[int]) -> None:
        """Checks on the set of seeds analysed together (e.g. that they are distinct models)."""

    def available_sites(self, cfg: DictConfig) -> list[str] | None:
        """The hook names a model of ``cfg`` has, if the config alone tells (None: known only
        once a model is loaded); lets a misspelt site fail before anything runs."""
        return None

    def check_batches(self, specs: dict[str, DictConfig]) -> None:
        """Checks that the named batch specs (SAE training, fit, eval) are as independent as
        their scores claim; raise PolymorphError naming the two that overlap."""

    # -- runs ----------------------------------------------------------------------------

    def obtain(self, cfg: DictConfig, layout: RunLayout, logger) -> dict:
        """Make ``cfg.seed``'s model exist as a finished run in ``layout`` and return its final
        metrics: reuse a finished run of the same identity, refuse one of another identity,
        start over with ``retrain=true``, else :meth:`create` it. Runs under the run's lock, so
        two jobs never build one run at once; a data-parallel worker of the job that holds the
        lock only joins its training."""
        if is_secondary_process():
            return self.create(cfg, layout, logger)
        with file_lock(layout.lock):
            if cfg.get("retrain"):
                discard_run(layout)
            check_matches_saved(self.identity, cfg, layout)
            if layout.is_finished():
                log.info("seed %s: finished run in %s reused (retrain=true to redo it)",
                         cfg.seed, layout.root)
                return read_json(layout.final_metrics)
            return self.create(cfg, layout, logger)

    @abstractmethod
    def create(self, cfg: DictConfig, layout: RunLayout, logger) -> dict:
        """Build the run (train or resume it; or resolve and record published weights); write
        ``config.yaml``, ``run.json`` and, last, ``metrics.json``; return the final metrics."""

    @abstractmethod
    def load(self, layout: RunLayout, which: str = "best"):
        """A finished run's model, in eval mode (``which``: "best", or a checkpoint label)."""

    @abstractmethod
    def checkpoints(self, layout: RunLayout) -> list[Checkpoint]:
        """The run's intermediate models, by increasing step (empty if it has none)."""

    def final_label(self, layout: RunLayout) -> str:
        """How reports name the model a finished run analyses."""
        return "the analysed model"

    # -- inputs and outputs --------------------------------------------------------------

    @abstractmethod
    def token_batch(self, spec: DictConfig, experiment_dir: Path, model) -> TokenBatch:
        """The batch ``spec`` describes (``activations`` or ``analysis.fit_batch`` ...),
        identical for every seed; ``model`` gives access to its tokenizer if one is needed."""

    def heldout_batches(self, n_sequences: int, seed: int) -> dict[str, TokenBatch]:
        """Extra held-out input distributions output-level measures are also reported on
        (e.g. the Dyck task's compositional and long sets); none by default."""
        return {}

    def batch_identity(self, spec: DictConfig) -> dict[str, str]:
        """The settings of ``spec`` that determine its tokens (recorded with cached
        activations, so a stale cache is recomputed)."""
        return {k: str(v) for k, v in dict(spec).items() if k not in ("batch_size", "dtype")}

    def sae_model_name(self, cfg: DictConfig) -> str:
        """The ``model_name`` recorded in an SAE's cfg.json: whose activations it reads."""
        return f"polymorph/{cfg.name}/seed={cfg.seed}"

    def shared_directions(self, d_model: int) -> torch.Tensor | None:
        """An orthonormal basis [d_model, k] of residual directions every seed shares by
        construction (so a rotation trivially preserves them), or None."""
        return None

    def caveats(self) -> list[str]:
        """Family-specific caveats every analysis report prints."""
        return []

    def description(self) -> dict[str, Any]:
        """What results.json records about the family."""
        return {"family": self.name, "readout": self.readout.name,
                "rank_metric": self.rank_metric}
