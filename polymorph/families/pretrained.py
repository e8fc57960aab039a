"""Published checkpoints as a family: the PolyPythias, or any set of seeded checkpoints.

``family=pretrained`` reads one causal language model per seed, with raw weights, through
TransformerLens (any architecture it converts: GPT-NeoX as in Pythia, GPT-2, Llama-style, ...).
Nothing is trained; a seed's run folder records exactly which weights were loaded.

* ``model_id``: a Hugging Face repository or a local folder, with ``{seed}`` where the seed
  goes: ``EleutherAI/pythia-70m-seed{seed}``, ``/data/myrun/seed{seed}``. A local folder holds
  ``<folder>/<revision>/`` (config.json, weights, tokenizer), or is the model itself for
  ``revision: main`` / null (:mod:`polymorph.models.pretrained`).
* ``revision``: the analysed checkpoint (``step143000``, the PolyPythias' last).
* ``revisions``: intermediate checkpoints (``step{N}``) that drift and convergence follow.
* inputs: windows of a text corpus (``corpus``), tokenised once per experiment and cached, the
  first ``skip_positions`` of each window left out (the attention sink, whose activations are
  tens of times larger than the rest and would dominate every fit).
* outputs: one head, the next-token distribution.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError
from polymorph.families.base import (
    NO_TARGET,
    Checkpoint,
    ModelFamily,
    Readout,
    TokenBatch,
    logits_at_kept,
)
from polymorph.files import atomic_write_json, atomic_write_text
from polymorph.layout import RunLayout
from polymorph.runs import read_run_config
from polymorph.tracking import log_config
from polymorph.versions import library_versions

log = logging.getLogger(__name__)

SEED_PLACEHOLDER = "{seed}"
REVISION_PATTERN = re.compile(r"step(\d+)")
# The published PolyPythia suites (EleutherAI/<suite>-seed<N>): the full suites have seeds
# 1..9; the decoupled 160m suites seeds 1..3 (weight: only the initialisation differs; data:
# only the data order differs).
PUBLISHED_SUITES = ("pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m",
                    "pythia-160m-weight", "pythia-160m-data")


class NextToken(Readout):
    """A language model's next-token distribution at every kept position."""

    name = "next_token"
    heads = ("next_token",)
    loss_definition = ("cross-entropy -log p(x_{t+1}) of the next-token distribution, averaged "
                       "over the kept positions t whose next token lies in the window")

    def logits(self, model, tokens: torch.Tensor, mask: torch.Tensor,
               fwd_hooks: Sequence = ()) -> dict[str, torch.Tensor]:
        return {"next_token": logits_at_kept(model, tokens, mask, fwd_hooks)}

    def targets(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        nxt = torch.full_like(tokens, NO_TARGET)
        nxt[:, :-1] = tokens[:, 1:]
        return {"next_token": nxt[mask]}


def leading_mask(tokens: torch.Tensor, skip: int) -> torch.Tensor:
    """Every position of every window but the first ``skip``."""
    if skip >= tokens.shape[1]:
        raise PolymorphError(f"skip_positions={skip} leaves nothing of {tokens.shape[1]}-token "
                             "windows; lower it or use longer windows (seq_len)")
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, :skip] = False
    return mask


