"""Spatial heatmaps: a metric of each masked vision unit, laid out on its image's merged-token grid.

Pure functions over a result Dataset; :mod:`vlmask.viz.plot` draws them over the images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from vlmask.errors import VlmaskError
from vlmask.results.metrics import LOGIT_METRICS, VECTOR_METRICS
from vlmask.results.schema import (
    AGREEMENT_SPEARMAN,
    AGREEMENT_TOP_K,
    ATTENTION,
    ATTENTION_NORM,
    ATTENTION_SOURCE,
    ATTR,
    AUDITED,
    COL,
    CONFIRMED,
    EFFECT,
    ESTIMATE_KL,
    ESTIMATE_LOGPROB_DROP,
    HEAD,
    HEADS,
    LAYER,
    PANEL,
    RESIDUAL,
    ROW,
    SEQ_ROW,
    STEP,
    STEP_TOKEN,
    TOKEN,
    TOKEN_KIND,
    TOKEN_MEMBERS,
    VISION,
    WINDOW,
    check_result,
    vision_grids,
)

HEAD_REDUCTIONS = ("mean", "max")
METRICS = (
    *LOGIT_METRICS,
    *(f"residual:{m}" for m in VECTOR_METRICS),
    *(f"heads:{m}" for m in VECTOR_METRICS),
    ATTENTION,
    f"{ATTENTION}:norm",
    ESTIMATE_KL,
    ESTIMATE_LOGPROB_DROP,
)
FINAL_METRICS = (*LOGIT_METRICS, ESTIMATE_KL, ESTIMATE_LOGPROB_DROP)
"""Metrics of the final output (no layer): the logit metrics, and a triage result's estimates of two of them."""
ATTENTION_METRICS = {ATTENTION: ATTENTION, f"{ATTENTION}:norm": ATTENTION_NORM}
"""The clean attention views, and the variable each reads (``:max`` after either: the largest head)."""


def _layer(ds: xr.Dataset, metric: str, layer: int | str | None) -> int | None:
    """The decoder layer ``metric`` is read at (None for the final output's logit metrics)."""
    final = layer is None or str(layer).strip() == "final"
    if metric in FINAL_METRICS:
        if not final:
            raise VlmaskError(
                f"metric {metric!r} is measured on the final output, not at a layer: give no layer (or final)",
                option="layer",
            )
        return None
    last = ds.sizes[LAYER] - 1
    if final:
        return last
    try:
        index = int(layer)
    except (TypeError, ValueError):
        raise VlmaskError(
            f"layer {layer!r} is not understood: expected a layer number (0-{last}) or final", option="layer"
        ) from None
    if not 0 <= index <= last:
        raise VlmaskError(
            f"layer {index} is out of range: the result has {last + 1} decoder layers (0-{last})", option="layer"
        )
    return index


def unit_values(
    ds: xr.Dataset, metric: str = "logprob_drop", layer: int | str | None = None, step: int = 0
) -> tuple[xr.DataArray, int | None]:
    """The value of ``metric`` for every masked unit (dim ``token``), and the layer it was read at.

    ``metric`` is a logit metric (``kl``, ``logprob_drop``, ``prob_change_pct``,
    ``top_changed``: the final output, no layer), ``residual:M`` or ``heads:M`` with ``M`` one
    of ``l2``, ``cosine``, ``rel_l2`` (at ``layer``; ``final`` or None is the last decoder
    layer). ``heads:M`` is the mean over heads; ``heads:M:max`` takes the largest head.
    ``attention`` (the clean attention mass on the unit) and ``attention:norm`` (its
    value-weighted form) are read at ``layer`` too, mean over heads (``:max``: the largest head).

    Example:
        >>> values, layer = unit_values(ds, "residual:cosine", layer=2)
        >>> values.dims, layer
        (('token',), 2)
    """
    view, reduce = attention_view(metric)
    if view is not None:
        return _attention_values(ds, view, reduce, layer, step)
    name, _, rest = metric.partition(":")
    sub, _, reduce = rest.partition(":")
    known = name in FINAL_METRICS and not rest
    known |= name == RESIDUAL and sub in VECTOR_METRICS and not reduce
    known |= name == HEADS and sub in VECTOR_METRICS and reduce in ("", *HEAD_REDUCTIONS)
    if not known:
        raise VlmaskError(
            f"metric {metric!r} is not known: expected one of {', '.join(METRICS)} (heads:M:max for the largest head)",
            option="metric",
        )
    _check_step(ds, step)
    check_result(ds, name)
    where = _layer(ds, name, layer)
    if name in FINAL_METRICS:
        return ds[name].sel(step=step).astype(float), None
    values = ds[name].sel(step=step, layer=where, metric=sub)
    if name == HEADS:
        values = values.max(HEAD) if reduce == "max" else values.mean(HEAD)
    return values.astype(float), where


