"""The attention edges the unmodified model allows (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmask.errors import VlmaskError
from vlmask.spec import VISION_ATTENTION


def allowed_edges(
    seq_len: int, vision_ranges: Sequence[tuple[int, int]] = (), vision_attention: str = "native"
) -> torch.Tensor:
    """Boolean ``(seq_len, seq_len)`` of the edges the model itself allows (True = may attend).

    ``native`` is Qwen3-VL's own behaviour: causal over every token, image tokens
    included. ``bidirectional`` (not native; the old prototype's variant) also lets
    the tokens of each vision range ``[start, end)`` attend to each other.

    Example:
        >>> allowed_edges(3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        >>> allowed_edges(3, [(0, 2)], "bidirectional").int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    if vision_attention not in VISION_ATTENTION:
        raise VlmaskError(f"vision attention {vision_attention!r} is not known: expected one of {VISION_ATTENTION}")
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    if vision_attention == "bidirectional":
        for start, end in vision_ranges:
            allowed[start:end, start:end] = True
    return allowed