class PretrainedFamily(ModelFamily):
    """Published or pre-existing checkpoints, one per seed (``family=pretrained``).

    Args:
        model_id: repository or folder with ``{seed}`` for the seed (see the module docstring).
        revision: the checkpoint analysed (null / ``main`` for a folder that is the model).
        revisions: intermediate checkpoints (``step{N}``) for drift and convergence.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16 on a GPU, fp32 on a CPU), float32, bfloat16, float16.
        tokenizer: where to read the tokenizer from (null: each model's own).
        corpus: the text corpus token batches are cut from (``polymorph.tasks.corpus``).
    """

    name = "pretrained"
    rank_metric = None

    def __init__(self, model_id: str, revision: str | None = None, revisions=(),
                 device: str = "auto", dtype: str = "auto", tokenizer: str | None = None,
                 corpus: Any = None) -> None:
        self.model_id = str(model_id)
        self.revision = None if revision is None else str(revision)
        self.revisions = [str(r) for r in (revisions or [])]
        self.device, self.dtype, self.tokenizer = str(device), str(dtype), tokenizer
        self.corpus = None if corpus is None else (
            OmegaConf.to_container(corpus, resolve=True) if isinstance(corpus, DictConfig)
            else dict(corpus))
        self._readout = NextToken()
        for rev in self.revisions:
            if REVISION_PATTERN.fullmatch(rev) is None:
                raise PolymorphError(f"family.revisions: {rev!r} is not a step{{N}} revision "
                                     "(e.g. step1000)")

    @property
    def readout(self) -> Readout:
        return self._readout

    def model_id_for(self, seed: int) -> str:
        return self.model_id.replace(SEED_PLACEHOLDER, str(int(seed)))

    # -- configuration -------------------------------------------------------------------

    def identity(self, cfg: DictConfig) -> dict[str, Any]:
        fam = OmegaConf.to_container(cfg.family, resolve=True)
        return {"seed": int(cfg.seed),
                "family": {k: fam.get(k) for k in ("_target_", "model_id", "revision",
                                                     "tokenizer")}}

    def comparable(self, run_cfg: DictConfig) -> dict[str, Any]:
        return {"family": {k: v for k, v in self.identity(run_cfg)["family"].items()
                           if k != "model_id"}}

    def validate(self, cfg: DictConfig) -> None:
        if cfg.io.mode != "independent":
            raise PolymorphError("io=shared trains the toy with the anchor's embeddings; "
                                 "published checkpoints have their own: use io=independent "
                                 "with family=pretrained")
        if self.corpus is None:
            raise PolymorphError("family=pretrained needs a `corpus` (the text its token "
                                 "batches are cut from; see conf/family/pretrained.yaml)")
        if SEED_PLACEHOLDER not in self.model_id and _sweeps_seeds():
            raise PolymorphError(
                f"family.model_id={self.model_id!r} has no {{seed}}, so every seed of this "
                f"sweep would load the same model; write where the seed goes, e.g. "
                f"family.model_id='{self.model_id}-seed{{seed}}'")
        local = Path(self.model_id_for(int(cfg.seed))).expanduser()
        if local.is_dir():  # a local checkpoint can be checked before anything is loaded
            from polymorph.models.pretrained import convert_config, resolve_model

            resolved = resolve_model(str(local), self.revision)
            convert_config(resolved.folder, f"{local}@{self.revision}")

    def validate_seeds(self, seeds: list[int]) -> None:
        if SEED_PLACEHOLDER not in self.model_id and len(seeds) > 1:
            raise PolymorphError(f"family.model_id={self.model_id!r} has no {{seed}}: seeds "
                                 f"{seeds} would all be the same model; write where the seed "
                                 f"goes, e.g. family.model_id='{self.model_id}-seed{{seed}}'")

    def available_sites(self, cfg: DictConfig) -> list[str] | None:
        local = Path(self.model_id_for(int(cfg.seed))).expanduser()
        if not local.is_dir():
            return None  # a Hub model's architecture is known once it is resolved
        from polymorph.models.pretrained import convert_config, resolve_model

        arch = convert_config(resolve_model(str(local), self.revision).folder, str(local))
        return residual_sites(int(arch["n_layers"]), bool(arch.get("parallel_attn_mlp")))

    def check_batches(self, specs: dict[str, DictConfig]) -> None:
        _check_disjoint(specs)

    # -- runs ----------------------------------------------------------------------------

    def _load(self, seed: int, revision: str | None):
        from polymorph.models.pretrained import load_pretrained

        return load_pretrained(self.model_id_for(seed), revision, device=self.device,
                               dtype=self.dtype, tokenizer=self.tokenizer)

    def create(self, cfg: DictConfig, layout: RunLayout, logger) -> dict:
        """Resolve (fetch if needed) the seed's model and record it as a finished run: the
        model id, revision and Hub commit actually loaded, so SAEs and analyses are tied to
        exact weights."""
        from polymorph.activations import SiteError, check_sites

        start = time.perf_counter()
        model = self._load(int(cfg.seed), self.revision)
        if cfg.get("sites") is not None:
            try:
                check_sites(model, list(cfg.sites))
            except SiteError as err:
                raise PolymorphError(str(err)) from err
        source = model.polymorph_source.to_dict()
        n_params = sum(p.numel() for p in model.parameters())
        atomic_write_text(layout.config, OmegaConf.to_yaml(cfg, resolve=True))
        info = {
            "seed": int(cfg.seed),
            "experiment": str(cfg.name),
            "family": self.name,
            "model": source,
            "architecture": {k: getattr(model.cfg, k) for k in
                             ("d_model", "n_layers", "n_heads", "d_mlp", "d_vocab", "n_ctx",
                              "original_architecture")},
            "total_parameters": n_params,
            "versions": library_versions(),
            "status": "finished",
        }
        atomic_write_json(layout.run_info, info)
        log_config(logger, cfg, {"model_id": source["model_id"], "revision": source["revision"],
                                 "model_commit": source["commit"]})
        final = {
            "seed": int(cfg.seed),
            "pretrained": True,
            **{f"model_{k}": v for k, v in source.items()},
            "total_parameters": n_params,
            "load_seconds": round(time.perf_counter() - start, 2),
            "definitions": {"pretrained": "no training happened: the model was loaded as "
                            "published"},
        }
        atomic_write_json(layout.final_metrics, final)  # written last: marks the run finished
        return final

    def load(self, layout: RunLayout, which: str = "best"):
        saved = read_run_config(layout)
        family = saved.family
        revision = family.get("revision") if which in ("best", "last") else which
        from polymorph.models.pretrained import load_pretrained

        return load_pretrained(str(family.model_id).replace(SEED_PLACEHOLDER, str(saved.seed)),
                               revision, device=self.device, dtype=self.dtype,
                               tokenizer=family.get("tokenizer"))

    def checkpoints(self, layout: RunLayout) -> list[Checkpoint]:
        out = [Checkpoint(int(REVISION_PATTERN.fullmatch(rev).group(1)), rev,
                          partial(self.load, layout, rev)) for rev in self.revisions]
        return sorted(out, key=lambda c: c.step)

    def final_label(self, layout: RunLayout) -> str:
        return f"revision {read_run_config(layout).family.get('revision')}"

    # -- inputs and outputs --------------------------------------------------------------

    def token_batch(self, spec: DictConfig, experiment_dir: Path, model) -> TokenBatch:
        from polymorph.tasks.corpus import CorpusConfig, cached_corpus_windows

        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise PolymorphError("a corpus batch needs the model's tokenizer (model.tokenizer)")
        corpus = CorpusConfig.from_dict(self.corpus)
        n, seq_len = int(spec.n_sequences), int(spec.seq_len)
        offset, skip = int(spec.get("offset", 0)), int(spec.get("skip_positions", 1))
        tokens = cached_corpus_windows(tokenizer, corpus, n, seq_len, offset,
                                       Path(experiment_dir) / "corpus")
        return TokenBatch(tokens, leading_mask(tokens, skip),
                          f"{n} windows x {seq_len} tokens from window {offset} of corpus "
                          f"{corpus.path}, first {skip} position(s) of each skipped")

    def batch_identity(self, spec: DictConfig) -> dict[str, str]:
        return {"n_sequences": str(spec.n_sequences), "seq_len": str(spec.seq_len),
                "offset": str(spec.get("offset", 0)),
                "skip_positions": str(spec.get("skip_positions", 1)),
                "corpus": str(sorted((self.corpus or {}).items())),
                "dtype": self.dtype}

    def sae_model_name(self, cfg: DictConfig) -> str:
        return f"{self.model_id_for(int(cfg.seed))}@{self.revision}"

    def caveats(self) -> list[str]:
        return ["Pretrained models: activations skip the first position(s) of every corpus "
                "window (the attention sink); SAE-training, fit and eval windows are disjoint "
                "slices of the corpus."]

    def description(self) -> dict[str, Any]:
        return {**super().description(), "model_id": self.model_id, "revision": self.revision,
                "revisions": self.revisions, "corpus": self.corpus}