def _check_step(ds: xr.Dataset, step: int) -> None:
    steps = ds[STEP].values.tolist()
    if step not in steps:
        raise VlmaskError(
            f"step {step} is out of range: the result has {len(steps)} steps (0-{len(steps) - 1})", option="step"
        )


def attention_view(metric: str) -> tuple[str | None, str]:
    """The attention variable ``metric`` views and its head reduction, or ``(None, "")`` for another metric."""
    base, _, reduce = metric.rpartition(":") if metric.endswith(":max") else (metric, "", "mean")
    return ATTENTION_METRICS.get(base), reduce


def _attention_values(
    ds: xr.Dataset, name: str, reduce: str, layer: int | str | None, step: int
) -> tuple[xr.DataArray, int]:
    if name not in ds:
        raise VlmaskError(
            f"this result has no {name!r}: it was swept with attention off, or over interventions;"
            " rerun a token sweep with attention on",
            option="metric",
        )
    _check_step(ds, step)
    where = _layer(ds, name, layer)
    values = ds[name].sel(step=step, layer=where)
    return (values.max(HEAD) if reduce == "max" else values.mean(HEAD)).astype(float), where


def agreement_text(ds: xr.Dataset, layer: int, step: int, source: str = ATTENTION, effect: str = "kl") -> str:
    """The agreement of ``source`` attention at ``layer`` with the knockout ``effect``, in words.

    Example:
        >>> agreement_text(ds, 3, 0).startswith("attention vs kl at layer 3: Spearman ")
        True
    """
    at = {STEP: step, LAYER: layer, ATTENTION_SOURCE: source, EFFECT: effect}
    rho = float(ds[AGREEMENT_SPEARMAN].sel(at))
    top = ds[AGREEMENT_TOP_K].sel(at)
    overlaps = ", ".join(f"top-{int(k)} {float(top.sel(k=k)):.0%}" for k in top["k"].values)
    return f"{source} vs {effect} at layer {layer}: Spearman {rho:+.2f}, overlap {overlaps}"


def _members(text: str) -> list[int]:
    return [int(p) for p in str(text).split(",") if p]


def panels(ds: xr.Dataset) -> list[dict[str, int | str]]:
    """One panel per image (per tile, LLaVA-NeXT) and video frame group: ``source, index, t, rows, cols``, in order.

    Example:
        >>> panels(ds)
        [{'source': 'image', 'index': 0, 'rows': 4, 'cols': 4, 't': 0}]
    """
    if ATTR.vision_grids not in ds.attrs or SEQ_ROW not in ds.coords:
        version = ds.attrs.get(ATTR.schema_version, "unknown")
        raise VlmaskError(f"this result (schema {version}) has no vision-token grid: rerun it with this vlmask")
    out = []
    for grid in vision_grids(ds):
        for t in range(grid.t):  # an image's t counts its panels (1, or LLaVA-NeXT's base image and tiles)
            out.append({"source": grid.source, "index": grid.index, "rows": grid.rows, "cols": grid.cols, "t": t})
    return out


def heatmap(
    ds: xr.Dataset, metric: str = "logprob_drop", layer: int | str | None = None, step: int = 0
) -> xr.DataArray:
    """``metric`` of each masked vision unit, painted on the cells of its members: dims ``panel, row, col``.

    A panel is an image or one frame group of a video (coordinates ``panel_source``,
    ``panel_index``, ``panel_t``, ``panel_rows``, ``panel_cols``); rows and columns are the
    merged-token grid, padded with NaN to the largest panel. Cells whose tokens were not
    masked are NaN. Every cell of a unit (a row, a region, a whole image) gets the unit's value.

    Example:
        >>> heat = heatmap(ds, "kl")  # or ds.vlmask.heatmap("kl")
        >>> heat.dims, heat.shape, int(heat.notnull().sum())  # one 4x4 image, every cell masked
        (('panel', 'row', 'col'), (1, 4, 4), 16)
    """
    check_result(ds)
    if TOKEN not in ds.dims or WINDOW in ds.dims:
        raise VlmaskError(
            "a heatmap needs a token sweep at one set of layers: this result has dims"
            f" {sorted(ds.dims)}; select one window first, like ds.sel(window=3)"
        )
    values, where = unit_values(ds, metric, layer, step)
    vision = ds[TOKEN_KIND].values == VISION
    if not vision.any():
        raise VlmaskError(
            "this result has no masked vision tokens to draw: run the sweep with an image or video and mask vision"
        )
    layout = panels(ds)
    index = {(p["source"], p["index"], p["t"]): i for i, p in enumerate(layout)}
    rows = max(p["rows"] for p in layout)
    cols = max(p["cols"] for p in layout)
    grid = np.full((len(layout), rows, cols), np.nan)
    seq = {name: ds[f"seq_{name}"].values for name in ("image", "video", "t", "row", "col")}
    for unit, value in zip(ds[TOKEN_MEMBERS].values[vision], values.values[vision], strict=True):
        for pos in _members(unit):
            source = "image" if seq["image"][pos] >= 0 else "video"
            panel = index[(source, int(seq[source][pos]), int(seq["t"][pos]))]
            grid[panel, seq["row"][pos], seq["col"][pos]] = value
    return xr.DataArray(
        grid,
        dims=(PANEL, ROW, COL),
        coords={
            PANEL: np.arange(len(layout)),
            **{f"{PANEL}_{k}": (PANEL, [p[k] for p in layout]) for k in ("source", "index", "t", "rows", "cols")},
            ROW: np.arange(rows),
            COL: np.arange(cols),
        },
        name=metric,
        attrs={
            "metric": metric,
            "layer": "final output" if where is None else str(where),
            "step": int(step),
            "step_token": str(ds[STEP_TOKEN].sel(step=step).item()),
            "prompt": ds.attrs.get(ATTR.prompt, ""),
            "mask_unit": ds.attrs.get(ATTR.mask_unit, "token"),
            "triage": triage_note(ds, metric),
        },
    )


