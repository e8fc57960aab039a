"""Loading published checkpoints (the PolyPythias, or a researcher's own seeds) with raw weights.

Any causal language model whose architecture TransformerLens converts (GPT-NeoX as in Pythia,
GPT-2, Llama-style, ...) loads the same way. The PolyPythias (``EleutherAI/pythia-70m-seed1``
...) are not in TransformerLens' list of official models, and the documented detour
(``HookedTransformer.from_pretrained_no_processing("EleutherAI/pythia-70m", hf_model=...)``)
reads the *official* model's config from the Hub, so it cannot load a model whose shape differs
(the tiny local stand-ins the tests use). Instead every model is first resolved to a local
folder (a Hugging Face snapshot, or a folder you point at), and TransformerLens' own converters
read that folder: ``convert_hf_model_config`` for the config and ``get_pretrained_state_dict``
for the GPT-NeoX weight conversion. Weights stay raw: no LayerNorm folding, no centring, so the
residual stream is the model's own.

Where a model comes from:

* ``model_id`` is an existing local folder: the model is ``<model_id>/<revision>`` if that
  sub-folder exists, else ``<model_id>`` itself when ``revision`` is null or ``main``;
* otherwise ``model_id`` is a Hub repository: the revision's snapshot is taken from the local
  Hugging Face cache, and downloaded only when it is not there and the Hub is reachable.
  With ``HF_HUB_OFFLINE=1`` (or no network) and nothing cached the error says what to fetch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from polymorph.errors import PolymorphError
from polymorph.files import parse_dtype

log = logging.getLogger(__name__)

# Files a snapshot needs: config, tokenizer and weights (safetensors preferred, .bin as fallback).
_SNAPSHOT_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ResolvedModel:
    """Where one model revision was found: what a run records to be rerun exactly."""

    model_id: str
    revision: str | None
    folder: Path
    source: str  # "local" | "hub-cache" | "hub-download"
    commit: str | None  # the Hub commit of the snapshot (None for a local folder)

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "folder": str(self.folder),
            "source": self.source,
            "commit": self.commit,
        }


def _is_local(model_id: str) -> bool:
    return Path(model_id).expanduser().exists() or model_id.startswith(("/", "./", "../", "~"))


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir())


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def how_to_fetch(model_id: str, revision: str | None) -> str:
    rev = revision or "main"
    return (
        f"fetch it once on a machine with network (python -c \"from huggingface_hub import "
        f"snapshot_download; snapshot_download('{model_id}', revision='{rev}')\", then copy "
        f"~/.cache/huggingface), or point family.model_id at a local folder holding "
        f"<folder>/{rev}/config.json and the weights"
    )


def resolve_model(model_id: str, revision: str | None = None) -> ResolvedModel:
    """Find (or fetch) one model revision as a local folder; a clear error if that is impossible."""
    if _is_local(model_id):
        base = Path(model_id).expanduser()
        candidates = [base / revision] if revision else []
        if revision in (None, "main"):
            candidates.append(base)
        for folder in candidates:
            if (folder / "config.json").is_file() and _has_weights(folder):
                return ResolvedModel(model_id, revision, folder.resolve(), "local", None)
        raise PolymorphError(
            f"model {model_id!r} at revision {revision!r}: no Hugging Face model folder (config.json "
            f"+ weights) at {' or '.join(str(c) for c in candidates)}; local revisions live in "
            f"sub-folders named after the revision (e.g. {base}/step143000/), or pass "
            f"family.revision=main to load {base} itself"
        )
    return _resolve_hub(model_id, revision)


def _resolve_hub(model_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    rev = revision or "main"
    try:  # the cache first: no network, no waiting
        folder = Path(snapshot_download(model_id, revision=rev, allow_patterns=_SNAPSHOT_PATTERNS,
                                        local_files_only=True))
        if _has_weights(folder):
            return ResolvedModel(model_id, rev, folder, "hub-cache", folder.name)
    except Exception as err:  # noqa: BLE001 - not cached (or only partly): try the Hub below
        log.debug("%s@%s not in the Hugging Face cache: %s", model_id, rev, err)
    if offline():
        raise PolymorphError(
            f"model {model_id} at revision {rev} is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE=1 forbids downloading it: {how_to_fetch(model_id, rev)}"
        )
    # Bounded waits: huggingface_hub's own timeouts (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT,
    # 10 s by default) stop an unreachable Hub from hanging the job.
    try:
        log.info("downloading %s@%s from the Hugging Face Hub", model_id, rev)
        folder = Path(snapshot_download(model_id, revision=rev, allow_patterns=_SNAPSHOT_PATTERNS))
        if not _has_weights(folder):  # older revisions ship only pytorch_model.bin
            folder = Path(snapshot_download(model_id, revision=rev,
                                            allow_patterns=_SNAPSHOT_PATTERNS + ["*.bin"]))
    except Exception as err:
        raise PolymorphError(
            f"cannot load model {model_id} at revision {rev} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the id and revision on "
            f"https://huggingface.co/{model_id}, or {how_to_fetch(model_id, rev)}"
        ) from err
    if not _has_weights(folder):
        raise PolymorphError(f"{model_id}@{rev}: the snapshot at {folder} has no weight file")
    return ResolvedModel(model_id, rev, folder, "hub-download", folder.name)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 on a CPU (the analysis compares residual streams in fp32)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return parse_dtype(dtype, "family.dtype")
    except ValueError as err:
        raise PolymorphError(f"{err} (or auto)") from None


# Architectures TransformerLens converts from a Hugging Face config (a few common ones, for the
# error message; transformer_lens.loading_from_pretrained.convert_hf_model_config has them all).
EXAMPLE_ARCHITECTURES = ("GPTNeoXForCausalLM (Pythia)", "GPT2LMHeadModel", "LlamaForCausalLM",
                         "MistralForCausalLM", "Qwen2ForCausalLM", "GPTNeoForCausalLM")


def neutral_path(folder: Path) -> Path:
    """``folder``, or a symlink to it whose path names no model family.

    TransformerLens picks some architectures by *name* ("llama", "gemma" anywhere in the path)
    before reading config.json, and then fails on a local folder; a neutral path makes it read
    the folder's own config."""
    if not any(word in str(folder).lower() for word in ("llama", "gemma")):
        return folder
    import hashlib
    import tempfile

    link = Path(tempfile.gettempdir()) / (
        "polymorph-model-" + hashlib.sha256(str(folder).encode()).hexdigest()[:12])
    if not link.exists():
        try:
            link.symlink_to(folder, target_is_directory=True)
        except FileExistsError:  # another job made it first
            pass
    return link


