"""Which grid layout a processor's outputs describe: Qwen's ``*_grid_thw``, LLaVA-1.5's one panel, LLaVA-NeXT's tiles.

The geometry follows the transformers processors and models step by step (resize, pad,
centre-crop, tile, unpad), so that each vision token gets the cell, and each panel the
region of the original image, that the model's features come from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from vlmask.inputs.grid import WHOLE, Cell, Extent, Grid, Layout, qwen_layout


def layout_of(processor: Any, inputs: Mapping[str, Any], image_sizes: Sequence[tuple[int, int]] = ()) -> Layout:
    """The layout of ``inputs`` (a processor's outputs) for images of ``image_sizes`` ``(height, width)``.

    Example:
        >>> from vlmask.builtin import make_processor
        >>> import torch
        >>> layout_of(make_processor([]), {"image_grid_thw": torch.tensor([[1, 4, 4]])}).grids
        (Grid(source='image', index=0, t=1, rows=2, cols=2),)
    """
    image_processor = getattr(processor, "image_processor", None)
    thw = [inputs[k].tolist() if k in inputs else None for k in ("image_grid_thw", "video_grid_thw")]
    if "pixel_values" not in inputs or any(t is not None for t in thw):
        return qwen_layout(*thw, getattr(image_processor, "merge_size", 1))
    patch = int(processor.patch_size)
    side = inputs["pixel_values"].shape[-2:]
    if "image_sizes" in inputs and hasattr(image_processor, "image_grid_pinpoints"):
        sizes = [tuple(int(v) for v in hw) for hw in inputs["image_sizes"].tolist()]
        return anyres_layout(sizes, image_processor, (int(side[0]), int(side[1])), patch)
    rows, cols = int(side[0]) // patch, int(side[1]) // patch
    extents = [crop_extent(h, w, image_processor) for h, w in image_sizes]
    grids = tuple(Grid("image", i, 1, rows, cols, (e,)) for i, e in enumerate(extents))
    cells = tuple((i, 0, r, c) for i in range(len(extents)) for r in range(rows) for c in range(cols))
    return Layout(grids, cells)


def _size(size: Any) -> tuple[int | None, int | None, int | None]:
    """``(shortest_edge, height, width)`` of a size setting (a SizeDict or a dict)."""
    get = size.get if isinstance(size, Mapping) else lambda k: getattr(size, k, None)
    return get("shortest_edge"), get("height"), get("width")


def _resized(height: int, width: int, size: Any) -> tuple[int, int]:
    """The ``(height, width)`` transformers resizes to: the short side to ``shortest_edge``, or exactly."""
    short_edge, h, w = _size(size)
    if short_edge is None:
        return int(h), int(w)
    short, long = sorted((height, width))
    new_long = int(short_edge * long / short)
    return (new_long, short_edge) if width <= height else (short_edge, new_long)


def _cropped(frame: Extent, height: int, width: int, crop: Any) -> Extent:
    """``frame`` (the region a ``height x width`` image covers) after transformers' centre crop to ``crop``."""
    _, ch, cw = _size(crop)
    top, left = int((height - ch) / 2.0), int((width - cw) / 2.0)
    y, x, h, w = frame
    return (y + h * top / height, x + w * left / width, h * ch / height, w * cw / width)


def crop_extent(height: int, width: int, image_processor: Any) -> Extent:
    """The region of a ``height x width`` image that LLaVA-1.5's processor keeps (pad to square, resize, crop).

    Example:
        >>> from transformers import CLIPImageProcessor
        >>> clip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        >>> crop_extent(100, 200, clip)  # the centre half of a wide image
        (0.0, 0.25, 1.0, 0.5)
    """
    frame: Extent = WHOLE
    if getattr(image_processor, "do_pad", False):  # LlavaImageProcessor: pad to a square first
        side = max(height, width)
        frame = (-((side - height) // 2) / height, -((side - width) // 2) / width, side / height, side / width)
        height = width = side
    if getattr(image_processor, "do_resize", True):
        height, width = _resized(height, width, image_processor.size)
    if getattr(image_processor, "do_center_crop", False):
        frame = _cropped(frame, height, width, image_processor.crop_size)
    return frame


def _tile_extents(height: int, width: int, canvas: tuple[int, int], tile: int) -> list[Extent]:
    """Each tile's region of the image: resized to fit ``canvas`` (aspect kept), centred, cut in ``tile`` squares."""
    ch, cw = canvas
    if cw / width < ch / height:
        new_w, new_h = cw, min(math.ceil(height * cw / width), ch)
    else:
        new_h, new_w = ch, min(math.ceil(width * ch / height), cw)
    top, left = (ch - new_h) // 2, (cw - new_w) // 2
    return [
        ((i * tile - top) / new_h, (j * tile - left) / new_w, tile / new_h, tile / new_w)
        for i in range(ch // tile)
        for j in range(cw // tile)
    ]


def _kept(height: int, width: int, rows: int, cols: int) -> tuple[range, range]:
    """The rows and columns of the tiles' feature grid the model keeps (its ``unpad_image``)."""
    if width / height > cols / rows:
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return range(pad, rows - pad), range(cols)
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return range(rows), range(pad, cols - pad)


def anyres_layout(sizes: Sequence[tuple[int, int]], image_processor: Any, side: tuple[int, int], patch: int) -> Layout:
    """LLaVA-NeXT's layout of images of ``sizes``: the base image, then the kept rows of its tiles, each + newline.

    ``side`` is the tower's input (the tile) in pixels, ``patch`` its patch size.

    Example:
        >>> from transformers import LlavaNextImageProcessor
        >>> ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        ...     image_grid_pinpoints=[[56, 112]])
        >>> layout = anyres_layout([(60, 200)], ip, (56, 56), 14)  # a wide image: two tiles side by side
        >>> grid = layout.grids[0]
        >>> grid.t, grid.rows, grid.cols, len(layout.image_cells), layout.image_cells.count(None)
        (3, 4, 4, 34, 2)
        >>> layout.image_cells[16], layout.image_cells[23:26]  # rows 0 and 3 of the tiles are padding: cut
        ((0, 1, 1, 0), ((0, 2, 1, 3), None, (0, 1, 2, 0)))
    """
    rows, cols = side[0] // patch, side[1] // patch
    short, h, w = _size(image_processor.size)
    squashed = _resized(*((h, w) if h and w else (short, short)), image_processor.size)  # the base image
    crop = getattr(image_processor, "do_center_crop", False)
    base = _cropped(WHOLE, *squashed, image_processor.crop_size) if crop else WHOLE
    grids, cells = [], []
    for index, (height, width) in enumerate(sizes):
        from transformers.image_processing_utils import select_best_resolution  # heavy: only for LLaVA-NeXT

        canvas = tuple(select_best_resolution((height, width), image_processor.image_grid_pinpoints))
        across = canvas[1] // side[1]
        extents = [base, *_tile_extents(height, width, canvas, side[0])]
        grids.append(Grid("image", index, len(extents), rows, cols, tuple(extents)))
        cells += [(index, 0, r, c) for r in range(rows) for c in range(cols)]
        kept_rows, kept_cols = _kept(height, width, canvas[0] // side[0] * rows, across * cols)
        for r in kept_rows:
            tiles: list[Cell] = [(index, 1 + r // rows * across + c // cols, r % rows, c % cols) for c in kept_cols]
            cells += [*tiles, None]
    return Layout(tuple(grids), tuple(cells))
