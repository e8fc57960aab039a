"""The Dyck-3 task: token generators and per-position labels (pure functions).

Each sequence is ``BOS, content (length L), EOS, PAD ...`` in a context of 64, where the
content is drawn from the brackets ``( ) [ ] { }`` (ids 3..8). A bracket's family is
``(id - 3) // 2`` and it is an opener iff ``id - 3`` is even. Every non-PAD position carries
three labels (a per-position classification task, not next-token prediction):

``tok``
    The id of the current token (a 40-way copy task).
``depth``
    The number of unmatched openers after consuming this position, 0..8. BOS is 0 and every
    non-bracket token (EOS) keeps the previous value. Once the prefix is invalid the depth stays
    frozen at its last valid value.
``valid``
    The sticky-invalid flag: 0 until the prefix first becomes invalid, then 1 to the end (EOS
    included). A prefix turns invalid on a closer with an empty stack, a closer whose family
    differs from the top of the stack, or an opener when 8 are already open.

PAD positions get ``IGNORE_INDEX`` (-100, torch cross-entropy's default ``ignore_index``) in all
three label tensors and ``False`` in ``mask``.

Everything here runs every training step, so both the labeller and the generators are
vectorised over the batch (see ``label_tokens`` for the loop-free stack) and all randomness
comes from an explicit ``torch.Generator``: the same seed gives the same batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

PAD, BOS, EOS = 0, 1, 2
FIRST_BRACKET, LAST_BRACKET = 3, 8
N_FAMILIES = 3
VOCAB_SIZE = 40
CONTEXT = 64
MAX_CONTENT = CONTEXT - 2  # room for BOS and EOS
MAX_DEPTH = 8
N_DEPTH_CLASSES = MAX_DEPTH + 1
N_VALID_CLASSES = 2
IGNORE_INDEX = -100

HEADS = ("tok", "depth", "valid")
HEAD_SIZES = {"tok": VOCAB_SIZE, "depth": N_DEPTH_CLASSES, "valid": N_VALID_CLASSES}

# Held-out "long" distribution: the training generator at these content lengths.
LONG_MIN_LEN, LONG_MAX_LEN = 50, 60
# Compositional distribution: depth of the single-family nest.
COMPOSITIONAL_MIN_DEPTH, COMPOSITIONAL_MAX_DEPTH = 3, MAX_DEPTH


@dataclass(frozen=True)
class DyckBatch:
    """Tokens and their three label tensors, all ``[B, T]`` on one device.

    ``tok``, ``depth`` and ``valid`` are long tensors holding ``IGNORE_INDEX`` at PAD positions;
    ``mask`` is True at the scored (non-PAD) positions, BOS and EOS included.
    """

    tokens: torch.Tensor
    tok: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Number of non-PAD tokens per sequence (content length + BOS + EOS), long ``[B]``."""
        return self.mask.sum(dim=1)

    @property
    def labels(self) -> dict[str, torch.Tensor]:
        """The label tensors keyed by head name, in ``HEADS`` order."""
        return {head: getattr(self, head) for head in HEADS}

    def to(self, device: torch.device | str) -> DyckBatch:
        """A copy with every tensor moved to ``device``."""
        return DyckBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.tokens.shape[0]


# ----------------------------------------------------------------------------- labels


