"""The call contract every intervention follows, and the validation helpers they share.

An intervention is a frozen dataclass; the engine never looks at its type, only at these
methods. Nothing here is a base class: :class:`Intervention` is a :class:`typing.Protocol`
that documents the contract (and types it), and each value implements it directly.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Protocol

import torch

from interventions.errors import VlmaskError

HOOKS = ("attention", "heads", "residual")
"""The points of a decoder layer an intervention can edit, in the order they run."""


class Intervention(Protocol):
    """What the engine asks of an intervention, at one decoder layer at a time.

    Hook points, in execution order inside decoder layer ``layer``:

    1. ``"attention"`` — what reaches ``self_attn``: :meth:`blocked_edges` gives the
       ``(query, key)`` edges to cut; :meth:`attention_key` lets layers that cut the same
       edges share one mask.
    2. ``"heads"`` — the ``o_proj`` input, each head's output side by side:
       :meth:`edit_heads` returns the edited ``(pos, head, head_dim)`` tensor.
    3. ``"residual"`` — the decoder layer's output (before Qwen3-VL adds DeepStack
       features after the first layers): :meth:`edit_residual` returns the edited
       ``(pos, hidden)`` tensor.

    The engine calls :meth:`blocked_edges` and the ``edit_*`` methods only where :meth:`hooks`
    names that point (so a value implements only those of its own points), once per batch
    row, on the positions the pass computes: ``start, start + 1, ...``.
    :meth:`first_changed` must be exact — positions before it are taken from the clean
    run's cache, not recomputed.
    """

    def hooks(self, layer: int) -> frozenset[str]:
        """The hook points (some of :data:`HOOKS`) this intervention edits at ``layer``."""

    def acts_on(self, layer: int) -> bool:
        """Whether this intervention changes anything at ``layer``."""

    def attention_key(self, layer: int) -> Hashable | None:
        """None where no edge is cut at ``layer``; elsewhere equal at two layers only if the edges are."""

    def blocked_edges(self, seq_len: int, layer: int) -> torch.Tensor:
        """Boolean ``(seq_len, seq_len)``: True where query q may not read key k at ``layer``."""

    def edit_heads(self, layer: int, heads: torch.Tensor, start: int, means: torch.Tensor | None) -> torch.Tensor:
        """``heads (pos, head, head_dim)`` at positions ``start..`` edited; ``means`` is (head, head_dim)."""

    def edit_residual(self, layer: int, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """``hidden (pos, hidden_size)``, the layer's output at positions ``start..``, edited."""

    def first_changed(self, seq_len: int, num_layers: int) -> int:
        """The first position whose computation this changes (``seq_len`` if none)."""

    @property
    def needs_head_means(self) -> bool:
        """Whether :meth:`edit_heads` needs the unmodified model's mean head outputs."""

    def check(
        self, seq_len: int, num_layers: int, num_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        """Raise :class:`VlmaskError` if the value does not fit this prompt and model."""

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict with a ``type`` key; ``interventions.from_dict`` rebuilds the value."""


def ints(values: Iterable[int] | int, what: str, *, keep_order: bool = False) -> tuple[int, ...]:
    """Non-negative integers as a tuple, sorted and unique unless ``keep_order`` (then duplicates are refused).

    Example:
        >>> ints([3, 1, 3], "positions")
        (1, 3)
    """
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise VlmaskError(f"{what} must be a list of non-negative integers, got {values!r}")
    out = []
    for value in values:
        if hasattr(value, "item") and not isinstance(value, bool):  # numpy and torch scalars
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VlmaskError(f"{what} must be non-negative integers, got {value!r}")
        out.append(int(value))
    if not keep_order:
        return tuple(sorted(set(out)))
    if len(set(out)) != len(out):
        raise VlmaskError(f"{what} must be distinct, got {out}")
    return tuple(out)


def one_int(value: Any, what: str) -> int:
    """A single non-negative integer.

    Example:
        >>> one_int(2, "layer")
        2
    """
    if hasattr(value, "item") and not isinstance(value, bool):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VlmaskError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def check_positions(positions: Iterable[int], seq_len: int, what: str = "key position") -> None:
    """Refuse positions past the end of the prompt."""
    for p in positions:
        if p >= seq_len:
            raise VlmaskError(f"{what} {p} is out of range: the prompt has {seq_len} tokens (0-{seq_len - 1})")


def check_layers(layers: Iterable[int], num_layers: int) -> None:
    """Refuse layers the model does not have."""
    for layer in layers:
        if layer >= num_layers:
            raise VlmaskError(
                f"layer {layer} is out of range: the model has {num_layers} decoder layers (0-{num_layers - 1})"
            )


def fields_of(data: Any, kind: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a :meth:`to_dict` output for ``kind``, refusing unknown and missing ones.

    Example:
        >>> fields_of({"type": "BlockKeys", "positions": [1]}, "BlockKeys", ("positions",), ("layers",))
        {'positions': [1]}
    """
    if not isinstance(data, dict):
        raise VlmaskError(f"an intervention must be a dict with a 'type' key, got {data!r}")
    fields = {k: v for k, v in data.items() if k != "type"}
    known = (*required, *optional)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise VlmaskError(f"{kind} has no field {unknown[0]!r}: expected {', '.join(known)}")
    missing = [k for k in required if k not in fields]
    if missing:
        raise VlmaskError(f"{kind} needs the field {missing[0]!r}: expected {', '.join(known)}")
    return fields


def layers_or_none(layers: Any, what: str) -> tuple[int, ...] | None:
    """``None`` (every layer) or a sorted tuple of layers."""
    return None if layers is None else ints(layers, what)
