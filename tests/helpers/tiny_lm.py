"""Tiny local language models, built so the pretrained family is tested offline.

* a word-level tokenizer (Hugging Face ``tokenizers``) whose id 0 is ``<|endoftext|>``, as in Pythia;
* models of two architectures at toy width, one folder per (seed, revision), saved with
  ``save_pretrained`` exactly as a Hugging Face snapshot would be laid out: GPT-NeoX with
  Pythia's layout (parallel attention, rotary on a quarter of each head, LayerNorm, GELU), and
  GPT-2 (sequential attention then MLP, learned positions);
* a small JSON-lines text corpus readable by ``datasets.load_dataset("json", ...)``.

The same loading code as for real checkpoints reads these folders (``family.model_id`` pointing
at a local folder instead of a Hub id), so nothing here touches the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "the", "a", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "cat", "dog", "bird", "fish", "tree", "river", "mountain", "city", "house", "road",
    "happy", "sad", "good", "bad", "great", "terrible", "love", "hate", "red", "green",
    "blue", "alice", "bob", "carol", "dave", "eve", "paris", "london", "rome", "tokyo",
    "runs", "walks", "sees", "eats", "sleeps", "is", "was", "and", "or", "but", "because",
    "very", "not", "big", "small", "old", "new", "quickly", "slowly", "number", "name",
    "colour",
]
EOS = "<|endoftext|>"
UNK = "<unk>"


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """JSON lines {"text": ...}: random sentences over WORDS, 5..60 words per document."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n_docs):
            n = rng.randint(5, 60)
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    return path


def build_tokenizer(folder: Path):
    """A word-level fast tokenizer over WORDS; id 0 is the end-of-text token, as in Pythia."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, UNK: 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=UNK, pad_token=EOS
    )
    fast.save_pretrained(str(folder))
    return fast


def build_model(folder: Path, seed: int, tokenizer, d_model: int = 32, n_layers: int = 2,
                architecture: str = "gpt_neox") -> Path:
    """A randomly initialised GPT-NeoX (Pythia's architecture) or GPT-2, saved as a Hugging Face
    folder."""
    import torch

    if architecture == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(tokenizer), n_embd=d_model, n_layer=n_layers,
                            n_head=4, n_positions=128, n_ctx=128, bos_token_id=0,
                            eos_token_id=0)  # n_ctx: as in the published GPT-2 configs
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        return folder
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=4 * d_model,
        max_position_embeddings=128,
        rotary_pct=0.25,
        use_parallel_residual=True,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def build_tiny_lms(
    root: Path, seeds=(1, 2), revisions=("step143000",), drift_revisions=("step0", "step1000"),
    architecture: str = "gpt_neox",
) -> dict:
    """``root/seed<N>/<revision>/`` for every seed and revision, plus a corpus.

    Revisions of one seed are independent random draws here (the tests need folders that load,
    not a training trajectory). ``drift_revisions`` are added for every seed, so drift and
    convergence both have checkpoints to follow.
    """
    tok_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tok_dir)
    for seed in seeds:
        for j, rev in enumerate(list(revisions) + list(drift_revisions)):
            build_model(root / f"seed{seed}" / rev, 1000 * seed + j, tokenizer,
                        architecture=architecture)
    corpus = write_corpus(root / "corpus" / "train.jsonl")
    sites = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    if architecture == "gpt2":
        sites.insert(1, "blocks.0.hook_resid_mid")
    return {
        "name": f"tiny_{architecture}",
        "architecture": architecture,
        "sites": sites,
        "root": root,
        "model_id_template": str(root / "seed{seed}"),
        "tokenizer": tok_dir,
        "corpus": corpus,
        "seeds": list(seeds),
        "revisions": list(revisions),
        "drift_revisions": list(drift_revisions),
    }
