"""Cut attention edges between two sets of positions: information flow from sources to targets."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from interventions._common import check_layers, check_positions, fields_of, ints, layers_or_none
from interventions.compose import compose


@dataclass(frozen=True)
class BlockEdges:
    """Queries at ``targets`` may not read keys at ``sources``, at ``layers`` (all if None).

    Information moves between positions only through attention, from a key (the source)
    to a later query (the target); cutting the edges ``target -> source`` at a window of
    layers stops that flow there, as in attention-knockout studies of how image and
    question tokens exchange information. Only edges with query > key exist in a causal
    model, so only those are cut; a position's attention to itself is never cut. Other
    attention is untouched and renormalises, as in :class:`BlockKeys` (which is
    ``BlockEdges(positions, targets=every later position)``).

    Example:
        >>> BlockEdges(sources=(0,), targets=(2,)).blocked_edges(seq_len=3, layer=0).int().tolist()
        [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    """

    sources: tuple[int, ...]
    targets: tuple[int, ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", ints(self.sources, "BlockEdges sources"))
        object.__setattr__(self, "targets", ints(self.targets, "BlockEdges targets"))
        object.__setattr__(self, "layers", layers_or_none(self.layers, "BlockEdges layers"))

    def __and__(self, other: Any) -> Any:
        return compose(self, other)

    def hooks(self, layer: int) -> frozenset[str]:
        """``{"attention"}`` at the layers where edges are cut."""
        return frozenset({"attention"}) if self.acts_on(layer) else frozenset()

    def acts_on(self, layer: int) -> bool:
        """Whether some edge is cut at ``layer``."""
        some = bool(self.sources) and bool(self.targets) and self.targets[-1] > self.sources[0]
        return some and (self.layers is None or layer in self.layers)

    def attention_key(self, layer: int) -> Hashable | None:
        """The same key at every layer where edges are cut: they do not depend on the layer."""
        return True if self.acts_on(layer) else None

    def blocked_edges(self, seq_len: int, layer: int) -> torch.Tensor:
        """Boolean ``(seq_len, seq_len)``: True at ``[target, source]`` for target > source, at acting layers."""
        edges = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        if not self.acts_on(layer):
            return edges
        queries = torch.tensor([t for t in self.targets if t < seq_len], dtype=torch.long)
        keys = torch.tensor([s for s in self.sources if s < seq_len], dtype=torch.long)
        edges[queries[:, None], keys[None, :]] = queries[:, None] > keys[None, :]
        return edges

    def first_changed(self, seq_len: int, num_layers: int) -> int:
        """The first target after the first source (``seq_len`` if no edge is cut at any layer)."""
        if not any(self.acts_on(layer) for layer in range(num_layers)):
            return seq_len
        return min((t for t in self.targets if self.sources[0] < t < seq_len), default=seq_len)

    @property
    def needs_head_means(self) -> bool:
        return False

    def check(
        self, seq_len: int, num_layers: int, num_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        """Raise :class:`VlmaskError` if a position or layer is out of range for this prompt and model."""
        check_positions(self.sources, seq_len, "source position")
        check_positions(self.targets, seq_len, "target position")
        check_layers(self.layers or (), num_layers)

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict; :func:`interventions.from_dict` rebuilds the value."""
        return {
            "type": "BlockEdges",
            "sources": list(self.sources),
            "targets": list(self.targets),
            "layers": None if self.layers is None else list(self.layers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockEdges:
        """Rebuild from :meth:`to_dict` output."""
        fields = fields_of(data, "BlockEdges", ("sources", "targets"), ("layers",))
        return cls(fields["sources"], fields["targets"], fields.get("layers"))
