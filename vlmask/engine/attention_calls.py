"""Each decoder layer's attention call during a pass: the pass's mask, packed rows apart, the readout.

For as long as a pass runs, transformers' ``ALL_ATTENTION_FUNCTIONS`` entry of the model's
implementation (``sdpa`` or ``eager``) is swapped for a wrapper (:meth:`AttentionCalls.swapped`).
Every decoder layer's self-attention calls it with its own ``query``, ``key`` and ``value``
(after the model's rotary embedding and any query/key norm); the wrapper calls the model's
own function with the pass's mask for that layer (the edges the interventions left) in place
of the model's causal one, so the backends attach nothing to self-attention and the user's
implementation computes every score. Where the pass reads attention, the
:class:`~vlmask.engine.attention_read.AttentionReader` sees the call first. Other modules'
calls (a vision encoder's) pass through untouched.

A packed pass's mask can be :class:`Segments`: each packed row's queries then attend over
only their own keys (the clean keys before the row's start and the row's recomputed ones),
one call of the model's function per row, instead of one call over every packed position,
most of whose query-key pairs (another row's keys) are masked out. The numbers are the same
up to float rounding; :func:`packed_attention` says which a pass uses.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel

PACKED_ATTENTION = ("segments", "dense")
"""How a packed pass computes attention: each row over its own keys, or one call over the whole pack."""


def packed_attention() -> str:
    """How packed passes compute attention: ``VLMASK_PACKED_ATTENTION`` (``"segments"``, the default, or ``"dense"``).

    ``"dense"`` is the earlier method (one attention call over the whole pack, other rows'
    keys masked out), kept to compare against; results agree to float rounding.

    Example:
        >>> packed_attention()
        'segments'
    """
    name = os.environ.get("VLMASK_PACKED_ATTENTION", "segments")
    if name not in PACKED_ATTENTION:
        raise VlmaskError(f"VLMASK_PACKED_ATTENTION={name!r} is not known: expected one of {list(PACKED_ATTENTION)}")
    return name


@dataclass(frozen=True)
class Segments:
    """A packed pass's attention at one layer, row by row.

    Row ``i``'s queries are the packed positions ``offsets[i]..`` (``masks[i]`` has one query
    row per position); its keys are the first ``firsts[i]`` of the ``cached`` clean keys, then
    its own recomputed keys, which the pass appended after the clean ones at ``cached +
    offsets[i]``. ``masks[i] (1, 1, query, firsts[i] + query)`` is in the implementation's format.

    Example:
        >>> import torch
        >>> mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)  # one query, two keys
        >>> seg = Segments(cached=2, firsts=(1, 1), offsets=(0, 1), masks=(mask, mask))
        >>> q, k = torch.zeros(1, 1, 2, 4), torch.arange(4.0)[None, None, :, None].expand(1, 1, 4, 4)
        >>> sdpa = lambda m, q, k, v, mask, **kw: (torch.nn.functional.scaled_dot_product_attention(
        ...     q, k, v, attn_mask=mask).transpose(1, 2), None)
        >>> seg.attend(sdpa, None, q, k, k)[0][0, :, 0, 0].tolist()  # mean of keys 0, 2 and of 0, 3
        [1.0, 1.5]
    """

    cached: int
    firsts: tuple[int, ...]
    offsets: tuple[int, ...]
    masks: tuple[torch.Tensor, ...]

    @staticmethod
    def of(allowed: torch.Tensor, start: int, starts: Sequence[int], cached: int, convert: Callable) -> Segments:
        """Segments from each row's edges ``allowed (row, seq - start, seq)``; ``convert`` makes a mask of edges."""
        seq, offsets, masks, offset = allowed.shape[-1], [], [], 0
        for row, first in enumerate(starts):
            offsets.append(offset)
            masks.append(convert(allowed[row : row + 1, first - start :]))
            offset += seq - first
        return Segments(cached, tuple(starts), tuple(offsets), tuple(masks))

    def attend(
        self, own: Callable, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kw: Any
    ) -> tuple[torch.Tensor, None]:
        """``own``'s output ``(1, packed, head, head_dim)`` for ``query (1, head, packed, d)``, row by row."""
        outs = []
        for first, offset, mask in zip(self.firsts, self.offsets, self.masks, strict=True):
            n = mask.shape[-2]
            own_keys = slice(self.cached + offset, self.cached + offset + n)
            k = torch.cat([key[:, :, :first], key[:, :, own_keys]], dim=2)
            v = torch.cat([value[:, :, :first], value[:, :, own_keys]], dim=2)
            outs.append(own(module, query[:, :, offset : offset + n], k, v, mask, **kw)[0])
        return torch.cat(outs, dim=1), None


class AttentionCalls:
    """The attention calls of one pass: each decoder layer gets ``masks[layer]`` (a mask, None for none, or
    :class:`Segments`), and ``reader`` (if any) reads each call first."""

    def __init__(self, vl: VLModel, masks: Sequence[torch.Tensor | Segments], reader: Any = None) -> None:
        self.vl, self.masks, self.reader = vl, masks, reader
        self.layers = {id(layer.self_attn): i for i, layer in enumerate(vl.decoder.layers)}

    def swapped(self) -> contextlib.AbstractContextManager[None]:
        """While in the block, every decoder layer's attention call is the pass's (other modules' are not touched)."""

        implementation = self.vl.attn_implementation  # once per pass, not per call

        def wrapper(
            before: Any, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any
        ):
            own = model_function(module, implementation, before)
            layer = self.layers.get(id(module))
            if layer is None:
                return own(module, query, key, value, mask, **kw)
            mask = self.masks[layer]
            if isinstance(mask, Segments):
                return mask.attend(own, module, query, key, value, **kw)
            if self.reader is not None:
                self.reader.read(layer, query, key, mask, kw.get("scaling"))
            return own(module, query, key, value, mask, **kw)

        return swapping(implementation, wrapper)


SWAP_LOCK = threading.RLock()
"""Held while an attention function is swapped: the swap is process-wide, so passes in other threads (a Dask
worker serving several items at once) wait rather than run on each other's masks; one thread may nest swaps."""


@contextlib.contextmanager
def swapping(implementation: str, wrapper: Callable[..., Any]) -> Iterator[None]:
    """While in the block, transformers' ``implementation`` attention function is ``wrapper``, called as
    ``wrapper(before, module, query, key, value, mask, **kw)`` (``before``: the function it replaced, None
    for the built-in one; see :func:`model_function`). Swaps in one thread nest; other threads wait."""
    with SWAP_LOCK:
        had = implementation in ALL_ATTENTION_FUNCTIONS._local_mapping
        before = ALL_ATTENTION_FUNCTIONS._local_mapping.get(implementation)
        ALL_ATTENTION_FUNCTIONS[implementation] = functools.partial(wrapper, before)
        try:
            yield
        finally:
            if had:
                ALL_ATTENTION_FUNCTIONS[implementation] = before
            else:
                del ALL_ATTENTION_FUNCTIONS._local_mapping[implementation]


def model_function(module: Any, implementation: str, before: Any) -> Any:
    """The attention function ``module`` would have called: the registered one, or its file's eager one."""
    if before is not None:
        return before
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS._global_mapping[implementation]
