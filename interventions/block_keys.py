"""Attention knockout: stop later positions from reading chosen key positions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vlmask._errors import VlmaskError


def _ints(values: Iterable[int], what: str) -> tuple[int, ...]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VlmaskError(f"{what} must be non-negative integers, got {value!r}")
        out.append(int(value))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class BlockKeys:
    """Block attention to key ``positions`` from every later query, at ``layers`` (all if None).

    The blocked scores are removed before softmax, so the remaining weights renormalise.
    A blocked position's own row is untouched: positions <= p compute exactly as in the
    clean run. The call contract shared by attention interventions is
    :meth:`blocked_edges`: a boolean ``(query, key)`` matrix of the edges to cut at a layer,
    the same at every layer where :meth:`acts_on` is true.

    Example:
        >>> BlockKeys((1,)).blocked_edges(seq_len=3, layer=0).int().tolist()
        [[0, 0, 0], [0, 0, 0], [0, 1, 0]]
    """

    positions: tuple[int, ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _ints(self.positions, "BlockKeys positions"))
        if self.layers is not None:
            object.__setattr__(self, "layers", _ints(self.layers, "BlockKeys layers"))

    def acts_on(self, layer: int) -> bool:
        """Whether this intervention changes anything at decoder layer ``layer``."""
        return bool(self.positions) and (self.layers is None or layer in self.layers)

    def blocked_edges(self, seq_len: int, layer: int) -> torch.Tensor:
        """Boolean ``(seq_len, seq_len)``: True where query q may not read key k at ``layer``."""
        edges = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        if not self.acts_on(layer):
            return edges
        keys = torch.tensor([p for p in self.positions if p < seq_len], dtype=torch.long)
        later = torch.arange(seq_len)[:, None] > keys[None, :]
        edges[:, keys] = later
        return edges

    def check(self, seq_len: int, num_layers: int) -> None:
        """Raise :class:`VlmaskError` if a position or layer is out of range for this prompt and model."""
        for p in self.positions:
            if p >= seq_len:
                raise VlmaskError(
                    f"key position {p} is out of range: the prompt has {seq_len} tokens (0-{seq_len - 1})"
                )
        for layer in self.layers or ():
            if layer >= num_layers:
                raise VlmaskError(
                    f"layer {layer} is out of range: the model has {num_layers} decoder layers (0-{num_layers - 1})"
                )

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict; :func:`from_dict` rebuilds the value."""
        return {
            "type": "BlockKeys",
            "positions": list(self.positions),
            "layers": None if self.layers is None else list(self.layers),
        }


def from_dict(data: dict[str, Any]) -> BlockKeys:
    """Rebuild an intervention from :meth:`to_dict` output.

    Example:
        >>> from_dict({"type": "BlockKeys", "positions": [3], "layers": None})
        BlockKeys(positions=(3,), layers=None)
    """
    kinds = {"BlockKeys": BlockKeys}
    kind = data.get("type")
    if kind not in kinds:
        raise VlmaskError(f"unknown intervention type {kind!r}: expected one of {sorted(kinds)}")
    fields = {k: v for k, v in data.items() if k != "type"}
    if fields.get("layers") is not None:
        fields["layers"] = tuple(fields["layers"])
    return kinds[kind](positions=tuple(fields.get("positions", ())), layers=fields.get("layers"))