def residual_sites(n_layers: int, parallel: bool) -> list[str]:
    """The distinct residual-stream hooks of an n-layer model (no resid_mid when attention and
    MLP read the same input in parallel)."""
    sites = ["blocks.0.hook_resid_pre"]
    for layer in range(n_layers):
        if not parallel:
            sites.append(f"blocks.{layer}.hook_resid_mid")
        sites.append(f"blocks.{layer}.hook_resid_post")
    return sites


def _sweeps_seeds() -> bool:
    """True inside a Hydra multirun whose job overrides set the seed."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return False
    return hc.mode == RunMode.MULTIRUN and any(
        o.split("=", 1)[0].lstrip("+~") == "seed" for o in hc.overrides.task)


def _check_disjoint(specs: dict[str, DictConfig]) -> None:
    """Corpus slices for SAE training, fitting and scoring must not overlap (held-out scores)."""
    ranges = {}
    for name, spec in specs.items():  # token ranges of the packed stream
        start, n, length = int(spec.get("offset", 0)), int(spec.n_sequences), int(spec.seq_len)
        ranges[name] = (start * length, (start + n) * length)
    items = list(ranges.items())
    for i, (na, (a0, a1)) in enumerate(items):
        for nb, (b0, b1) in items[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise PolymorphError(
                    f"corpus slices overlap: {na} reads tokens {a0}..{a1 - 1} of the packed "
                    f"stream, {nb} reads {b0}..{b1 - 1}; give them disjoint offsets (offset "
                    f"counts windows of seq_len tokens) so every score is held out"
                )
