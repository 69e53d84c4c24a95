"""Draw a heatmap over the images (or video frames) the model saw, as a PNG file."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from PIL import Image

from vlmask.errors import VlmaskError
from vlmask.inputs.grid import WHOLE
from vlmask.inputs.media import open_image
from vlmask.inputs.video import frame_paths
from vlmask.results.io import atomic_write, refuse_existing
from vlmask.results.schema import (
    PANEL_COLS,
    PANEL_INDEX,
    PANEL_ROWS,
    PANEL_SOURCE,
    PANEL_T,
    RecordedFile,
    recorded_media,
    vision_grids,
)
from vlmask.viz.heatmap import agreement_text, attention_view, cell_colors, heatmap, paint, panel_box
from vlmask.viz.sources import locate

log = logging.getLogger(__name__)

MAX_SIDE = 1024  # images are drawn at most this many pixels on their longest side


def _found(ds: xr.Dataset, f: RecordedFile, what: str) -> Path:
    path, why = locate(ds, f, what)
    if path is None:
        raise VlmaskError(f"{why}: restore it or rerun the sweep")
    return path


def panel_pictures(ds: xr.Dataset, layout: xr.DataArray) -> list[tuple[Image.Image, str]]:
    """The picture under each panel of ``layout`` (a :func:`heatmap`) and its label, files checked by SHA-256.

    An image panel shows its region (LLaVA's crop, a LLaVA-NeXT tile) of the image as the model saw
    it (EXIF orientation applied, frame 0); a video frame group shows its first frame. Files are found
    as :func:`~vlmask.viz.sources.locate` says.
    """
    media = recorded_media(ds)
    grids = {g.index: g for g in vision_grids(ds) if g.source == "image"}
    images = [open_image(_found(ds, f, "image file"))[0] for f in media.images]
    videos = [_found(ds, v, "video directory") for v in media.videos]
    per_group = media.frames_per_group
    out = []
    for source, index, t in zip(
        layout[PANEL_SOURCE].values, layout[PANEL_INDEX].values, layout[PANEL_T].values, strict=True
    ):
        if source == "image":
            label, extent = f"image {index}: {Path(media.images[index].path).name}", grids[index].extent(t)
            if grids[index].t > 1:
                label += " (base image)" if t == 0 else f" (tile {t})"
            picture = images[index]
            out.append((picture if extent == WHOLE else picture.crop(panel_box(extent, *picture.size)), label))
            continue
        frames = frame_paths(videos[index])
        first = min(t * per_group, len(frames) - 1)
        last = min(first + per_group - 1, len(frames) - 1)
        out.append((open_image(frames[first])[0], f"video {index}: frames {first}-{last} (group {t})"))
    return out


def plot_heatmap(
    ds: xr.Dataset,
    path: str | Path,
    metric: str = "logprob_drop",
    layer: int | str | None = None,
    step: int = 0,
    *,
    overwrite: bool = False,
    cmap: str = "inferno",
    alpha: float = 0.6,
    versus: str = "kl",
) -> Path:
    """Write a PNG: each image (or video frame group) with ``metric`` per masked cell as a heat overlay.

    One panel per image or frame group, a colour bar shared by all panels, and a title
    with the prompt, metric, layer and step. See :func:`vlmask.heatmap` for ``metric``,
    ``layer`` and ``step``. Images are found through the paths recorded in the result and
    must still have the recorded SHA-256. The file is written atomically.

    An attention ``metric`` (``attention``, ``attention:norm``, ``:max``) is drawn side by side
    with the knockout effect ``versus`` (a logit metric), each with its own colour bar, and
    the title gives their agreement at that layer and step (Spearman, top-k overlap).

    Example:
        >>> plot_heatmap(ds, tmp / "run.png", metric="kl") == tmp / "run.png"  # or ds.vlmask.plot(...)
        True
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise VlmaskError(f"heatmap output '{path}' must end in .png")
    heat = heatmap(ds, metric, layer, step)
    pictures = panel_pictures(ds, heat)
    view, _ = attention_view(metric)
    if view is not None:
        title = agreement_text(ds, int(heat.attrs["layer"]), step, view, versus)
        fig = _pair_figure([heat, heatmap(ds, versus, None, step)], pictures, cmap, alpha, title)
    else:
        fig = _figure(heat, pictures, cmap, alpha)
    refuse_existing(path, overwrite)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    log.info("wrote heatmap %s", path)
    return path


def _figure(heat: xr.DataArray, pictures: list[tuple[Image.Image, str]], cmap: str, alpha: float) -> Any:
    """The matplotlib Figure of :func:`plot_heatmap`: a panel per picture, a shared colour bar, a title."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    metric, step = heat.attrs["metric"], heat.attrs["step"]
    finite = heat.values[np.isfinite(heat.values)]
    norm = Normalize(float(finite.min()), float(finite.max()))
    colormap = colormaps[cmap]
    cols = min(len(pictures), 4)
    rows = math.ceil(len(pictures) / cols)
    fig = Figure(figsize=(4 * cols + 1.2, 4 * rows + 1.0), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(pictures):
            continue
        picture, label = pictures[i]
        _paint_cells(ax, heat, i, picture, colormap, norm, alpha)
        ax.set_title(label, fontsize=9)
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=axes.ravel().tolist(), label=metric, shrink=0.8)
    where = heat.attrs["layer"] if heat.attrs["layer"] == "final output" else f"layer {heat.attrs['layer']}"
    fig.suptitle(
        f"{heat.attrs['prompt']!r}\n{metric}, {where}, step {step} (clean next token {heat.attrs['step_token']!r}),"
        f" unit {heat.attrs['mask_unit']}" + (f"\n{heat.attrs['triage']}" if heat.attrs.get("triage") else ""),
        fontsize=10,
    )
    return fig


def _paint_cells(
    ax: Any, heat: xr.DataArray, i: int, picture: Image.Image, colormap: Any, norm: Any, alpha: float
) -> None:
    """Draw panel ``i`` of ``heat`` over ``picture`` on ``ax``."""
    picture = picture.copy()
    picture.thumbnail((MAX_SIDE, MAX_SIDE))
    cells = heat.isel(panel=i).values[: int(heat[PANEL_ROWS][i]), : int(heat[PANEL_COLS][i])]
    colors = cell_colors(cells, colormap(norm(np.nan_to_num(cells))), alpha)
    ax.imshow(paint(np.asarray(picture), colors), interpolation="nearest")


def _pair_figure(
    heats: list[xr.DataArray], pictures: list[tuple[Image.Image, str]], cmap: str, alpha: float, agreement: str
) -> Any:
    """Side by side: a row per picture, a column per heat (attention | knockout effect), a colour bar each."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    colormap = colormaps[cmap]
    fig = Figure(figsize=(4 * len(heats) + 2.4, 4 * len(pictures) + 1.2), dpi=100)
    axes = fig.subplots(len(pictures), len(heats), squeeze=False)
    for col, heat in enumerate(heats):
        finite = heat.values[np.isfinite(heat.values)]
        norm = Normalize(float(finite.min()), float(finite.max()))
        where = heat.attrs["layer"] if heat.attrs["layer"] == "final output" else f"layer {heat.attrs['layer']}"
        for row, (picture, label) in enumerate(pictures):
            ax = axes[row, col]
            ax.set_axis_off()
            _paint_cells(ax, heat, row, picture, colormap, norm, alpha)
            ax.set_title(f"{heat.attrs['metric']} ({where})\n{label}", fontsize=9)
        fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=axes[:, col].tolist(), shrink=0.8)
    first = heats[0].attrs
    fig.suptitle(
        f"{first['prompt']!r}, step {first['step']} (clean next token {first['step_token']!r})\n{agreement}",
        fontsize=10,
    )
    return fig
