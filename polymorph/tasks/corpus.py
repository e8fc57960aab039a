"""A fixed batch of text tokens for a pretrained language model, the same for every seed.

Documents are streamed from a Hugging Face ``datasets`` corpus (never downloaded whole),
shuffled with a fixed seed in a bounded buffer, tokenised without special tokens, joined with the
end-of-text token between documents (as the Pile was packed for Pythia) and cut into windows of
``seq_len`` tokens. Window ``i`` of the stream is always the same tokens for a given corpus
config, so disjoint slices (``offset``) give the SAE-training batch, the rotation-fit batch and
the held-out scoring batch without overlap.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from polymorph.errors import PolymorphError

log = logging.getLogger(__name__)

# Identity of a corpus: the keys that change which tokens come out.
CORPUS_KEYS = ("path", "name", "data_files", "split", "text_field", "seed", "shuffle_buffer")


@dataclass(frozen=True)
class CorpusConfig:
    path: str                     # a datasets id (e.g. NeelNanda/pile-10k) or a builder (json, text)
    name: str | None = None       # dataset config name
    data_files: str | list | None = None  # for local files: path(s) given to the json/text builder
    split: str = "train"
    text_field: str = "text"
    seed: int = 0                 # shuffle seed: the corpus seed of docs/method.md
    shuffle_buffer: int = 10_000  # documents held for the streaming shuffle; 0: stream order

    @classmethod
    def from_dict(cls, mapping: Mapping) -> CorpusConfig:
        data = dict(mapping)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PolymorphError(f"corpus config has unknown keys {sorted(unknown)}; known: "
                                 f"{sorted(cls.__dataclass_fields__)}")
        if isinstance(data.get("data_files"), (list, tuple)):
            data["data_files"] = [str(p) for p in data["data_files"]]
        return cls(**data)

    def fingerprint(self, tokenizer_name: str, seq_len: int) -> str:
        blob = json.dumps({**asdict(self), "tokenizer": tokenizer_name, "seq_len": seq_len},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stream_documents(corpus: CorpusConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(
            corpus.path, corpus.name, data_files=corpus.data_files, split=corpus.split,
            streaming=True,
        )
    except Exception as err:
        raise PolymorphError(
            f"cannot open the corpus {corpus.path!r} (name={corpus.name}, split={corpus.split}, "
            f"data_files={corpus.data_files}): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. Streaming a Hub dataset needs the "
            f"network; offline, point the corpus at local files, e.g. corpus.path=json "
            f"corpus.data_files=/data/pile_sample.jsonl (or corpus.path=text for plain .txt)"
        ) from err
    if corpus.shuffle_buffer > 0:
        ds = ds.shuffle(seed=corpus.seed, buffer_size=corpus.shuffle_buffer)
    try:
        for row in ds:
            if corpus.text_field not in row:
                raise PolymorphError(f"corpus rows have no field {corpus.text_field!r} (fields: "
                                     f"{sorted(row)}); set corpus.text_field")
            text = row[corpus.text_field]
            if text:
                yield text
    except PolymorphError:
        raise
    except Exception as err:
        raise PolymorphError(
            f"reading the corpus {corpus.path!r} failed ({type(err).__name__}: {err}); with no "
            f"network use local files (corpus.path=json corpus.data_files=...)"
        ) from err


def corpus_windows(
    tokenizer, corpus: CorpusConfig, n_sequences: int, seq_len: int, offset: int = 0
) -> torch.Tensor:
    """Windows ``offset .. offset + n_sequences - 1`` of the packed token stream: [n, seq_len]."""
    if n_sequences < 1 or seq_len < 2 or offset < 0:
        raise PolymorphError(f"need n_sequences >= 1, seq_len >= 2, offset >= 0 (got "
                             f"{n_sequences}, {seq_len}, {offset})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PolymorphError("the tokenizer has no end-of-text token to separate documents")
    wanted = (offset + n_sequences) * seq_len
    buffer: list[int] = []
    for text in stream_documents(corpus):
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        if len(buffer) >= wanted:
            break
    if len(buffer) < wanted:
        raise PolymorphError(
            f"the corpus {corpus.path!r} ran out after {len(buffer) // seq_len} windows of "
            f"{seq_len} tokens; {offset + n_sequences} are needed (offset {offset} + "
            f"{n_sequences}): use a larger corpus or fewer/shorter sequences"
        )
    flat = torch.tensor(buffer[offset * seq_len : wanted], dtype=torch.long)
    return flat.view(n_sequences, seq_len)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by its vocabulary, not its folder: every PolyPythia seed has its
    own copy of one tokenizer, and all must share one cached corpus batch."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id]).encode()
    return f"{type(tokenizer).__name__}-{hashlib.sha256(blob).hexdigest()[:12]}"


def cached_corpus_windows(tokenizer, corpus: CorpusConfig, n_sequences: int, seq_len: int,
                          offset: int, cache_dir: Path) -> torch.Tensor:
    """:func:`corpus_windows`, tokenised once per experiment and cached in ``cache_dir`` (keyed
    on the corpus, the tokenizer's vocabulary and the slice), so every seed and every later
    analysis sees the identical tokens without streaming the corpus again."""
    from safetensors.torch import load_file

    from polymorph.files import save_tensors
    from polymorph.locks import file_lock

    tok_name = tokenizer_fingerprint(tokenizer)
    key = f"{corpus.fingerprint(tok_name, seq_len)}-offset{offset}-n{n_sequences}"
    path = Path(cache_dir) / f"{key}.safetensors"
    with file_lock(Path(cache_dir) / f"{key}.lock"):
        if path.is_file():
            try:
                return load_file(str(path))["tokens"]
            except Exception as err:  # noqa: BLE001 - a corrupt cache is rebuilt
                log.warning("corpus cache %s unreadable (%s): rebuilding it", path, err)
        log.info("tokenising corpus %s: %d windows of %d tokens from window %d", corpus.path,
                 n_sequences, seq_len, offset)
        tokens = corpus_windows(tokenizer, corpus, n_sequences, seq_len, offset)
        meta = {k: str(v) for k, v in asdict(corpus).items()}
        meta.update(tokenizer=tok_name, seq_len=str(seq_len), offset=str(offset),
                    n_sequences=str(n_sequences))
        save_tensors(path, {"tokens": tokens}, meta)
    return tokens