def convert_config(folder: Path, what: str) -> dict:
    """TransformerLens' config dict for the model in ``folder``: a one-line PolymorphError,
    before any weight is read, if TransformerLens cannot convert its architecture."""
    import json

    from transformer_lens import loading_from_pretrained as loading

    try:
        arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["?"])[0]
    except (OSError, ValueError) as err:
        raise PolymorphError(f"{what}: {folder}/config.json is unreadable ({err})") from err
    try:
        return loading.convert_hf_model_config(str(neutral_path(folder)))
    except NotImplementedError:
        raise PolymorphError(
            f"{what}: {folder} holds a {arch} model, which TransformerLens cannot convert; use a "
            f"checkpoint of an architecture it supports (e.g. {', '.join(EXAMPLE_ARCHITECTURES)})"
        ) from None


def load_pretrained(
    model_id: str,
    revision: str | None = "step143000",
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | None = None,
):
    """A HookedTransformer with the raw (unprocessed) weights of ``model_id`` at ``revision``.

    ``tokenizer``: where to read the tokenizer from (default: the model's own folder). The
    returned model carries ``model.polymorph_source`` (a :class:`ResolvedModel`) for run records.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(str(model_id), None if revision is None else str(revision))
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    cfg_dict = convert_config(resolved.folder, f"{model_id}@{revision}")
    folder = str(neutral_path(resolved.folder))
    tok_source = folder if tokenizer is None else _tokenizer_folder(tokenizer)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(tok_source)
    except Exception as err:
        raise PolymorphError(
            f"{model_id}@{revision}: cannot read the model or tokenizer in {folder} "
            f"({type(err).__name__}: {err}); delete that folder to fetch it again"
        ) from err
    cfg_dict.update(
        model_name=f"{model_id}@{revision}",
        init_weights=False,
        device=str(dev),
        n_devices=1,
        dtype=torch_dtype,
        from_checkpoint=False,
    )
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=torch_dtype)
    del hf_model
    model = HookedTransformer(cfg, tok, move_to_device=False)
    # Raw weights, as the residual stream is what polymorph compares across seeds.
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.to(dev)
    model.eval()
    model.polymorph_source = resolved
    return model


def _tokenizer_folder(tokenizer: str) -> str:
    if _is_local(tokenizer):
        return str(Path(tokenizer).expanduser())
    return str(resolve_model(tokenizer, "main").folder)
