"""Activation patching: overwrite the residual stream at chosen positions after one decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from interventions._common import check_layers, check_positions, ints, one_int
from interventions.base import At, Intervention, ModelShape
from interventions.errors import VlmaskError


def _rows(source: Any) -> tuple[tuple[float, ...], ...]:
    """A 2D float table as a tuple of tuples (float32 values), from a tensor, an array or nested lists."""
    try:
        table = torch.as_tensor(source.tolist() if hasattr(source, "tolist") else source, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise VlmaskError(f"PatchResidual source must be a 2D table of numbers (position x hidden): {err}") from None
    if table.ndim != 2:
        raise VlmaskError(
            f"PatchResidual source must be 2D (one row of hidden values per position), got shape {tuple(table.shape)}"
        )
    if not torch.isfinite(table).all():
        raise VlmaskError("PatchResidual source holds NaN or infinite values")
    return tuple(tuple(row) for row in table.tolist())


@dataclass(frozen=True, repr=False)
class PatchResidual(Intervention):
    """Replace the output of decoder layer ``layer`` at ``positions`` with ``source``.

    ``source`` has one row per position, in the order of ``positions``: row ``i`` is the
    whole hidden vector (``hidden_size`` numbers) that decoder layer ``layer`` outputs at
    ``positions[i]`` from then on, cast to the model's dtype. It is what the layer module
    returns, before Qwen3-VL adds its DeepStack visual features at vision positions after
    the first layers (those are still added on top). Any 2D tensor, array or nested list
    is accepted; it is kept as float32 values, and serialised as nested lists. A common
    source is another prompt's clean residual stream: ``vlmask.capture_residual``.

    Positions before ``min(positions)`` are untouched, so only those from there on are
    recomputed.

    Example:
        >>> patch = PatchResidual(layer=0, positions=(1,), source=[[5.0, 5.0]])
        >>> patch.edit_residual(torch.zeros(3, 2), At(layer=0, seq_len=3)).tolist()
        [[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]]
    """

    layer: int
    positions: tuple[int, ...]
    source: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", one_int(self.layer, "PatchResidual layer"))
        object.__setattr__(self, "positions", ints(self.positions, "PatchResidual positions", keep_order=True))
        object.__setattr__(self, "source", _rows(self.source))
        if not self.positions:
            raise VlmaskError("PatchResidual positions is empty: name at least one position")
        if len(self.source) != len(self.positions):
            raise VlmaskError(
                f"PatchResidual source has {len(self.source)} rows but there are {len(self.positions)} positions:"
                " give one row per position"
            )

    def __repr__(self) -> str:
        shape = f"{len(self.source)}x{len(self.source[0])}"
        return f"PatchResidual(layer={self.layer}, positions={self.positions}, source=<{shape} float32>)"

    @cached_property
    def source_tensor(self) -> torch.Tensor:
        """``source`` as a float32 ``(len(positions), hidden)`` tensor."""
        return torch.tensor(self.source, dtype=torch.float32)

    def acts_at(self, layer: int) -> bool:
        """Whether ``layer`` is the patched layer."""
        return layer == self.layer

    def edit_residual(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        """``hidden (pos, hidden_size)`` at positions ``at.start..`` with the patched positions overwritten."""
        start = at.start
        rows = [(i, p - start) for i, p in enumerate(self.positions) if start <= p < start + hidden.shape[0]]
        if not rows:
            return hidden
        out = hidden.clone()
        source = self.source_tensor.to(device=out.device, dtype=out.dtype)
        out[[r for _, r in rows]] = source[[i for i, _ in rows]]
        return out

    def first_changed(self, seq_len: int, shape: ModelShape) -> int:
        """The first patched position."""
        return min(min(self.positions), seq_len) if self.layer < shape.num_layers else seq_len

    def check(self, seq_len: int, shape: ModelShape) -> None:
        """Refuse a layer or a position that does not exist, or source rows of the wrong width."""
        check_layers((self.layer,), shape.num_layers)
        check_positions(self.positions, seq_len, "patched position")
        width = len(self.source[0])
        if shape.hidden_size is not None and width != shape.hidden_size:
            raise VlmaskError(
                f"PatchResidual source rows have {width} values but the model's hidden size is {shape.hidden_size}"
            )
