"""The attention implementations vlmask can intervene on, and the mask format each expects."""

from __future__ import annotations

import torch

from vlmask.errors import VlmaskError
from vlmask.model.names import MASK_FORMATS


def check_attention_implementation(name: str) -> None:
    """Refuse attention implementations whose mask cannot carry a knockout.

    Example:
        >>> check_attention_implementation("flash_attention_2")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: attention implementation 'flash_attention_2' cannot block a key: ...
    """
    if name in MASK_FORMATS:
        return
    why = "it treats the mask as padding only" if "flash" in str(name) else "vlmask has no mask format for it"
    raise VlmaskError(
        f"attention implementation {name!r} cannot block a key: {why}; "
        f"load the model with attn_implementation one of {sorted(MASK_FORMATS)}"
    )


def attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask ``(batch, 1, query, key)`` in the format ``implementation`` expects.

    ``allowed`` is boolean ``(batch, query, key)``, True where the query may attend.

    Example:
        >>> allowed = torch.ones(1, 2, 2, dtype=torch.bool).tril()
        >>> attention_mask(allowed, "sdpa", torch.float32).tolist()
        [[[[True, False], [True, True]]]]
        >>> attention_mask(allowed, "eager", torch.float32)[0, 0, 0, 1].item() == torch.finfo(torch.float32).min
        True
    """
    check_attention_implementation(implementation)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)
