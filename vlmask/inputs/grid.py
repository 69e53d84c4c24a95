"""Where each vision token sits: its image or video, frame group, and merged-grid row and column.

Qwen3-VL cuts an image into 16-pixel patches and merges each ``merge x merge`` block of
patches into one vision token, row by row. ``image_grid_thw``/``video_grid_thw`` give each
input's grid in patches ``(t, h, w)``: an image has ``t = 1`` and ``(h / merge) x (w / merge)``
tokens; a video has ``t`` frame groups (two frames each), each written to the prompt as
``<t seconds><|vision_start|>`` + its tokens + ``<|vision_end|>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vlmask.errors import VlmaskError

NONE = -1


@dataclass(frozen=True)
class Grid:
    """One image or video on the merged-token grid: ``t`` frame groups of ``rows x cols`` tokens."""

    source: str  # "image" or "video"
    index: int
    t: int
    rows: int
    cols: int

    def to_dict(self) -> dict[str, int | str]:
        """A JSON-ready dict (stored in a result's ``vision_grids`` attribute)."""
        return {"source": self.source, "index": self.index, "t": self.t, "rows": self.rows, "cols": self.cols}


@dataclass(frozen=True)
class Coordinates:
    """Per position: image index, video index, frame group, row and column (``-1`` where not applicable)."""

    image: tuple[int, ...]
    video: tuple[int, ...]
    t: tuple[int, ...]
    row: tuple[int, ...]
    col: tuple[int, ...]


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


def vision_coordinates(
    ids: Sequence[int],
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    video_grid_thw: Sequence[Sequence[int]] | None = None,
    merge: int = 2,
) -> Coordinates:
    """Map every position of ``ids`` to its image or video, frame group and merged-grid cell.

    Image tokens are taken in order, image by image, row-major over each image's grid;
    video tokens likewise, frame group by frame group. Other positions get ``-1``.

    Example:
        >>> c = vision_coordinates([5, 9, 9, 9, 9, 5], 9, 8, image_grid_thw=[[1, 4, 4]])
        >>> c.image, c.row, c.col
        ((-1, 0, 0, 0, 0, -1), (-1, 0, 0, 1, 1, -1), (-1, 0, 1, 0, 1, -1))
    """
    all_grids = grids(image_grid_thw, video_grid_thw, merge)
    cells = {
        image_token_id: ("image", _cells([g for g in all_grids if g.source == "image"])),
        video_token_id: ("video", _cells([g for g in all_grids if g.source == "video"])),
    }
    columns: dict[str, list[int]] = {name: [] for name in ("image", "video", "t", "row", "col")}
    for token in ids:
        source, index, t, row, col = None, NONE, NONE, NONE, NONE
        if token in cells:
            source, it = cells[token]
            cell = next(it, None)
            if cell is None:
                raise VlmaskError(f"the prompt has more {source} tokens than its {source}_grid_thw accounts for")
            index, t, row, col = cell
        columns["image"].append(index if source == "image" else NONE)
        columns["video"].append(index if source == "video" else NONE)
        columns["t"].append(t)
        columns["row"].append(row)
        columns["col"].append(col)
    for source, it in cells.values():
        if next(it, None) is not None:
            raise VlmaskError(f"the prompt has fewer {source} tokens than its {source}_grid_thw accounts for")
    return Coordinates(**{name: tuple(values) for name, values in columns.items()})
