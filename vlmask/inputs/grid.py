"""Where each vision token sits: its image or video, panel or frame group, and grid row and column.

Qwen3-VL cuts an image into 16-pixel patches and merges each ``merge x merge`` block of
patches into one vision token, row by row. ``image_grid_thw``/``video_grid_thw`` give each
input's grid in patches ``(t, h, w)``: an image has ``t = 1`` and ``(h / merge) x (w / merge)``
tokens; a video has ``t`` frame groups (two frames each), each written to the prompt as
``<t seconds><|vision_start|>`` + its tokens + ``<|vision_end|>``.

LLaVA-1.5 has one token per patch of its (resized, centre-cropped) image: one panel. LLaVA-NeXT
writes the base image (the whole image, squashed to the tower's size) and then its
any-resolution tiles as one grid of rows, cropped where the tiles are padding, with an
image-newline token after each row: the base image is panel ``t = 0``, tile ``(i, j)`` panel
``1 + i * tile_cols + j``; newline positions are no panel's (labeled ``special``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmask.errors import VlmaskError

NONE = -1
WHOLE = (0.0, 0.0, 1.0, 1.0)
Extent = tuple[float, float, float, float]  # top, left, height, width: fractions of the original image
Cell = tuple[int, int, int, int] | None  # (index, t, row, col) of a vision token; None for an image newline


@dataclass(frozen=True)
class Grid:
    """One image or video on the token grid: ``t`` frame groups (or panels) of ``rows x cols`` tokens.

    ``extents`` gives each panel's region of the original image as ``(top, left, height, width)``
    fractions (beyond 0..1 where the processor padded); empty: every panel is the whole image.
    """

    source: str  # "image" or "video"
    index: int
    t: int
    rows: int
    cols: int
    extents: tuple[Extent, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stored in a result's ``vision_grids`` attribute)."""
        out: dict[str, Any] = {"source": self.source, "index": self.index, "t": self.t, "rows": self.rows}
        out["cols"] = self.cols
        if self.extents:
            out["extents"] = [list(e) for e in self.extents]
        return out

    def extent(self, t: int) -> Extent:
        """Panel ``t``'s region of the original image.

        Example:
            >>> Grid("image", 0, 2, 4, 4, ((0.0, 0.0, 1.0, 1.0), (-0.5, 0.0, 2.0, 1.0))).extent(1)
            (-0.5, 0.0, 2.0, 1.0)
        """
        return self.extents[t] if self.extents else WHOLE


@dataclass(frozen=True)
class Coordinates:
    """Per position: image index, video index, frame group, row and column (``-1`` where not applicable)."""

    image: tuple[int, ...]
    video: tuple[int, ...]
    t: tuple[int, ...]
    row: tuple[int, ...]
    col: tuple[int, ...]
    newline: tuple[bool, ...] = ()  # an image placeholder that carries a row's newline, not a patch


@dataclass(frozen=True)
class Layout:
    """The grids of a prompt's images and videos, and the cell of each image and video token in prompt order."""

    grids: tuple[Grid, ...]
    image_cells: tuple[Cell, ...]
    video_cells: tuple[Cell, ...] = ()
    source: str = "images"  # what the cells were counted from, for messages


