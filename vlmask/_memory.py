"""Choose how many knockouts share a forward pass, from a memory budget."""

from __future__ import annotations

import re
from typing import Any

from vlmask._errors import VlmaskError

MAX_BATCH = 64
UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """Bytes in ``text`` such as ``2GiB``, ``512MB`` or ``1e9``.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in UNITS:
        raise VlmaskError(f"memory size {text!r} is not understood: write e.g. 2GiB, 512MB or 1e9 (bytes)")
    try:
        return int(float(match.group(1)) * UNITS[unit])
    except ValueError:
        raise VlmaskError(f"memory size {text!r} is not understood: write e.g. 2GiB, 512MB or 1e9 (bytes)") from None


def bytes_per_knockout(config: Any, seq_len: int, recomputed: int, reads: int, dtype_bytes: int) -> int:
    """A generous estimate of the memory one knockout row of a batch needs.

    Counts the copied key/value prefix, one layer's activations over the recomputed
    positions, the attention scores and mask, and the float32 logits and readouts kept.
    """
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    kv = 2 * config.num_hidden_layers * seq_len * config.num_key_value_heads * head_dim * dtype_bytes
    activations = recomputed * (8 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes
    scores = config.num_attention_heads * recomputed * seq_len * (4 + dtype_bytes)
    kept = reads * (config.vocab_size + 2 * config.num_hidden_layers * config.hidden_size) * 4 * 2
    return kv + activations + scores + kept


def choose_batch_size(config: Any, seq_len: int, recomputed: int, reads: int, dtype_bytes: int, budget: int) -> int:
    """The largest batch (1-64) whose estimated memory fits in ``budget`` bytes.

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        ...                       num_hidden_layers=8, intermediate_size=1024, vocab_size=1000)
        >>> choose_batch_size(cfg, seq_len=222, recomputed=22, reads=1, dtype_bytes=4, budget=2**30)
        64
    """
    per_row = bytes_per_knockout(config, seq_len, recomputed, reads, dtype_bytes)
    return max(1, min(MAX_BATCH, budget // per_row))


def plan_batches(starts: list[int], seq_len: int, batch_size: int, waste: float = 1.25) -> list[slice]:
    """Cut knockouts, in order, into batches that recompute little they need not.

    A batch recomputes from its earliest start, so a knockout joins the current batch only
    while that costs at most ``waste`` times its own recompute (and the batch has room).

    Example:
        >>> plan_batches([1, 200, 201, 202], seq_len=222, batch_size=8)
        [slice(0, 1, None), slice(1, 4, None)]
    """
    batches: list[slice] = []
    first, lowest = 0, None
    for k, start in enumerate(starts):
        if lowest is not None:
            merged = min(lowest, start)
            fits = k - first < batch_size and seq_len - merged <= waste * (seq_len - start)
            if fits and seq_len - merged <= waste * (seq_len - lowest):
                lowest = merged
                continue
            batches.append(slice(first, k))
            first = k
        lowest = start
    if starts:
        batches.append(slice(first, len(starts)))
    return batches
