"""Several interventions applied together, by wrapping: ``a & b`` or ``Compose([a, b])``."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from interventions._common import fields_of
from interventions.errors import VlmaskError


def _is_intervention(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("hooks", "first_changed", "to_dict"))


@dataclass(frozen=True)
class Compose:
    """All of ``parts`` at once; ``Compose([])`` does nothing.

    Edges cut by any part are cut. Activation edits run in the order of ``parts`` at each
    hook point (a later part sees what an earlier one wrote). Nested compositions are
    flattened, so ``(a & b) & c == Compose([a, b, c])``.

    Example:
        >>> from interventions import AblateHeads, BlockKeys
        >>> both = BlockKeys((4,), layers=(0,)) & AblateHeads(1, (2,))
        >>> sorted(both.hooks(0)), sorted(both.hooks(1)), both.first_changed(seq_len=9, num_layers=2)
        (['attention'], ['heads'], 0)
    """

    parts: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.parts, (str, bytes, dict)) or not isinstance(self.parts, Iterable):
            raise VlmaskError(f"Compose takes a list of interventions, got {self.parts!r}")
        flat = []
        for part in self.parts:
            if not _is_intervention(part):
                raise VlmaskError(
                    f"Compose parts must be interventions (BlockKeys, BlockEdges, AblateHeads, PatchResidual,"
                    f" Compose), got {part!r}"
                )
            flat.extend(part.parts if isinstance(part, Compose) else (part,))
        object.__setattr__(self, "parts", tuple(flat))

    def __and__(self, other: Any) -> Any:
        return compose(self, other)

    def hooks(self, layer: int) -> frozenset[str]:
        """The hook points any part edits at ``layer``."""
        return frozenset().union(*(part.hooks(layer) for part in self.parts))

    def acts_on(self, layer: int) -> bool:
        """Whether any part changes anything at ``layer``."""
        return bool(self.hooks(layer))

    def attention_key(self, layer: int) -> Hashable | None:
        """Which parts cut edges at ``layer`` (None if none does)."""
        keys = tuple(part.attention_key(layer) if "attention" in part.hooks(layer) else None for part in self.parts)
        return None if all(k is None for k in keys) else keys

    def blocked_edges(self, seq_len: int, layer: int) -> torch.Tensor:
        """The union of the parts' blocked edges at ``layer``."""
        edges = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        for part in self.parts:
            if "attention" in part.hooks(layer):
                edges |= part.blocked_edges(seq_len, layer)
        return edges

    def edit_heads(self, layer: int, heads: torch.Tensor, start: int, means: torch.Tensor | None) -> torch.Tensor:
        """Each head-editing part's edit, in order."""
        for part in self.parts:
            if "heads" in part.hooks(layer):
                heads = part.edit_heads(layer, heads, start, means)
        return heads

    def edit_residual(self, layer: int, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Each residual-editing part's edit, in order."""
        for part in self.parts:
            if "residual" in part.hooks(layer):
                hidden = part.edit_residual(layer, hidden, start)
        return hidden

    def first_changed(self, seq_len: int, num_layers: int) -> int:
        """The earliest position any part changes."""
        return min((part.first_changed(seq_len, num_layers) for part in self.parts), default=seq_len)

    @property
    def needs_head_means(self) -> bool:
        """Whether any part mean-ablates heads."""
        return any(part.needs_head_means for part in self.parts)

    def check(
        self, seq_len: int, num_layers: int, num_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        """Check every part against the prompt and model."""
        for part in self.parts:
            part.check(seq_len, num_layers, num_heads, hidden_size)

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "Compose", "parts": [...]}``."""
        return {"type": "Compose", "parts": [part.to_dict() for part in self.parts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Compose:
        """Rebuild from :meth:`to_dict` output."""
        from interventions.serial import from_dict  # the registry knows every type, this one included

        parts = fields_of(data, "Compose", ("parts",))["parts"]
        if not isinstance(parts, list):
            raise VlmaskError(f"Compose parts must be a list of intervention dicts, got {parts!r}")
        return cls(tuple(from_dict(part) for part in parts))


def compose(*values: Any) -> Any:
    """``values`` applied together: a single value stays itself, empty compositions vanish.

    Example:
        >>> from interventions import BlockKeys
        >>> compose(Compose(), BlockKeys((1,)))
        BlockKeys(positions=(1,), layers=None)
    """
    parts = Compose(values).parts
    return parts[0] if len(parts) == 1 else Compose(parts)
