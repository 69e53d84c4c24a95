"""Interventions from their JSON dicts."""

from __future__ import annotations

from typing import Any

from interventions.block_edges import BlockEdges
from interventions.block_keys import BlockKeys
from interventions.compose import Compose
from interventions.errors import VlmaskError
from interventions.heads import AblateHeads
from interventions.residual import PatchResidual

KINDS = {cls.__name__: cls for cls in (BlockKeys, BlockEdges, AblateHeads, PatchResidual, Compose)}


def from_dict(data: dict[str, Any]) -> Any:
    """Rebuild an intervention from its ``to_dict()`` output.

    Example:
        >>> from_dict({"type": "BlockKeys", "positions": [3], "layers": None})
        BlockKeys(positions=(3,), layers=None)
        >>> from_dict({"type": "AblateHeads", "layer": 1, "heads": [0]})
        AblateHeads(layer=1, heads=(0,), mode='zero')
    """
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in KINDS:
        shown = kind if isinstance(data, dict) else data
        raise VlmaskError(f"unknown intervention type {shown!r}: expected one of {sorted(KINDS)}")
    return KINDS[kind].from_dict(data)
