"""Attention knockout: stop later positions from reading chosen key positions."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from interventions._common import check_layers, check_positions, ints, layers_or_none
from interventions.base import At, Intervention, ModelShape


@dataclass(frozen=True)
class BlockKeys(Intervention):
    """Block attention to key ``positions`` from every later query, at ``layers`` (all if None).

    The blocked scores are removed before softmax, so the remaining weights renormalise.
    A blocked position's own row is untouched: positions <= p compute exactly as in the
    clean run. The edges cut are the same at every layer where it acts.

    Example:
        >>> BlockKeys((1,)).blocked_edges(At(layer=0, seq_len=3)).int().tolist()
        [[0, 0, 0], [0, 0, 0], [0, 1, 0]]
    """

    positions: tuple[int, ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", ints(self.positions, "BlockKeys positions"))
        object.__setattr__(self, "layers", layers_or_none(self.layers, "BlockKeys layers"))

    def acts_at(self, layer: int) -> bool:
        """Whether some key is blocked at ``layer``."""
        return bool(self.positions) and (self.layers is None or layer in self.layers)

    def attention_key(self, layer: int) -> Hashable | None:
        """One key at every acting layer: the edges do not depend on the layer."""
        return True if self.acts_at(layer) else None

    def blocked_edges(self, at: At) -> torch.Tensor | None:
        """Boolean ``(seq_len, seq_len)``: True where a later query q may not read a blocked key k."""
        if not self.acts_at(at.layer):
            return None
        edges = torch.zeros(at.seq_len, at.seq_len, dtype=torch.bool)
        keys = torch.tensor([p for p in self.positions if p < at.seq_len], dtype=torch.long)
        edges[:, keys] = torch.arange(at.seq_len)[:, None] > keys[None, :]
        return edges

    def blocked_pairs(self, at: At) -> torch.Tensor | None:
        """The edges of :meth:`blocked_edges` as ``(query, key)`` rows, built without the mask.

        Example:
            >>> BlockKeys((1,)).blocked_pairs(At(layer=0, seq_len=3)).tolist()
            [[2, 1]]
        """
        if not self.acts_at(at.layer):
            return None
        keys = torch.tensor(sorted({p for p in self.positions if p < at.seq_len}), dtype=torch.long)
        counts = at.seq_len - 1 - keys  # the later queries of each key
        key = keys.repeat_interleave(counts)
        offsets = torch.arange(len(key)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        return torch.stack([key + 1 + offsets, key], dim=1)

    def first_changed(self, seq_len: int, shape: ModelShape) -> int:
        """One past the first blocked key (``seq_len`` if nothing is blocked at any layer)."""
        if not any(self.acts_at(layer) for layer in range(shape.num_layers)):
            return seq_len
        keys = [p for p in self.positions if p < seq_len]
        return min(keys[0] + 1, seq_len) if keys else seq_len

    def check(self, seq_len: int, shape: ModelShape) -> None:
        """Refuse a position past the prompt or a layer the model does not have."""
        check_positions(self.positions, seq_len)
        check_layers(self.layers or (), shape.num_layers)

    def with_layers(self, layers: tuple[int, ...]) -> BlockKeys:
        """The same keys blocked at ``layers``."""
        return dataclasses.replace(self, layers=layers)
