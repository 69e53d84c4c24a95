"""Validation helpers the intervention values share (and the engine uses for its own numbers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from interventions.errors import VlmaskError


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
