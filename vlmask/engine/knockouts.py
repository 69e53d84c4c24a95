"""What a sweep knocks out one by one, and at which layers.

``over`` is either the prompt's tokens (grouped into mask units: dimension ``token``) or a
list of intervention values (dimension ``intervention``). ``layers`` is every layer, a
fixed list, or :func:`vlmask.windows` — sliding windows of layers, which add a ``window``
dimension: each entry is knocked out at each window in turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from interventions import BlockKeys
from interventions._common import ints
from vlmask.errors import VlmaskError
from vlmask.inputs.units import unit_coords
from vlmask.spec import Windows


@dataclass(frozen=True)
class Knockouts:
    """The knockouts of a sweep: ``values`` holds one intervention per entry and window, row-major.

    ``dim`` is ``token`` (``entries`` are mask units: tuples of positions) or
    ``intervention`` (``entries`` are the values as given, before any window's layers).
    """

    dim: str
    entries: list[Any]
    layers: list[int] | None
    windows: Windows | None
    window_layers: list[tuple[int, ...]] | None
    values: list[Any]

    @property
    def dims(self) -> tuple[str, ...]:
        return (self.dim, "window") if self.window_layers is not None else (self.dim,)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.entries), len(self.window_layers)) if self.window_layers is not None else (len(self.entries),)

    def coords(self, tokens: Any, num_layers: int) -> dict[str, Any]:
        """Coordinates of the knockout dimensions; ``tokens`` is the prompt's token table."""
        if self.dim == "token":
            out = {"token": np.array([u[0] for u in self.entries], dtype=np.int64), **unit_coords(self.entries, tokens)}
        else:
            out = {
                "intervention": np.arange(len(self.entries)),
                "intervention_type": ("intervention", np.array([type(v).__name__ for v in self.entries], dtype=object)),
                "intervention_json": (
                    "intervention",
                    np.array([json.dumps(v.to_dict()) for v in self.entries], dtype=object),
                ),
            }
        if self.window_layers is not None:
            out["window"] = np.array(self.windows.centre_layers(num_layers), dtype=np.int64)
            out["window_start"] = ("window", np.array([w[0] for w in self.window_layers], dtype=np.int64))
            out["window_end"] = ("window", np.array([w[-1] for w in self.window_layers], dtype=np.int64))
        return out


def knockouts_of(
    num_layers: int,
    *,
    units: list[tuple[int, ...]] | None = None,
    over: Sequence[Any] | None = None,
    layers: Sequence[int] | Windows | None = None,
) -> Knockouts:
    """Every knockout of a sweep over ``units`` (token sweep) or the values ``over``, at ``layers``.

    Example:
        >>> k = knockouts_of(4, units=[(1,), (2, 3)], layers=Windows(k=3, centres=(0,)))
        >>> k.dims, k.shape, k.values[1]
        (('token', 'window'), (2, 1), BlockKeys(positions=(2, 3), layers=(0, 1)))
    """
    window_layers, fixed = None, None
    if isinstance(layers, Windows):
        window_layers = layers.resolve(num_layers)
    elif layers is not None:
        fixed = list(ints(layers, "layers"))
    if over is None:
        dim, entries = "token", list(units or [])
        base = [BlockKeys(unit) for unit in entries]
    else:
        dim, entries = "intervention", list(over)
        if not entries:
            raise VlmaskError("over= is an empty list: give at least one intervention to knock out")
        base = entries
    if window_layers is not None:
        values = [v.with_layers(w) for v in base for w in window_layers]
    elif fixed is not None:
        values = [v.with_layers(tuple(fixed)) for v in base]
    else:
        values = base
    return Knockouts(dim, entries, fixed, layers if window_layers is not None else None, window_layers, values)
