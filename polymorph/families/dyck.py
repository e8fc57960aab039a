"""The Dyck-3 toy family: models trained here, one run per seed, checkpointed as they train.

* obtain: train (or resume) the 104,448-parameter transformer with Lightning; in the
  ``io=shared`` cohort, every non-anchor seed first copies the anchor's trained embedding and
  unembedding (training the anchor itself if it is not finished) and freezes them.
* checkpoints: the kept step checkpoints (``checkpoints/step=*.safetensors``), ranked by
  ``val/min_acc`` (with the learning rate they were taken at, from ``index.json``).
* inputs: fixed batches from the task's training generator (by seed and length range); every
  non-PAD position gives an activation row.
* outputs: three heads (``tok``, ``depth``, ``valid``) split from one 51-way unembedding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from polymorph.checkpoints import CheckpointError, load_weights, read_weights
from polymorph.errors import PolymorphError
from polymorph.families.base import (
    Checkpoint,
    ModelFamily,
    Readout,
    TokenBatch,
    logits_at_kept,
)
from polymorph.files import CorruptFileError, read_json
from polymorph.instantiation import build
from polymorph.layout import RunLayout
from polymorph.locks import file_lock
from polymorph.models.dyck import IO_PARAMETERS, N_POSITIONAL_FEATURES, split_logits
from polymorph.runs import check_matches_saved, read_run_config, run_layout
from polymorph.tasks.dyck import HEADS, PAD, generate_training_tokens, label_tokens, make_batch

log = logging.getLogger(__name__)

IO_MODES = ("independent", "shared")
MIN_ACC = "val/min_acc"
HELDOUT_KINDS = ("compositional", "long")


class DyckHeads(Readout):
    """The toy's three per-position classification heads, at every non-PAD position."""

    name = "dyck_heads"
    heads = HEADS
    loss_definition = ("cross-entropy of the head's softmax against the position's label, "
                       "averaged over non-PAD positions (BOS and EOS included)")

    def logits(self, model, tokens: torch.Tensor, mask: torch.Tensor,
               fwd_hooks: Sequence = ()) -> dict[str, torch.Tensor]:
        return split_logits(logits_at_kept(model, tokens, mask, fwd_hooks))

    def targets(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = label_tokens(tokens)
        return {head: batch.labels[head][mask] for head in HEADS}


def dyck_tokens(n_sequences: int, seed: int, min_len: int = 2, max_len: int = 48) -> torch.Tensor:
    """A fixed batch from the training generator, the same for every model seed."""
    return generate_training_tokens(int(n_sequences), torch.Generator().manual_seed(int(seed)),
                                    min_len=int(min_len), max_len=int(max_len))


class DyckFamily(ModelFamily):
    """The Dyck-3 toy (``family=dyck``, the default). Its model is ``cfg.model``, its training
    recipe ``cfg.data``, ``cfg.training`` and ``cfg.trainer``, its cohort ``cfg.io``."""

    name = "dyck"
    rank_metric = MIN_ACC

    def __init__(self) -> None:
        self._readout = DyckHeads()

    @property
    def readout(self) -> Readout:
        return self._readout

    # -- configuration -------------------------------------------------------------------

    def identity(self, cfg: DictConfig) -> dict[str, Any]:
        data = OmegaConf.to_container(cfg, resolve=True)
        return {k: data.get(k) for k in ("seed", "family", "model", "data", "training", "io")}

    def validate(self, cfg: DictConfig) -> None:
        if cfg.get("model") is None:
            raise PolymorphError("family=dyck needs a `model` section (conf/model/dyck.yaml)")
        if cfg.io.mode not in IO_MODES:
            raise PolymorphError(f"io.mode={cfg.io.mode} is unknown; use io=independent or "
                                 "io=shared")

    def check_batches(self, specs: dict[str, DictConfig]) -> None:
        seeds: dict[int, str] = {}
        for name, spec in specs.items():
            seed = int(spec.seed)
            if seed in seeds:
                raise PolymorphError(
                    f"{seeds[seed]} and {name} both draw Dyck sequences with seed {seed}: they "
                    "would be the same sequences, so a held-out score would be in-sample; give "
                    "them different seeds")
            seeds[seed] = name

    def available_sites(self, cfg: DictConfig) -> list[str]:
        model = build(cfg.model, "model")  # a 104k-parameter model: milliseconds
        return list(model.hook_dict)

    # -- runs ----------------------------------------------------------------------------

    def create(self, cfg: DictConfig, layout: RunLayout, logger) -> dict:
        from polymorph.training.fit import fit_transformer

        anchor_io = None
        if cfg.io.mode == "shared" and int(cfg.seed) != int(cfg.io.anchor_seed):
            anchor_io = self._anchor_io_weights(cfg)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # seed once, centrally
        model = build(cfg.model, "model")
        return fit_transformer(cfg, layout, logger, model, anchor_io)

    def _anchor_io_weights(self, cfg: DictConfig) -> dict[str, torch.Tensor]:
        """The anchor's trained embedding and unembedding, training the anchor first if needed.

        The anchor's own lock makes this safe under any launcher order or parallelism: whoever
        gets the lock first trains the anchor, the others wait and then reuse it.
        """
        from polymorph.training.fit import fit_transformer

        anchor_cfg = cfg.copy()
        OmegaConf.set_struct(anchor_cfg, False)
        anchor_cfg.seed = int(cfg.io.anchor_seed)
        anchor_cfg.retrain = False
        anchor = run_layout(anchor_cfg, self)
        anchor.root.mkdir(parents=True, exist_ok=True)
        with file_lock(anchor.lock):
            if anchor.config.is_file():
                saved = read_run_config(anchor)
                for key in ("model", "io"):
                    a = OmegaConf.to_container(saved[key], resolve=True)
                    b = OmegaConf.to_container(cfg[key], resolve=True)
                    if a != b:
                        raise PolymorphError(
                            f"anchor run {anchor.root} has {key}={a}, this run has {key}={b}: "
                            "shared I/O needs identical configs; train the anchor with the same "
                            "overrides or use another name=..."
                        )
            if not anchor.is_finished():
                log.info("io=shared: training anchor seed %s first in %s", anchor_cfg.seed,
                         anchor.root)
                check_matches_saved(self.identity, anchor_cfg, anchor)
                L.seed_everything(int(anchor_cfg.seed), workers=True, verbose=False)
                fit_transformer(anchor_cfg, anchor, False, build(anchor_cfg.model, "model"))
        state, _ = read_weights(anchor.best)
        return {name: state[name] for name in IO_PARAMETERS}

    def load(self, layout: RunLayout, which: str = "best"):
        saved = read_run_config(layout)
        model = build(saved.model, "model")
        path = {"best": layout.best, "last": layout.last}.get(which)
        if path is None:
            path = Path(which) if Path(which).is_absolute() else layout.checkpoints / which
        try:
            load_weights(model, path)
        except CheckpointError as err:
            raise PolymorphError(str(err)) from err
        model.eval()
        return model

    def checkpoints(self, layout: RunLayout) -> list[Checkpoint]:
        index = {}
        if layout.checkpoint_index.is_file():
            try:
                index = read_json(layout.checkpoint_index)
            except CorruptFileError as err:
                log.warning("%s: metrics of the checkpoints are unknown", err)
        return [Checkpoint(step, path.name, partial(self.load, layout, str(path)),
                           dict(index.get(str(step), {})))
                for step, path in layout.step_checkpoints().items()]

    def final_label(self, layout: RunLayout) -> str:
        best = read_json(layout.final_metrics).get("best_step")
        return f"best step {best}"

    # -- inputs and outputs --------------------------------------------------------------

    def token_batch(self, spec: DictConfig, experiment_dir: Path, model) -> TokenBatch:
        tokens = dyck_tokens(spec.n_sequences, spec.seed, spec.get("min_len", 2),
                             spec.get("max_len", 48))
        return TokenBatch(tokens, tokens != PAD,
                          f"{spec.n_sequences} Dyck sequences (generator seed {spec.seed}, "
                          f"lengths {spec.get('min_len', 2)}..{spec.get('max_len', 48)}), "
                          "every non-PAD position")

    def batch_identity(self, spec: DictConfig) -> dict[str, str]:
        return {k: str(spec.get(k, default)) for k, default in
                (("n_sequences", None), ("seed", None), ("min_len", 2), ("max_len", 48))}

    def heldout_batches(self, n_sequences: int, seed: int) -> dict[str, TokenBatch]:
        out = {}
        for i, kind in enumerate(HELDOUT_KINDS):
            tokens = make_batch(kind, int(n_sequences), int(seed) + i).tokens
            out[kind] = TokenBatch(tokens, tokens != PAD,
                                   f"{n_sequences} held-out '{kind}' sequences (seed {seed + i})")
        return out

    def sae_model_name(self, cfg: DictConfig) -> str:
        return f"polymorph-dyck/{cfg.name}/seed={cfg.seed}"

    def shared_directions(self, d_model: int) -> torch.Tensor:
        # the fixed positional code writes only coordinates 0..5 of the residual stream
        return torch.eye(d_model, dtype=torch.float64)[:, :N_POSITIONAL_FEATURES]

    def caveats(self) -> list[str]:
        return [
            "Where a site's activations span fewer than d dimensions (e.g. "
            "`blocks.0.hook_resid_pre` = token embedding + the 6-dimensional positional code: "
            "at most 15 directions), the rotation is only determined on that span; diagnostics "
            "of R are restricted to the span there.",
            "The positional code (residual coordinates 0..5) is fixed and shared by every seed "
            "by construction, so a rotation that preserves it is no evidence of shared learning.",
        ]
