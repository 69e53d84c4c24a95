"""Mask units: vision tokens knocked out together (a merged row, a column, a KxK block, a whole image).

A unit is one entry of a result's ``token`` dimension: its positions are blocked together
by one ``BlockKeys``. Text and special tokens always stay single.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmask.errors import VlmaskError

UNITS = ("token", "row", "column", "region:K", "image")


def parse_unit(spec: str) -> tuple[str, int]:
    """``(name, K)`` from ``token``, ``row``, ``column``, ``region:K`` or ``image`` (K is 1 unless a region).

    Example:
        >>> parse_unit("region:2")
        ('region', 2)
        >>> parse_unit("patch")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: mask unit 'patch' is not known: expected token, row, column, region:K, image
    """
    name, _, size = str(spec).strip().partition(":")
    if name in ("token", "row", "column", "image") and not size:
        return name, 1
    if name == "region":
        try:
            k = int(size)
        except ValueError:
            k = 0
        if k >= 1:
            return name, k
        raise VlmaskError(f"mask unit {spec!r} needs a block size: region:K with K a positive integer, like region:2")
    raise VlmaskError(f"mask unit {spec!r} is not known: expected {', '.join(UNITS)}")


def _key(tokens: Any, pos: int, name: str, k: int) -> tuple[int, ...] | None:
    """What ``pos`` shares with the other members of its unit (None: a unit of its own)."""
    if tokens.kind[pos] != "vision" or name == "token":
        return None
    source = (tokens.image_index[pos], tokens.video_index[pos], tokens.t[pos])
    row, col = tokens.row[pos], tokens.col[pos]
    return {
        "row": (*source, row, -1),
        "column": (*source, -1, col),
        "region": (*source, row // k, col // k),
        "image": source if tokens.video_index[pos] >= 0 else source[:2],  # every panel of an image
    }[name]


def group_units(positions: Sequence[int], tokens: Any, unit: str = "token") -> list[tuple[int, ...]]:
    """Group the masked ``positions`` into units, ordered by their first position.

    ``tokens`` is a :class:`~vlmask.inputs.prompt.TokenTable`. Vision positions of one panel
    (an image, one of LLaVA-NeXT's tiles, or one video frame group) that share a grid row
    (``row``), a column (``column``) or a ``K x K`` block (``region:K``) form one unit; ``image``
    is a whole image (all its panels) or a whole frame group. Only positions in ``positions``
    are members.

    Example:
        >>> from types import SimpleNamespace
        >>> t = SimpleNamespace(kind=("text",) + ("vision",) * 4, image_index=(-1, 0, 0, 0, 0),
        ...     video_index=(-1,) * 5, t=(-1, 0, 0, 0, 0), row=(-1, 0, 0, 1, 1), col=(-1, 0, 1, 0, 1))
        >>> group_units([0, 1, 2, 3, 4], t, "column")
        [(0,), (1, 3), (2, 4)]
    """
    name, k = parse_unit(unit)
    groups: dict[tuple[int, ...], list[int]] = {}
    singles = []
    for pos in sorted(set(positions)):
        key = _key(tokens, pos, name, k)
        if key is None:
            singles.append((pos,))
        else:
            groups.setdefault(key, []).append(pos)
    return sorted([*singles, *(tuple(members) for members in groups.values())])


def unit_coords(units: Sequence[tuple[int, ...]], tokens: Any) -> dict[str, tuple[str, np.ndarray]]:
    """Coordinates of the ``token`` dimension for ``units``: text, kind, image, video, cell, extent, members.

    A unit's row and column are its top-left cell; ``token_rows``/``token_cols`` the number of
    rows and columns it spans (0 for a text token, where the cell is -1).

    Example:
        >>> from types import SimpleNamespace
        >>> t = SimpleNamespace(text=("a",), kind=("text",), image_index=(-1,), video_index=(-1,),
        ...     t=(-1,), row=(-1,), col=(-1,))
        >>> unit_coords([(0,)], t)["token_members"][1].tolist()
        ['0']
    """

    def first(values: Sequence[int]) -> np.ndarray:
        return np.array([values[u[0]] for u in units], dtype=np.int64)

    def span(values: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        cells = [[values[p] for p in u if values[p] >= 0] for u in units]
        top = [min(c) if c else -1 for c in cells]
        extent = [max(c) - min(c) + 1 if c else 0 for c in cells]
        return np.array(top, dtype=np.int64), np.array(extent, dtype=np.int64)

    rows, nrows = span(tokens.row)
    cols, ncols = span(tokens.col)
    text = [tokens.text[u[0]] if len(u) == 1 else f"{tokens.text[u[0]]} x{len(u)}" for u in units]
    return {
        "token_text": ("token", np.array(text, dtype=object)),
        "token_kind": ("token", np.array([tokens.kind[u[0]] for u in units], dtype=object)),
        "token_image": ("token", first(tokens.image_index)),
        "token_video": ("token", first(tokens.video_index)),
        "token_t": ("token", first(tokens.t)),
        "token_row": ("token", rows),
        "token_col": ("token", cols),
        "token_rows": ("token", nrows),
        "token_cols": ("token", ncols),
        "token_size": ("token", np.array([len(u) for u in units], dtype=np.int64)),
        "token_members": ("token", np.array([",".join(map(str, u)) for u in units], dtype=object)),
    }
