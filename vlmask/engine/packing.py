"""Choose which knockouts share a packed forward pass, from a memory budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MIN_PACKED = 1024


def packed_cap(seq_len: int) -> int:
    """The most positions one packed pass recomputes: twice the sequence, and at least 1,024.

    Passes this large keep per-pass costs small against the linear layers'. With one attention call
    over the whole pack (``VLMASK_PACKED_ATTENTION=dense``) its waste grew with the packed length:
    222- and 512-token sequences were fastest at 1,024 on CPU, and ~2x slower at 4,096 for the
    former. With per-knockout segments the cap matters less, but larger is still not faster
    (S2 of the benchmark, 196 knockouts over 222 tokens, 2 CPU threads: 6.1 s at 1,024, 6.2 s at
    2,048, 6.8 s at 4,096 and 8,192).

    Example:
        >>> packed_cap(222), packed_cap(2000)
        (1024, 4000)
    """
    return max(MIN_PACKED, 2 * seq_len)


def pass_bytes(config: Any, seq_len: int, positions: int, rows: int, reads: int, dtype_bytes: int) -> int:
    """A generous estimate of the memory of one packed decoder pass.

    ``positions`` recomputed positions (all rows together) attend to ``seq_len`` cached keys
    plus themselves. Counts one layer's activations, the attention scores and masks, the
    cache the pass appends to, and the float32 logits and readouts kept for ``rows`` rows.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = seq_len + positions
    activations = positions * (8 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes
    scores = config.num_attention_heads * positions * keys * (4 + dtype_bytes)
    masks = 2 * positions * keys * dtype_bytes
    cache = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * keys * dtype_bytes
    kept = rows * reads * (config.vocab_size + 2 * config.num_hidden_layers * config.hidden_size) * 4 * 2
    return activations + scores + masks + cache + kept


def plan_batches(
    starts: list[int], seq_len: int, batch_size: int | None, fits: Callable[[int, int], bool]
) -> list[slice]:
    """Cut knockouts, in order, into packed passes.

    A knockout starting at ``start`` recomputes ``seq_len - start`` positions; a pass takes
    knockouts while there are at most ``batch_size`` (None: no limit) and ``fits(positions,
    rows)`` says their memory fits. A knockout that does not fit alone still gets a pass.

    Example:
        >>> plan_batches([1, 200, 201, 202], seq_len=222, batch_size=None, fits=lambda p, r: p <= 230)
        [slice(0, 1, None), slice(1, 4, None)]
    """
    batches: list[slice] = []
    first, positions = 0, 0
    for k, start in enumerate(starts):
        more = seq_len - start
        full = batch_size is not None and k - first >= batch_size
        if k > first and (full or not fits(positions + more, k - first + 1)):
            batches.append(slice(first, k))
            first, positions = k, 0
        positions += more
    if starts:
        batches.append(slice(first, len(starts)))
    return batches
