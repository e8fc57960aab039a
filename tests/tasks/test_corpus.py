"""The text corpus: fixed, disjoint windows; one cached batch per experiment; offline errors."""

from __future__ import annotations

import pytest
import torch

from polymorph.errors import PolymorphError
from polymorph.tasks.corpus import CorpusConfig, cached_corpus_windows, corpus_windows


def test_offline_hub_corpus_fails_with_instructions():
    from polymorph.tasks.corpus import stream_documents

    with pytest.raises(PolymorphError, match="NeelNanda/pile-10k.*corpus.path=json"):
        next(stream_documents(CorpusConfig(path="NeelNanda/pile-10k")))


def test_windows_are_fixed_and_disjoint(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_lm["tokenizer"]))
    corpus = CorpusConfig(path="json", data_files=str(tiny_lm["corpus"]), shuffle_buffer=50)
    a = corpus_windows(tok, corpus, 8, 16, offset=0)
    assert a.shape == (8, 16)
    assert torch.equal(a, corpus_windows(tok, corpus, 8, 16, offset=0))
    both = corpus_windows(tok, corpus, 12, 16, offset=0)
    assert torch.equal(both[4:], corpus_windows(tok, corpus, 8, 16, offset=4))
    assert (a == tok.eos_token_id).any()  # documents are joined by the end-of-text token
    other_seed = CorpusConfig(path="json", data_files=str(tiny_lm["corpus"]), shuffle_buffer=50,
                              seed=1)
    assert not torch.equal(a, corpus_windows(tok, other_seed, 8, 16))
    with pytest.raises(PolymorphError, match="ran out"):
        corpus_windows(tok, corpus, 100_000, 16)


def test_cached_windows_are_built_once_and_shared_by_tokenizer_copies(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_lm["tokenizer"]))
    copy = AutoTokenizer.from_pretrained(str(tiny_lm["root"] / "seed2" / "step143000"))
    corpus = CorpusConfig(path="json", data_files=str(tiny_lm["corpus"]), shuffle_buffer=50)
    a = cached_corpus_windows(tok, corpus, 8, 16, 0, tmp_path)
    b = cached_corpus_windows(copy, corpus, 8, 16, 0, tmp_path)
    assert torch.equal(a, b) and len(list(tmp_path.glob("*.safetensors"))) == 1
