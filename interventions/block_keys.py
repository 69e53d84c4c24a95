"""Attention knockout: stop later positions from reading chosen key positions."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from interventions._common import check_layers, check_positions, fields_of, ints, layers_or_none
from interventions.compose import compose


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
        object.__setattr__(self, "positions", ints(self.positions, "BlockKeys positions"))
        object.__setattr__(self, "layers", layers_or_none(self.layers, "BlockKeys layers"))

    def __and__(self, other: Any) -> Any:
        return compose(self, other)

    def hooks(self, layer: int) -> frozenset[str]:
        """``{"attention"}`` at the layers where keys are blocked."""
        return frozenset({"attention"}) if self.acts_on(layer) else frozenset()

    def acts_on(self, layer: int) -> bool:
        """Whether this intervention changes anything at decoder layer ``layer``."""
        return bool(self.positions) and (self.layers is None or layer in self.layers)

    def attention_key(self, layer: int) -> Hashable | None:
        """The same key at every layer where keys are blocked: the edges do not depend on the layer."""
        return True if self.acts_on(layer) else None

    def blocked_edges(self, seq_len: int, layer: int) -> torch.Tensor:
        """Boolean ``(seq_len, seq_len)``: True where query q may not read key k at ``layer``."""
        edges = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        if not self.acts_on(layer):
            return edges
        keys = torch.tensor([p for p in self.positions if p < seq_len], dtype=torch.long)
        later = torch.arange(seq_len)[:, None] > keys[None, :]
        edges[:, keys] = later
        return edges

    def first_changed(self, seq_len: int, num_layers: int) -> int:
        """One past the first blocked key (``seq_len`` if nothing is blocked at any layer)."""
        if not any(self.acts_on(layer) for layer in range(num_layers)):
            return seq_len
        keys = [p for p in self.positions if p < seq_len]
        return min(keys[0] + 1, seq_len) if keys else seq_len

    @property
    def needs_head_means(self) -> bool:
        return False

    def check(
        self, seq_len: int, num_layers: int, num_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        """Raise :class:`VlmaskError` if a position or layer is out of range for this prompt and model."""
        check_positions(self.positions, seq_len)
        check_layers(self.layers or (), num_layers)

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict; :func:`interventions.from_dict` rebuilds the value."""
        return {
            "type": "BlockKeys",
            "positions": list(self.positions),
            "layers": None if self.layers is None else list(self.layers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockKeys:
        """Rebuild from :meth:`to_dict` output."""
        fields = fields_of(data, "BlockKeys", ("positions",), ("layers",))
        return cls(positions=fields["positions"], layers=fields.get("layers"))
