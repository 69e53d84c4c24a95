"""Intervention objects: small frozen values that say what to do to the model.

- :class:`BlockKeys` — no later query reads these keys (attention knockout);
- :class:`BlockEdges` — queries at ``targets`` do not read keys at ``sources``;
- :class:`AblateHeads` — zero or mean-ablate heads' outputs at one layer;
- :class:`PatchResidual` — overwrite a layer's output at some positions;
- :class:`Compose` (or ``a & b``) — several at once.

Each one subclasses :class:`Intervention`, validates itself when made, serialises with
``to_dict()`` / :func:`from_dict`, and implements only the hook points it uses; the engine
passes it :class:`At` (where a hook runs) and :class:`ModelShape` (what it checks against).

Example:
    >>> from interventions import AblateHeads, BlockKeys, from_dict
    >>> BlockKeys((18, 19), layers=(0, 1)).to_dict()
    {'type': 'BlockKeys', 'positions': [18, 19], 'layers': [0, 1]}
    >>> both = BlockKeys((4,)) & AblateHeads(layer=2, heads=(5,))
    >>> from_dict(both.to_dict()) == both
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interventions.base import HOOKS, At, Compose, Intervention, ModelShape, compose, from_dict
    from interventions.block_edges import BlockEdges
    from interventions.block_keys import BlockKeys
    from interventions.heads import AblateHeads
    from interventions.residual import PatchResidual

_HOMES = {
    **dict.fromkeys(("HOOKS", "At", "Compose", "Intervention", "ModelShape", "compose", "from_dict"), "base"),
    "BlockEdges": "block_edges",
    "BlockKeys": "block_keys",
    "AblateHeads": "heads",
    "PatchResidual": "residual",
}
"""Each public name's module: imported on first use, so that ``interventions.errors`` (the bottom of
vlmask's import graph) and the command line's option parsing load without torch."""


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'interventions' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interventions.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "HOOKS",
    "AblateHeads",
    "At",
    "BlockEdges",
    "BlockKeys",
    "Compose",
    "Intervention",
    "ModelShape",
    "PatchResidual",
    "compose",
    "from_dict",
]
