"""The token batches activations are collected on, for either kind of model.

* ``model_source=train`` (the Dyck toy): a batch is drawn from the task's generator by seed
  (``n_sequences``, ``seed``, ``min_len``, ``max_len``); positions kept: every non-PAD one.
* ``model_source=pretrained`` (PolyPythias): a batch is a slice of the packed text corpus
  (``cfg.corpus``) by ``offset`` and ``n_sequences`` windows of ``seq_len`` tokens; positions
  kept: all but the first ``skip_positions`` of each window. The first position of a window
  carries the model's attention-sink activations (norms tens of times the others), which would
  dominate every fit and every explained variance, so it is left out by default.

Corpus batches are tokenised once per experiment and cached under
``<experiment>/corpus/``, so every seed (and analyze.py) sees the identical tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from polymorph.errors import PolymorphError
from polymorph.tasks.dyck import PAD

log = logging.getLogger(__name__)

MODEL_SOURCES = ("train", "pretrained")


def model_source(cfg: DictConfig) -> str:
    source = str(cfg.get("model_source", "train"))
    if source not in MODEL_SOURCES:
        raise PolymorphError(f"model_source={source} is unknown; use one of {MODEL_SOURCES}")
    return source


def is_pretrained(cfg: DictConfig) -> bool:
    return model_source(cfg) == "pretrained"


def corpus_cache_dir(experiment_dir: Path) -> Path:
    return experiment_dir / "corpus"


def batch_tokens(cfg: DictConfig, spec: DictConfig, experiment_dir: Path, tokenizer=None) -> torch.Tensor:
    """The token batch ``spec`` describes ([n_sequences, length]), identical for every seed."""
    if not is_pretrained(cfg):
        from polymorph.activations import analysis_tokens

        return analysis_tokens(int(spec.n_sequences), int(spec.seed), int(spec.min_len), int(spec.max_len))
    return corpus_batch(cfg, spec, experiment_dir, tokenizer)


def corpus_batch(cfg: DictConfig, spec: DictConfig, experiment_dir: Path, tokenizer) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    from polymorph.locks import file_lock
    from polymorph.tasks.corpus import CorpusConfig, corpus_windows

    if cfg.get("corpus") is None:
        raise PolymorphError("model_source=pretrained needs a `corpus` section (see conf/experiment/polypythia.yaml)")
    if tokenizer is None:
        raise PolymorphError("a corpus batch needs the model's tokenizer")
    corpus = CorpusConfig.from_dict(OmegaConf.to_container(cfg.corpus, resolve=True))
    n, seq_len, offset = int(spec.n_sequences), int(spec.seq_len), int(spec.get("offset", 0))
    tok_name = tokenizer_fingerprint(tokenizer)
    key = f"{corpus.fingerprint(tok_name, seq_len)}-offset{offset}-n{n}"
    folder = corpus_cache_dir(experiment_dir)
    path = folder / f"{key}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f"{key}.lock"):
        if path.is_file():
            try:
                return load_file(str(path))["tokens"]
            except Exception as err:  # noqa: BLE001 - a corrupt cache is rebuilt
                log.warning("corpus cache %s unreadable (%s): rebuilding it", path, err)
        log.info("tokenising corpus %s: %d windows of %d tokens from window %d", corpus.path, n, seq_len, offset)
        tokens = corpus_windows(tokenizer, corpus, n, seq_len, offset)
        meta = {k: str(v) for k, v in corpus.__dict__.items()}
        meta.update(tokenizer=tok_name, seq_len=str(seq_len), offset=str(offset), n_sequences=str(n))
        tmp = path.with_name(path.name + ".tmp")
        save_file({"tokens": tokens.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
    return tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by its vocabulary, not its folder: every PolyPythia seed has its
    own copy of one tokenizer, and all must share one cached corpus batch."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id]).encode()
    return f"{type(tokenizer).__name__}-{hashlib.sha256(blob).hexdigest()[:12]}"


def position_mask(cfg: DictConfig, tokens: torch.Tensor, spec: DictConfig | None = None) -> torch.Tensor:
    """Which positions of ``tokens`` give activation rows (see the module docstring)."""
    if not is_pretrained(cfg):
        return tokens != PAD
    skip = int((spec or {}).get("skip_positions", cfg.activations.get("skip_positions", 1)))
    if skip >= tokens.shape[1]:
        raise PolymorphError(f"skip_positions={skip} leaves nothing of {tokens.shape[1]}-token windows")
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, :skip] = False
    return mask


def describe_batch(cfg: DictConfig, spec: DictConfig) -> str:
    """One phrase for reports: which tokens a batch spec selects."""
    if not is_pretrained(cfg):
        return f"{spec.n_sequences} sequences, seed {spec.seed}"
    return (f"{spec.n_sequences} windows x {spec.seq_len} tokens from window "
            f"{spec.get('offset', 0)} of corpus {cfg.corpus.path}")
