"""Cut attention edges between two sets of positions: information flow from sources to targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from interventions._common import check_layers, check_positions, ints, layers_or_none
from interventions.base import At, Intervention, ModelShape


@dataclass(frozen=True)
class BlockEdges(Intervention):
    """Queries at ``targets`` may not read keys at ``sources``, at ``layers`` (all if None).

    Information moves between positions only through attention, from a key (the source)
    to a later query (the target); cutting the edges ``target -> source`` at a window of
    layers stops that flow there, as in attention-knockout studies of how image and
    question tokens exchange information. Only edges with query > key exist in a causal
    model, so only those are cut; a position's attention to itself is never cut. Other
    attention is untouched and renormalises, as in :class:`BlockKeys` (which is
    ``BlockEdges(positions, targets=every later position)``).

    Example:
        >>> BlockEdges(sources=(0,), targets=(2,)).blocked_edges(At(layer=0, seq_len=3)).int().tolist()
        [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    """

    sources: tuple[int, ...]
    targets: tuple[int, ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", ints(self.sources, "BlockEdges sources"))
        object.__setattr__(self, "targets", ints(self.targets, "BlockEdges targets"))
        object.__setattr__(self, "layers", layers_or_none(self.layers, "BlockEdges layers"))

    def acts_at(self, layer: int) -> bool:
        """Whether some edge is cut at ``layer``."""
        some = bool(self.sources) and bool(self.targets) and self.targets[-1] > self.sources[0]
        return some and (self.layers is None or layer in self.layers)

    def attention_key(self, layer: int) -> Hashable | None:
        """One key at every acting layer: the edges do not depend on the layer."""
        return True if self.acts_at(layer) else None

    def blocked_edges(self, at: At) -> torch.Tensor | None:
        """Boolean ``(seq_len, seq_len)``: True at ``[target, source]`` for target > source."""
        if not self.acts_at(at.layer):
            return None
        edges = torch.zeros(at.seq_len, at.seq_len, dtype=torch.bool)
        queries = torch.tensor([t for t in self.targets if t < at.seq_len], dtype=torch.long)
        keys = torch.tensor([s for s in self.sources if s < at.seq_len], dtype=torch.long)
        edges[queries[:, None], keys[None, :]] = queries[:, None] > keys[None, :]
        return edges

    def first_changed(self, seq_len: int, shape: ModelShape) -> int:
        """The first target after the first source (``seq_len`` if no edge is cut at any layer)."""
        if not any(self.acts_at(layer) for layer in range(shape.num_layers)):
            return seq_len
        return min((t for t in self.targets if self.sources[0] < t < seq_len), default=seq_len)

    def check(self, seq_len: int, shape: ModelShape) -> None:
        """Refuse a position past the prompt or a layer the model does not have."""
        check_positions(self.sources, seq_len, "source position")
        check_positions(self.targets, seq_len, "target position")
        check_layers(self.layers or (), shape.num_layers)

    def with_layers(self, layers: tuple[int, ...]) -> BlockEdges:
        """The same edges cut at ``layers``."""
        return dataclasses.replace(self, layers=layers)