def _bracket_parts(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(is_open, is_close, family)`` for a token tensor; family is -1 at non-brackets."""
    is_bracket = (tokens >= FIRST_BRACKET) & (tokens <= LAST_BRACKET)
    offset = (tokens - FIRST_BRACKET).clamp(min=0)
    is_open = is_bracket & (offset % 2 == 0)
    is_close = is_bracket & (offset % 2 == 1)
    family = torch.where(is_bracket, offset // 2, -1)
    return is_open, is_close, family


def _top_of_stack(
    is_open: torch.Tensor, is_close: torch.Tensor, family: torch.Tensor, depth_before: torch.Tensor
) -> torch.Tensor:
    """Family on top of the stack as each closer arrives, or -1 if the stack is empty.

    Why a sort replaces the stack: give every opener the key (depth before it, position) and
    every closer the key (depth after it, position). In a valid prefix the keys of one level
    alternate opener, closer, opener, closer in position order (an opener at level l lifts the
    depth above l, and the next event at level l is the closer that brings it back), so after
    sorting the keys, each closer's predecessor is the opener that it pops: the top of the
    stack. A closer whose predecessor is not an opener of the same level faces an empty stack.

    The answer is exact at every closer up to and including the first position at which the
    prefix becomes invalid; beyond that it is meaningless, and callers only use it to find that
    first failure (or on prefixes that never fail). Values at non-closer positions are -1.

    Args:
        is_open, is_close: bool ``[B, T]`` opener and closer positions.
        family: long ``[B, T]``, the bracket family (0..2) at bracket positions.
        depth_before: long ``[B, T]``, the unconstrained running depth before each position
            (cumulative sum of +1 per opener and -1 per closer over the earlier positions).
    """
    length = is_open.shape[1]
    positions = torch.arange(length, device=is_open.device)
    # Levels lie in [-T, T]; non-brackets get level T + 1 so they sort after every bracket.
    level = torch.where(is_close, depth_before - 1, depth_before)
    level = torch.where(is_open | is_close, level, length + 1)
    key = (level + length) * length + positions  # unique, non-negative
    sorted_key, order = key.sort(dim=1)
    sorted_open = is_open.gather(1, order)
    sorted_family = family.gather(1, order)
    # Shift by one sorted slot: slot i sees slot i - 1 (slot 0 sees nothing).
    previous_key = torch.cat([torch.full_like(sorted_key[:, :1], -1), sorted_key[:, :-1]], dim=1)
    previous_open = torch.cat([torch.zeros_like(sorted_open[:, :1]), sorted_open[:, :-1]], dim=1)
    previous_family = torch.cat([sorted_family[:, :1], sorted_family[:, :-1]], dim=1)
    pops_an_opener = previous_open & (previous_key // length == sorted_key // length)
    sorted_top = torch.where(pops_an_opener, previous_family, -1)
    top = torch.empty_like(sorted_top).scatter_(1, order, sorted_top)
    return torch.where(is_close, top, -1)


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(
            f"tokens must have shape [batch, positions] with both >= 1, got {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor (torch.long), got {tokens.dtype}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= VOCAB_SIZE:
        raise ValueError(
            f"token ids must lie in [0, {VOCAB_SIZE - 1}], got values in [{low}, {high}]"
        )


def label_tokens(tokens: torch.Tensor) -> DyckBatch:
    """Compute the ``tok``, ``depth`` and ``valid`` labels of a batch of token sequences.

    Semantics (exactly those of a step-by-step stack machine, see the module docstring):
    an opener pushes its family unless 8 are already open (failure); a closer pops when the
    top of the stack has its family, and fails on an empty stack or a different family; any
    other token (BOS, EOS, PAD, unused ids) leaves the stack alone. From the first failure on,
    ``valid`` is 1 and ``depth`` keeps the depth just before the failing token.

    Vectorised without a loop over positions: the running depth is a cumulative sum, which
    is the true depth up to the first failure, and the top of the stack comes from
    ``_top_of_stack``; the first failure then freezes both labels.

    Args:
        tokens: integer ``[B, T]`` token ids in ``[0, VOCAB_SIZE)`` (T is normally ``CONTEXT``).

    Returns:
        A ``DyckBatch`` of long tensors (``tokens`` converted to long) and the bool mask of
        non-PAD positions; labels are ``IGNORE_INDEX`` at PAD positions.
    """
    _check_tokens(tokens)
    tokens = tokens.long()
    is_open, is_close, family = _bracket_parts(tokens)
    step = is_open.long() - is_close.long()
    depth_after = step.cumsum(dim=1)
    depth_before = depth_after - step
    top = _top_of_stack(is_open, is_close, family, depth_before)

    # An empty stack also gives top == -1, which never equals a closer's family.
    fails = (is_close & (top != family)) | (is_open & (depth_before >= MAX_DEPTH))
    invalid = fails.long().cummax(dim=1).values.bool()
    # argmax returns the first maximal index, i.e. the first failure (0 when none, masked below).
    first_fail = fails.long().argmax(dim=1, keepdim=True)
    frozen_depth = depth_before.gather(1, first_fail).expand_as(depth_after)
    depth = torch.where(invalid, frozen_depth, depth_after)

    mask = tokens != PAD
    ignore = torch.full_like(tokens, IGNORE_INDEX)
    return DyckBatch(
        tokens=tokens,
        tok=torch.where(mask, tokens, ignore),
        depth=torch.where(mask, depth, ignore),
        valid=torch.where(mask, invalid.long(), ignore),
        mask=mask,
    )


# ----------------------------------------------------------------------------- generators


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n (number of sequences) must be an integer >= 1, got {n!r}")


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(generator).__name__}"
        )


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _frame(content: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Wrap ``[n, 62]`` content into ``[n, 64]`` sequences: BOS, first L tokens, EOS, PAD."""
    n = content.shape[0]
    tokens = torch.full((n, CONTEXT), PAD, dtype=torch.long)
    tokens[:, 0] = BOS
    keep = torch.arange(MAX_CONTENT).unsqueeze(0) < lengths.unsqueeze(1)
    tokens[:, 1 : 1 + MAX_CONTENT] = torch.where(keep, content, PAD)
    # EOS always fits because L <= 62, so BOS + L + EOS <= 64.
    tokens.scatter_(1, (lengths + 1).unsqueeze(1), EOS)
    return tokens


def _walk_transitions() -> torch.Tensor:
    """Next depth of the valid-prefix walk, indexed by ``2 * depth + coin``.

    ``coin`` 1 means "open if allowed": the walk must open at depth 0 and must close at
    MAX_DEPTH whatever the coin says, and otherwise follows it.
    """
    table = torch.empty(2 * (MAX_DEPTH + 1), dtype=torch.long)
    for depth in range(MAX_DEPTH + 1):
        table[2 * depth] = 1 if depth == 0 else depth - 1
        table[2 * depth + 1] = depth - 1 if depth == MAX_DEPTH else depth + 1
    return table


_WALK_NEXT_DEPTH = _walk_transitions()
_WALK_CHUNK = 8  # walk steps per table look-up
_DEPTH_BITS = 4  # bits per packed depth (depths are 0..8)


def _walk_chunk_table() -> torch.Tensor:
    """The next ``_WALK_CHUNK`` depths of the walk, packed, indexed by ``depth * 2**8 + coins``.

    Why: the walk is a 9-state automaton, so its path over 8 steps is a function of the start
    depth and the 8 coins (bit i = coin of step i). Tabulating it cuts the sequential loop
    from 62 look-ups to 8. Entry value: depth after step i in bits ``4i .. 4i + 3``.
    """
    n_patterns = 2**_WALK_CHUNK
    depth = torch.arange(MAX_DEPTH + 1).repeat_interleave(n_patterns)
    coins = torch.arange(n_patterns).repeat(MAX_DEPTH + 1)
    packed = torch.zeros_like(depth)
    for step in range(_WALK_CHUNK):
        depth = _WALK_NEXT_DEPTH[2 * depth + ((coins >> step) & 1)]
        packed |= depth << (_DEPTH_BITS * step)
    return packed


_WALK_CHUNK_PATHS = _walk_chunk_table()


def _walk_depths(coins: torch.Tensor) -> torch.Tensor:
    """Depth after each step of the bounded walk started at depth 0, long ``[n, L]``.

    Args:
        coins: bool ``[n, L]``, True where the walk opens if the depth allows it.
    """
    n, length = coins.shape
    n_chunks = -(-length // _WALK_CHUNK)
    padded = torch.zeros((n, n_chunks * _WALK_CHUNK), dtype=torch.long)
    padded[:, :length] = coins
    weights = 2 ** torch.arange(_WALK_CHUNK)
    patterns = (padded.view(n, n_chunks, _WALK_CHUNK) * weights).sum(dim=2).t().contiguous()
    paths = torch.empty((n_chunks, n), dtype=torch.long)
    last_shift = _DEPTH_BITS * (_WALK_CHUNK - 1)
    depth = torch.zeros(n, dtype=torch.long)
    for chunk in range(n_chunks):
        index = torch.add(patterns[chunk], depth, alpha=2**_WALK_CHUNK)
        torch.index_select(_WALK_CHUNK_PATHS, 0, index, out=paths[chunk])
        depth = paths[chunk] >> last_shift
    shifts = _DEPTH_BITS * torch.arange(_WALK_CHUNK)
    depths = (paths.t().unsqueeze(2) >> shifts) & (2**_DEPTH_BITS - 1)
    return depths.reshape(n, n_chunks * _WALK_CHUNK)[:, :length]


def _valid_walk(coins: torch.Tensor, open_family: torch.Tensor) -> torch.Tensor:
    """Bracket ids of valid prefixes from a bounded stack walk, ``[n, L]``.

    Only the depth path is sequential (``_walk_depths``); which positions open follows from
    it, and each closer then takes the family of the opener it pops (``_top_of_stack``).

    Args:
        coins: bool ``[n, L]``, True where the walk opens if the depth allows it.
        open_family: long ``[n, L]``, the family used at positions that open.
    """
    depth_after = _walk_depths(coins)
    depth_before = torch.cat([torch.zeros_like(depth_after[:, :1]), depth_after[:, :-1]], dim=1)
    is_open = depth_after > depth_before
    top = _top_of_stack(is_open, ~is_open, open_family, depth_before)
    family = torch.where(is_open, open_family, top)
    return FIRST_BRACKET + 2 * family + (~is_open).long()


def generate_training_tokens(
    n: int,
    generator: torch.Generator,
    min_len: int = 2,
    max_len: int = MAX_CONTENT,
    p_valid: float = 0.5,
    p_open: float = 0.55,
) -> torch.Tensor:
    """Sample ``[n, 64]`` training sequences.

    Content length is uniform in ``[min_len, max_len]``. Each sequence independently is, with
    probability ``p_valid``, a valid prefix from a stack walk (open with probability ``p_open``
    when allowed; must open at depth 0 and close at depth 8; a closer matches the top of the
    stack; opener family uniform over the 3; not forced to close at the end), and otherwise
    uniform random brackets (ids 3..8), which may be valid or not.
    """
    _check_count(n)
    _check_generator(generator)
    for name, value in (("min_len", min_len), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 1 <= min_len <= max_len <= MAX_CONTENT:
        raise ValueError(
            f"content lengths must satisfy 1 <= min_len <= max_len <= {MAX_CONTENT} "
            f"(context {CONTEXT} minus BOS and EOS), got min_len={min_len}, max_len={max_len}"
        )
    _check_probability("p_valid", p_valid)
    _check_probability("p_open", p_open)

    # Draw everything up front, in a fixed order, so a seed fixes the whole batch.
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    use_walk = torch.rand(n, generator=generator) < p_valid
    coins = torch.rand((n, MAX_CONTENT), generator=generator) < p_open
    open_family = torch.randint(0, N_FAMILIES, (n, MAX_CONTENT), generator=generator)
    noise = torch.randint(FIRST_BRACKET, LAST_BRACKET + 1, (n, MAX_CONTENT), generator=generator)

    content = torch.where(use_walk.unsqueeze(1), _valid_walk(coins, open_family), noise)
    return _frame(content, lengths)


def generate_long_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """The held-out ``long`` distribution: the training generator at content lengths 50..60."""
    return generate_training_tokens(n, generator, min_len=LONG_MIN_LEN, max_len=LONG_MAX_LEN)


def generate_compositional_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """The held-out ``compositional`` distribution, ``[n, 64]``, every sequence valid.

    Content of length 62 (BOS + 62 + EOS fills the context): k shallow pairs, then a nest of
    depth D (D openers of one random family, then the D matching closers), then 31 - D - k
    shallow pairs, with D uniform in 3..8 and k uniform in [0, 31 - D]. A shallow pair is an
    opener immediately followed by its closer, of a uniformly random family. It tests whether
    deep single-family nesting, rare in training, composes with mixed-family context.
    """
    _check_count(n)
    _check_generator(generator)
    n_pairs = MAX_CONTENT // 2
    nest_depth = torch.randint(
        COMPOSITIONAL_MIN_DEPTH, COMPOSITIONAL_MAX_DEPTH + 1, (n,), generator=generator
    )
    # k uniform in [0, 31 - D]: floor of a uniform on [0, 32 - D) (the top edge has probability 0).
    n_before = (torch.rand(n, generator=generator) * (n_pairs + 1 - nest_depth)).long()
    n_before = torch.minimum(n_before, n_pairs - nest_depth)
    nest_family = torch.randint(0, N_FAMILIES, (n,), generator=generator)
    pair_family = torch.randint(0, N_FAMILIES, (n, n_pairs), generator=generator)

    j = torch.arange(MAX_CONTENT).unsqueeze(0)
    nest_start = (2 * n_before).unsqueeze(1)
    nest_mid = nest_start + nest_depth.unsqueeze(1)
    nest_end = nest_mid + nest_depth.unsqueeze(1)
    in_nest = (j >= nest_start) & (j < nest_end)
    # The nest starts and ends at even offsets, so outside it position parity alone says which
    # half of a shallow pair j is, and j // 2 indexes the pair.
    shallow = FIRST_BRACKET + 2 * pair_family.repeat_interleave(2, dim=1) + j % 2
    nest = FIRST_BRACKET + 2 * nest_family.unsqueeze(1) + (j >= nest_mid).long()
    content = torch.where(in_nest, nest, shallow)
    return _frame(content, torch.full((n,), MAX_CONTENT, dtype=torch.long))


GENERATORS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "train": generate_training_tokens,
    "compositional": generate_compositional_tokens,
    "long": generate_long_tokens,
}


def make_batch(kind: str, n: int, seed: int) -> DyckBatch:
    """A labelled batch of ``n`` sequences from distribution ``kind``, reproducible from ``seed``.

    ``kind`` is one of ``GENERATORS`` ("train", "compositional", "long"); the batch depends only
    on ``(kind, n, seed)`` through its own ``torch.Generator``, never on global RNG state.
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown batch kind {kind!r}; valid kinds are {sorted(GENERATORS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    return label_tokens(GENERATORS[kind](n, generator))
