"""Tests for the Dyck-3 task: the vectorised labeller against a plain stack machine, and the
generators against the distributions that METHOD.md specifies."""

from __future__ import annotations

import math

import pytest
import torch

from polymorph.tasks import dyck
from polymorph.tasks.dyck import (
    BOS,
    CONTEXT,
    EOS,
    HEAD_SIZES,
    HEADS,
    IGNORE_INDEX,
    MAX_DEPTH,
    PAD,
    VOCAB_SIZE,
    DyckBatch,
    generate_compositional_tokens,
    generate_long_tokens,
    generate_training_tokens,
    label_tokens,
    make_batch,
)

N_COMPARE = 2000  # sequences per distribution compared against the reference labeller
OPEN = {"(": 3, "[": 5, "{": 7}
CLOSE = {")": 4, "]": 6, "}": 8}
IDS = {**OPEN, **CLOSE}


# ----------------------------------------------------------------------------- reference


def reference_labels(row: list[int]) -> tuple[list[int], list[int], str | None]:
    """Step-by-step stack machine, written independently of the vectorised code.

    Returns per-position depth and valid labels (-100 at PAD) and the reason of the first
    failure ("empty", "mismatch", "overflow") or None if the sequence stays valid.
    """
    stack: list[int] = []
    failure: str | None = None
    depths, valids = [], []
    for token in row:
        if token == PAD:
            depths.append(-100)
            valids.append(-100)
            continue
        if failure is None and 3 <= token <= 8:
            family, is_opener = (token - 3) // 2, (token - 3) % 2 == 0
            if is_opener and len(stack) == 8:
                failure = "overflow"
            elif is_opener:
                stack.append(family)
            elif not stack:
                failure = "empty"
            elif stack[-1] != family:
                failure = "mismatch"
            else:
                stack.pop()
        depths.append(len(stack))
        valids.append(0 if failure is None else 1)
    return depths, valids, failure


def frame(content: str | list[int]) -> torch.Tensor:
    """One [1, 64] sequence: BOS, content, EOS, PAD (content given as brackets or ids)."""
    ids = [IDS[c] for c in content.replace(" ", "")] if isinstance(content, str) else content
    row = [BOS, *ids, EOS]
    return torch.tensor([row + [PAD] * (CONTEXT - len(row))])


def content_labels(content: str) -> tuple[list[int], list[int]]:
    """Depth and valid labels of the content positions only."""
    batch = label_tokens(frame(content))
    length = len(content.replace(" ", ""))
    return batch.depth[0, 1 : 1 + length].tolist(), batch.valid[0, 1 : 1 + length].tolist()


def assert_matches_reference(tokens: torch.Tensor) -> list[str | None]:
    """Compare label_tokens with the reference on every row; return the failure reasons."""
    batch = label_tokens(tokens)
    reasons = []
    for i, row in enumerate(tokens.tolist()):
        depths, valids, failure = reference_labels(row)
        assert batch.depth[i].tolist() == depths, f"depth differs on row {i}: {row}"
        assert batch.valid[i].tolist() == valids, f"valid differs on row {i}: {row}"
        reasons.append(failure)
    expected_tok = torch.where(tokens == PAD, IGNORE_INDEX, tokens)
    assert torch.equal(batch.tok, expected_tok)
    assert torch.equal(batch.mask, tokens != PAD)
    return reasons


def uniform_bracket_strings(n: int, generator: torch.Generator, p_opener: float) -> torch.Tensor:
    """Framed strings of random length 1..62 with random families; openers with p_opener."""
    lengths = torch.randint(1, CONTEXT - 1, (n,), generator=generator)
    opener = torch.rand((n, CONTEXT - 2), generator=generator) < p_opener
    family = torch.randint(0, 3, (n, CONTEXT - 2), generator=generator)
    content = 3 + 2 * family + (~opener).long()
    tokens = torch.full((n, CONTEXT), PAD)
    tokens[:, 0] = BOS
    for i, length in enumerate(lengths.tolist()):
        tokens[i, 1 : 1 + length] = content[i, :length]
        tokens[i, 1 + length] = EOS
    return tokens