def grids(
    image_grid_thw: Sequence[Sequence[int]] | None, video_grid_thw: Sequence[Sequence[int]] | None, merge: int
) -> list[Grid]:
    """The merged-token grids of the images, then the videos, from the processor's ``*_grid_thw`` (patches).

    Example:
        >>> grids([[1, 6, 12]], [[2, 4, 4]], merge=2)
        [Grid(source='image', index=0, t=1, rows=3, cols=6), Grid(source='video', index=0, t=2, rows=2, cols=2)]
    """
    out = []
    for source, thw in (("image", image_grid_thw), ("video", video_grid_thw)):
        for index, (t, h, w) in enumerate([] if thw is None else thw):
            out.append(Grid(source, index, int(t), int(h) // merge, int(w) // merge))
    return out


def _cells(items: list[Grid]) -> Iterator[tuple[int, int, int, int]]:
    """``(index, t, row, col)`` of every token of ``items``, in the order the processor writes them."""
    for g in items:
        for t in range(g.t):
            for row in range(g.rows):
                for col in range(g.cols):
                    yield g.index, t, row, col


def qwen_layout(
    image_grid_thw: Sequence[Sequence[int]] | None, video_grid_thw: Sequence[Sequence[int]] | None, merge: int
) -> Layout:
    """The layout of Qwen-style ``*_grid_thw`` (in patches, ``merge x merge`` patches per token).

    Example:
        >>> qwen_layout([[1, 2, 4]], None, merge=2).image_cells
        ((0, 0, 0, 0), (0, 0, 0, 1))
    """
    all_grids = grids(image_grid_thw, video_grid_thw, merge)
    cells = {s: tuple(_cells([g for g in all_grids if g.source == s])) for s in ("image", "video")}
    return Layout(tuple(all_grids), cells["image"], cells["video"], "{source}_grid_thw")


def coordinates(ids: Sequence[int], image_token_id: int, video_token_id: int | None, layout: Layout) -> Coordinates:
    """Map every position of ``ids`` to its image or video, panel or frame group and grid cell.

    Image tokens take ``layout.image_cells`` in order, video tokens ``layout.video_cells``;
    other positions (and image newlines, flagged in ``newline``) get ``-1``.

    Example:
        >>> c = coordinates([5, 9, 9, 5], 9, 8, Layout((), ((0, 0, 0, 0), None)))
        >>> c.image, c.col, c.newline
        ((-1, 0, -1, -1), (-1, 0, -1, -1), (False, False, True, False))
    """
    cells = {image_token_id: ("image", iter(layout.image_cells)), video_token_id: ("video", iter(layout.video_cells))}
    columns: dict[str, list[int]] = {name: [] for name in ("image", "video", "t", "row", "col")}
    newline = []
    for token in ids:
        source, cell = None, (NONE, NONE, NONE, NONE)
        if token in cells:
            source, it = cells[token]
            cell = next(it, False)
            if cell is False:
                raise VlmaskError(f"the prompt has more {source} tokens than its {_what(layout, source)} accounts for")
        newline.append(cell is None)
        index, t, row, col = cell or (NONE, NONE, NONE, NONE)
        columns["image"].append(index if source == "image" else NONE)
        columns["video"].append(index if source == "video" else NONE)
        columns["t"].append(t)
        columns["row"].append(row)
        columns["col"].append(col)
    for source, it in cells.values():
        if next(it, False) is not False:
            raise VlmaskError(f"the prompt has fewer {source} tokens than its {_what(layout, source)} accounts for")
    return Coordinates(**{name: tuple(values) for name, values in columns.items()}, newline=tuple(newline))


def _what(layout: Layout, source: str) -> str:
    return layout.source.format(source=source)


def vision_coordinates(
    ids: Sequence[int],
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    video_grid_thw: Sequence[Sequence[int]] | None = None,
    merge: int = 2,
) -> Coordinates:
    """Map every position of ``ids`` to its image or video, frame group and merged-grid cell (Qwen grids).

    Image tokens are taken in order, image by image, row-major over each image's grid;
    video tokens likewise, frame group by frame group. Other positions get ``-1``.

    Example:
        >>> c = vision_coordinates([5, 9, 9, 9, 9, 5], 9, 8, image_grid_thw=[[1, 4, 4]])
        >>> c.image, c.row, c.col
        ((-1, 0, 0, 0, 0, -1), (-1, 0, 0, 1, 1, -1), (-1, 0, 1, 0, 1, -1))
    """
    return coordinates(ids, image_token_id, video_token_id, qwen_layout(image_grid_thw, video_grid_thw, merge))
