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

from vlmask.engine.rows import spread
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
        self,
        own: Callable,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rows: Sequence[int] | None = None,
        **kw: Any,
    ) -> tuple[torch.Tensor, None]:
        """``own``'s output ``(1, packed, head, head_dim)`` for ``query (1, head, packed, d)``, row by row; with
        ``rows`` (packed positions), only those queries are computed (the output is zero at the others).

        Each row's keys are laid in one buffer per call, rows taken by decreasing start: a row
        writes its own keys from its start on, over positions that only rows already done
        needed, so each clean key is copied once, not once per row.
        """
        order = sorted(range(len(self.firsts)), key=lambda i: -self.firsts[i])
        ends = [first + mask.shape[-2] for first, mask in zip(self.firsts, self.masks, strict=True)]
        keys, values = (x.new_empty(*x.shape[:2], max(ends), x.shape[-1]) for x in (key, value))
        top = max(self.firsts)
        keys[:, :, :top], values[:, :, :top] = key[:, :, :top], value[:, :, :top]
        spans = [(0, mask.shape[-2]) for mask in self.masks] if rows is None else self.spans(rows)
        outs: list[torch.Tensor] = [query] * len(order)
        for i in order:
            first, offset, mask, end = self.firsts[i], self.offsets[i], self.masks[i], ends[i]
            n, (lo, hi) = end - first, spans[i]
            own_keys = slice(self.cached + offset, self.cached + offset + n)
            keys[:, :, first:end], values[:, :, first:end] = key[:, :, own_keys], value[:, :, own_keys]
            got = None
            if hi > lo:
                q = query[:, :, offset + lo : offset + hi]
                got = own(module, q, keys[:, :, :end], values[:, :, :end], mask[..., lo:hi, :], **kw)[0]
            if (lo, hi) == (0, n):
                outs[i] = got
                continue
            outs[i] = query.new_zeros(query.shape[0], n, query.shape[1], value.shape[-1])  # the rows not read: 0
            if got is not None:
                outs[i][:, lo:hi] = got
        return torch.cat(outs, dim=1), None

    def spans(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        """Per row, the span ``lo, hi`` of its queries (counted from its offset) that covers every one of ``rows``
        (packed positions) it holds; ``0, 0`` where it holds none.

        Example:
            >>> mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
            >>> Segments(cached=4, firsts=(1, 1), offsets=(0, 3), masks=(mask, mask)).spans([2, 4])
            [(2, 3), (1, 2)]
        """
        out = []
        for offset, mask in zip(self.offsets, self.masks, strict=True):
            own = [r - offset for r in rows if offset <= r < offset + mask.shape[-2]]
            out.append((min(own), max(own) + 1) if own else (0, 0))
        return out


class AttentionCalls:
    """The attention calls of one pass: each decoder layer gets ``masks[layer]`` (a mask, None for none, or
    :class:`Segments`), and ``reader`` (if any) reads each call first; with ``last_rows``, the last layer
    computes only those query rows (see :func:`~vlmask.engine.rows.read_rows_only`)."""

    def __init__(
        self,
        vl: VLModel,
        masks: Sequence[torch.Tensor | Segments],
        reader: Any = None,
        last_rows: torch.Tensor | None = None,
    ) -> None:
        self.vl, self.masks, self.reader, self.last_rows = vl, masks, reader, last_rows
        self.layers = {id(layer.self_attn): i for i, layer in enumerate(vl.decoder.layers)}
        self.last = len(self.layers) - 1
        # a packed pass's last layer picks each row's queries on the host: the read rows copied there once per pass
        self.last_picked = last_rows.tolist() if last_rows is not None and isinstance(masks[-1], Segments) else None

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
            mask, rows = self.masks[layer], self.last_rows if layer == self.last else None
            if isinstance(mask, Segments):
                return mask.attend(
                    own, module, query, key, value, self.last_picked if layer == self.last else None, **kw
                )
            if self.reader is not None:
                self.reader.read(layer, query, key, mask, kw.get("scaling"))
            if rows is None or mask is None:  # no mask: the causal kernel needs every query
                return own(module, query, key, value, mask, **kw)
            at = rows.to(query.device)
            picked = mask[..., at, :] if mask.shape[-2] == query.shape[-2] else mask
            return spread(own(module, query[:, :, at], key, value, picked, **kw)[0], query.shape[-2], at), None

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