def make_batch_from(fn, **kwargs) -> DyckBatch:
    """200 labelled sequences from generator ``fn`` with extra keyword arguments."""
    return label_tokens(fn(200, torch.Generator().manual_seed(8), **kwargs))


@pytest.fixture(scope="module")
def train_tokens() -> torch.Tensor:
    return generate_training_tokens(4000, torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def long_tokens() -> torch.Tensor:
    return generate_long_tokens(N_COMPARE, torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def compositional_tokens() -> torch.Tensor:
    return generate_compositional_tokens(N_COMPARE, torch.Generator().manual_seed(13))


@pytest.fixture(scope="module")
def walk_tokens() -> torch.Tensor:
    """Training generator restricted to its valid-prefix branch."""
    return generate_training_tokens(N_COMPARE, torch.Generator().manual_seed(14), p_valid=1.0)


def content_lengths(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens != PAD).sum(dim=1) - 2


# ----------------------------------------------------------------------------- constants


def test_head_sizes_match_vocabulary_and_depth_range():
    assert HEADS == ("tok", "depth", "valid")
    assert HEAD_SIZES == {"tok": VOCAB_SIZE, "depth": MAX_DEPTH + 1, "valid": 2}
    assert (dyck.N_DEPTH_CLASSES, dyck.N_VALID_CLASSES) == (9, 2)
    assert (PAD, BOS, EOS, VOCAB_SIZE, CONTEXT) == (0, 1, 2, 40, 64)


# ----------------------------------------------------------------------------- reference agreement


def test_labels_match_reference_on_training_batches(train_tokens):
    reasons = assert_matches_reference(train_tokens[:N_COMPARE])
    # The random half must exercise the failure paths, or the comparison proves little.
    assert {"empty", "mismatch"} <= set(reasons)


def test_labels_match_reference_on_long_and_compositional(long_tokens, compositional_tokens):
    assert_matches_reference(long_tokens)
    assert set(assert_matches_reference(compositional_tokens)) == {None}


def test_labels_match_reference_on_uniform_bracket_strings():
    generator = torch.Generator().manual_seed(21)
    reasons = assert_matches_reference(uniform_bracket_strings(N_COMPARE, generator, 0.5))
    assert {"empty", "mismatch"} <= set(reasons)


def test_labels_match_reference_on_opener_heavy_strings():
    # Mostly openers, so the depth-8 overflow and long valid stretches are common.
    generator = torch.Generator().manual_seed(22)
    reasons = assert_matches_reference(uniform_bracket_strings(N_COMPARE, generator, 0.8))
    assert reasons.count("overflow") > 100
    # Single-family strings: mismatch is impossible, so failures are overflow or empty only.
    tokens = uniform_bracket_strings(N_COMPARE, generator, 0.6)
    brackets = (tokens >= 3) & (tokens <= 8)
    tokens = torch.where(brackets, 3 + (tokens - 3) % 2, tokens)
    assert set(assert_matches_reference(tokens)) <= {None, "empty", "overflow"}


def test_labels_match_reference_on_arbitrary_token_ids():
    # The labeller treats every non-bracket id (BOS, EOS, PAD, unused ids) as a no-op, anywhere.
    generator = torch.Generator().manual_seed(23)
    tokens = torch.randint(0, 12, (500, CONTEXT), generator=generator)
    assert_matches_reference(tokens)


# ----------------------------------------------------------------------------- edge cases


def test_closer_on_empty_stack_is_invalid_from_the_start():
    assert content_labels(")") == ([0], [1])
    # A later, otherwise balanced, continuation does not reset the flag or move the depth.
    assert content_labels(") ( )") == ([0, 0, 0], [1, 1, 1])
    assert content_labels("( ) )") == ([1, 0, 0], [0, 0, 1])


def test_family_mismatch_is_invalid():
    assert content_labels("( ]") == ([1, 1], [0, 1])
    assert content_labels("( [ ) ]") == ([1, 2, 2, 2], [0, 0, 1, 1])
    assert content_labels("{ [ ] }") == ([1, 2, 1, 0], [0, 0, 0, 0])


def test_opener_at_depth_eight_is_invalid():
    assert content_labels("(" * 8) == (list(range(1, 9)), [0] * 8)
    assert content_labels("(" * 9) == ([*range(1, 9), 8], [0] * 8 + [1])
    # Eight open, one closed, one more opener is fine again.
    assert content_labels("[" * 8 + "]" + "{") == ([*range(1, 9), 7, 8], [0] * 10)


def test_sticky_flag_and_frozen_depth_after_failure():
    assert content_labels("( ] ( (") == ([1, 1, 1, 1], [0, 1, 1, 1])
    depth, valid = content_labels("( [ { ) } ] )")
    assert depth == [1, 2, 3, 3, 3, 3, 3]
    assert valid == [0, 0, 0, 1, 1, 1, 1]


def test_bos_eos_and_pad_labels():
    batch = label_tokens(frame("( [ ] ( ("))
    assert (batch.tok[0, 0], batch.depth[0, 0], batch.valid[0, 0]) == (BOS, 0, 0)
    eos = 6
    assert batch.tokens[0, eos] == EOS
    # EOS keeps the depth of the previous position and is scored.
    assert (batch.tok[0, eos], batch.depth[0, eos], batch.valid[0, eos]) == (EOS, 3, 0)
    assert batch.mask[0, : eos + 1].all() and not batch.mask[0, eos + 1 :].any()
    for head in HEADS:
        assert (getattr(batch, head)[0, eos + 1 :] == IGNORE_INDEX).all()
    assert batch.lengths.tolist() == [eos + 1]
    # EOS after a failure carries the sticky flag and the frozen depth.
    failed = label_tokens(frame("( ( ) ]"))
    assert (failed.depth[0, 5], failed.valid[0, 5]) == (1, 1)


def test_full_context_sequence_has_eos_at_the_last_index():
    batch = label_tokens(frame("()" * 31))
    assert batch.tokens[0, CONTEXT - 1] == EOS
    assert batch.mask.all()
    assert batch.lengths.tolist() == [CONTEXT]
    assert batch.valid[0].max() == 0 and batch.depth[0, -1] == 0


def test_generated_sequences_are_framed(train_tokens, long_tokens, compositional_tokens):
    for tokens in (train_tokens, long_tokens, compositional_tokens):
        assert tokens.shape[1] == CONTEXT and tokens.dtype == torch.long
        length = content_lengths(tokens)
        positions = torch.arange(CONTEXT).unsqueeze(0)
        content = (positions >= 1) & (positions <= length.unsqueeze(1))
        assert (tokens[:, 0] == BOS).all()
        assert torch.equal(tokens == EOS, positions == (length + 1).unsqueeze(1))
        assert torch.equal(tokens == PAD, positions > (length + 1).unsqueeze(1))
        assert ((tokens >= 3) & (tokens <= 8)).eq(content).all()


def test_label_tokens_output_types_and_device_move():
    batch = make_batch("train", 8, seed=0)
    for tensor in (batch.tokens, batch.tok, batch.depth, batch.valid):
        assert tensor.dtype == torch.long and tensor.shape == (8, CONTEXT)
    assert batch.mask.dtype == torch.bool and batch.lengths.dtype == torch.long
    assert len(batch) == 8
    assert list(batch.labels) == list(HEADS)
    moved = batch.to("cpu")
    assert isinstance(moved, DyckBatch) and torch.equal(moved.depth, batch.depth)
    with pytest.raises(AttributeError):
        batch.tokens = batch.tok  # frozen


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("kind", ["train", "compositional", "long"])
def test_same_seed_same_batch_and_different_seed_different_batch(kind):
    first, again, other = make_batch(kind, 64, 5), make_batch(kind, 64, 5), make_batch(kind, 64, 6)
    for head in ("tokens", *HEADS, "mask"):
        assert torch.equal(getattr(first, head), getattr(again, head))
    assert not torch.equal(first.tokens, other.tokens)


def test_generators_use_only_their_own_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_training_tokens(16, torch.Generator().manual_seed(0))
    generate_compositional_tokens(16, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)
    one = generate_training_tokens(16, torch.Generator().manual_seed(3))
    two = generate_training_tokens(16, torch.Generator().manual_seed(3))
    assert torch.equal(one, two)


# ----------------------------------------------------------------------------- distributions


def test_training_lengths_cover_the_full_range(train_tokens):
    lengths = content_lengths(train_tokens)
    assert set(lengths.tolist()) == set(range(2, 63))


def test_long_lengths_cover_50_to_60(long_tokens):
    assert set(content_lengths(long_tokens).tolist()) == set(range(50, 61))


def test_custom_length_bounds_are_respected():
    tokens = generate_training_tokens(300, torch.Generator().manual_seed(1), min_len=7, max_len=9)
    assert set(content_lengths(tokens).tolist()) == {7, 8, 9}
    single = generate_training_tokens(20, torch.Generator().manual_seed(1), min_len=1, max_len=1)
    assert (content_lengths(single) == 1).all()


def test_valid_fraction_is_near_p_valid(train_tokens):
    n = train_tokens.shape[0]
    batch = label_tokens(train_tokens)
    still_valid = (batch.valid.masked_fill(~batch.mask, 0).amax(dim=1) == 0).float().mean()
    # Random bracket strings are occasionally valid too: measure that rate independently.
    noise = label_tokens(
        generate_training_tokens(n, torch.Generator().manual_seed(99), p_valid=0.0)
    )
    noise_valid = (noise.valid.masked_fill(~noise.mask, 0).amax(dim=1) == 0).float().mean()
    assert noise_valid < 0.1
    expected = 0.5 + 0.5 * noise_valid
    assert abs(float(still_valid) - float(expected)) < 4 * math.sqrt(0.25 / n)


def test_valid_prefixes_stay_within_depth_eight_and_reach_it(walk_tokens):
    reasons = assert_matches_reference(walk_tokens)
    assert set(reasons) == {None}
    depth = label_tokens(walk_tokens).depth
    assert depth.max() == MAX_DEPTH
    # Not forced to close: many prefixes end with open brackets.
    assert (
        depth.gather(1, (content_lengths(walk_tokens) + 1).unsqueeze(1)) > 0
    ).float().mean() > 0.5


def test_walk_extremes_follow_the_forced_moves():
    always = make_batch_from(generate_training_tokens, p_valid=1.0, p_open=1.0, min_len=62)
    # Opens up to depth 8, then must close, then opens again: 1..8, 7, 8, 7, ...
    expected = [*range(1, 9)] + [7, 8] * 27
    assert (always.depth[:, 1:63] == torch.tensor(expected)).all()
    never = make_batch_from(generate_training_tokens, p_valid=1.0, p_open=0.0, min_len=62)
    assert (never.depth[:, 1:63] == torch.tensor([1, 0] * 31)).all()
    assert (always.valid.masked_fill(~always.mask, 0) == 0).all()
    assert (never.valid.masked_fill(~never.mask, 0) == 0).all()


def test_tabulated_walk_matches_a_step_by_step_walk():
    generator = torch.Generator().manual_seed(31)
    for length in (1, 7, 8, 9, 62):
        coins = torch.rand((300, length), generator=generator) < 0.6
        expected = []
        for row in coins.tolist():
            depth, path = 0, []
            for coin in row:
                opens = depth == 0 or (depth < MAX_DEPTH and coin)
                depth += 1 if opens else -1
                path.append(depth)
            expected.append(path)
        assert dyck._walk_depths(coins).tolist() == expected


def test_family_and_token_frequencies_are_uniform(walk_tokens):
    openers = walk_tokens[(walk_tokens >= 3) & (walk_tokens <= 8) & (walk_tokens % 2 == 1)]
    shares = torch.bincount((openers - 3) // 2, minlength=3).float() / openers.numel()
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.02)
    noise = generate_training_tokens(2000, torch.Generator().manual_seed(4), p_valid=0.0)
    brackets = noise[(noise >= 3) & (noise <= 8)]
    shares = torch.bincount(brackets - 3, minlength=6).float() / brackets.numel()
    assert torch.allclose(shares, torch.full((6,), 1 / 6), atol=0.01)


def test_walk_open_probability_sets_the_opener_share():
    # Away from the forced boundaries the walk opens with probability p_open.
    for p_open in (0.3, 0.55):
        batch = make_batch_from(generate_training_tokens, p_valid=1.0, p_open=p_open)
        before = batch.depth[:, :-2]
        token = batch.tokens[:, 1:-1]
        free = (before >= 1) & (before <= MAX_DEPTH - 1) & (token >= 3) & (token <= 8)
        opened = (token % 2 == 1)[free].float().mean()
        assert abs(float(opened) - p_open) < 0.03


def test_compositional_structure(compositional_tokens):
    batch = label_tokens(compositional_tokens)
    assert (content_lengths(compositional_tokens) == 62).all()
    assert (batch.valid[batch.mask] == 0).all()
    max_depth = batch.depth.amax(dim=1)
    assert set(max_depth.tolist()) == set(range(3, 9))
    starts = {}
    for row, deepest in zip(compositional_tokens.tolist(), max_depth.tolist()):
        stack: list[int] = []
        families_at_max: set[int] | None = None
        for token in row[1:63]:
            if token % 2 == 1:
                stack.append((token - 3) // 2)
            else:
                stack.pop()
            if len(stack) == deepest:
                families_at_max = set(stack)
        assert families_at_max is not None and len(families_at_max) == 1
        # One nest: the positions deeper than 1 form a single block of length 2D - 3.
        deep = [i for i, d in enumerate(reference_labels(row)[0]) if d >= 2]
        assert deep == list(range(deep[0], deep[0] + 2 * deepest - 3))
        n_before = (deep[0] - 2) // 2  # nest opens at content index 2k (token index 2k + 1)
        assert 0 <= n_before <= 31 - deepest
        starts.setdefault(deepest, set()).add(n_before)
    # k is uniform over [0, 31 - D]: both ends occur for the deepest nests.
    assert {0, 31 - 8} <= starts[8]
    # Shallow pairs (at least 23 per sequence) mix the families within every sequence, and each
    # family is equally likely.
    shallow = (batch.depth == 1) & (compositional_tokens % 2 == 1)
    shallow[:, :-1] &= compositional_tokens[:, 1:] == compositional_tokens[:, :-1] + 1
    for row, is_shallow in zip(compositional_tokens, shallow):
        assert len(set(row[is_shallow].tolist())) >= 2
    shares = torch.bincount((compositional_tokens[shallow] - 3) // 2, minlength=3).float()
    assert torch.allclose(shares / shares.sum(), torch.full((3,), 1 / 3), atol=0.02)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n "),
        ({"min_len": 0}, "min_len"),
        ({"max_len": 63}, "max_len"),
        ({"min_len": 10, "max_len": 9}, "min_len"),
        ({"p_valid": 1.5}, "p_valid"),
        ({"p_open": -0.1}, "p_open"),
    ],
)
def test_training_generator_rejects_bad_arguments(kwargs, message):
    arguments = {"n": 4, "generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_training_tokens(**arguments)


def test_other_entry_points_reject_bad_arguments():
    with pytest.raises(ValueError, match="n "):
        generate_compositional_tokens(0, torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        generate_long_tokens(4, 0)
    with pytest.raises(ValueError, match="compositional.*long.*train"):
        make_batch("validation", 4, 0)
    with pytest.raises(ValueError, match=r"\[0, 39\]"):
        label_tokens(torch.full((1, CONTEXT), VOCAB_SIZE))
    with pytest.raises(ValueError, match="shape"):
        label_tokens(torch.ones(CONTEXT, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        label_tokens(torch.ones(1, CONTEXT))