def triage_note(ds: xr.Dataset, metric: str) -> str:
    """What a triage result's ``metric`` shows: estimates, or exact values for some units only ("" otherwise).

    Example:
        >>> triage_note(ds, "kl")
        ''
    """
    if CONFIRMED not in ds:
        return ""
    if metric in (ESTIMATE_KL, ESTIMATE_LOGPROB_DROP):
        return "triage estimate (first order, every unit)"
    exact = ds[CONFIRMED] | ds[AUDITED]
    return f"triage: exact for {int(exact.sum())} of {exact.size} units (confirmed and audited), the rest not run"


def cell_colors(heat: np.ndarray, rgba: Sequence[np.ndarray] | np.ndarray, alpha: float) -> np.ndarray:
    """``(rows, cols, 4)`` overlay colours: the colour map's RGB of each cell, opacity ``alpha`` (0 where NaN).

    ``rgba`` is the colour map already applied to the normalised values, ``(rows, cols, 4)``.

    Example:
        >>> cell_colors(np.array([[np.nan, 1.0]]), np.ones((1, 2, 4)), 0.5)[0, :, 3].tolist()
        [0.0, 0.5]
    """
    out = np.array(rgba, dtype=float, copy=True)
    out[..., 3] = np.where(np.isnan(heat), 0.0, alpha)
    return out


def paint(image: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Blend per-cell ``colors (rows, cols, 4)`` over ``image (H, W, 3)`` uint8, cells mapped proportionally.

    The processor resizes an image to multiples of 32 pixels before cutting it into the
    grid, so cell ``(r, c)`` covers rows ``r*H/rows .. (r+1)*H/rows`` (and likewise the
    columns) of the original image.

    Example:
        >>> colors = np.zeros((1, 2, 4)); colors[0, 1] = [1, 0, 0, 1]
        >>> paint(np.zeros((2, 4, 3), np.uint8), colors)[0, :, 0].tolist()
        [0, 0, 255, 255]
    """
    height, width = image.shape[:2]
    rows, cols = colors.shape[:2]
    ys = np.minimum(np.arange(height) * rows // height, rows - 1)
    xs = np.minimum(np.arange(width) * cols // width, cols - 1)
    per_pixel = colors[ys][:, xs]  # (H, W, 4)
    alpha = per_pixel[..., 3:]
    blended = (1 - alpha) * image.astype(float) + alpha * per_pixel[..., :3] * 255
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def panel_box(extent: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` of a panel's ``extent`` on a ``width x height`` picture.

    ``extent`` is ``(top, left, height, width)`` in fractions of the original image (see
    :class:`~vlmask.inputs.grid.Grid`); a box reaching past the picture is where the processor
    padded (PIL's ``crop`` fills it with black, as the processor does).

    Example:
        >>> panel_box((0.0, 0.0, 1.0, 1.0), 200, 100)  # the whole picture
        (0, 0, 200, 100)
        >>> panel_box((-0.5, 0.5, 2.0, 0.5), 200, 100)  # a right-hand tile, padded above and below
        (100, -50, 200, 150)
    """
    top, left, rows, cols = extent
    return (
        round(left * width),
        round(top * height),
        round((left + cols) * width),
        round((top + rows) * height),
    )
