"""The interactive HTML report of one result: token strip, token x layer and layer x head heatmaps, images.

:func:`report_data` gathers what the page shows from a result Dataset (pure, apart from
reading the recorded images); :func:`write_report` writes the self-contained page.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from PIL import Image

from vlmask.errors import VlmaskError
from vlmask.inputs.grid import WHOLE, Extent
from vlmask.inputs.media import open_image
from vlmask.inputs.video import frame_paths
from vlmask.results.schema import (
    AGREEMENT_SPEARMAN,
    AGREEMENT_SPEARMAN_ALL,
    AGREEMENT_TOP_K,
    ATTENTION,
    ATTENTION_NORM,
    ATTENTION_SOURCE,
    ATTR,
    EFFECT,
    HEAD,
    HEADS,
    KL,
    LAYER,
    MASKED_CONTINUATION,
    MASKED_TOKEN_ID,
    METRIC,
    RESIDUAL,
    SEQ,
    SEQ_ROW,
    STEP,
    STEP_TOKEN,
    STEP_TOKEN_ID,
    TOKEN,
    TOKEN_KIND,
    TOKEN_MEMBERS,
    TOKEN_TEXT,
    WINDOW,
    RecordedFile,
    check_result,
    recorded_media,
    vision_grids,
)
from vlmask.viz.heatmap import FINAL_METRICS as FINAL
from vlmask.viz.heatmap import panel_box, panels
from vlmask.viz.page import Numbers, page, write_page
from vlmask.viz.sources import locate

log = logging.getLogger(__name__)

MAX_SIDE = 1024  # larger pictures are shrunk to this many pixels on their longest side
ORDER = {RESIDUAL: (STEP, TOKEN, LAYER, METRIC), HEADS: (STEP, TOKEN, LAYER, HEAD, METRIC)}
"""The dims the pages lay the vector metrics out in (row-major), and the only ones they accept."""
BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def _text(values: Any) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def _continuation_label(ds: xr.Dataset) -> str:
    """What the clean continuation is: greedy, or an answer's tokens forced (then greedy)."""
    forced = ds.attrs.get(ATTR.measured_token) == "answer"
    return "clean continuation (the answer's tokens, then greedy)" if forced else "clean continuation"


def _ints(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).tolist()]


def _data_uri(path: Path, extent: Extent = WHOLE) -> str:
    """``path`` (its ``extent`` region) as a ``data:`` URI of the pixels the model saw.

    The file's own bytes when a browser shows them alike; re-encoded when it would not (an EXIF
    orientation the browser would apply again, an animation, a format browsers lack), it is large,
    or it is cut to a region (LLaVA's crop, a LLaVA-NeXT tile).
    """
    picture, orientation, frames = open_image(path)
    with Image.open(path) as handle:  # its header: open_image has vetted its size
        source_format = handle.format or ""
    mime = BROWSER_FORMATS.get(source_format)
    if mime is not None and orientation == 1 and frames == 1 and max(picture.size) <= MAX_SIDE and extent == WHOLE:
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    picture = picture if extent == WHOLE else picture.crop(panel_box(extent, *picture.size))
    picture.thumbnail((MAX_SIDE, MAX_SIDE))
    encoding = "JPEG" if source_format == "JPEG" else "PNG"
    buffer = io.BytesIO()
    picture.save(buffer, format=encoding, **({"quality": 92} if encoding == "JPEG" else {}))
    return f"data:image/{encoding.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


BLANK = "the cells are drawn on a blank grid"


def _shown(path: Path | None, why: str, extent: Extent = WHOLE) -> tuple[str | None, str]:
    """(data URI or None, note) of a located picture: ``path`` is None where the file was not found."""
    if path is None:
        return None, f"{why}: not shown, {BLANK}"
    try:
        return _data_uri(path, extent), ""
    except (OSError, VlmaskError) as err:
        return None, f"'{path}' cannot be read as an image ({err}): {BLANK}"


def _video_picture(ds: xr.Dataset, video: RecordedFile, t: int, per_group: int) -> tuple[str | None, str]:
    """The first frame of frame group ``t`` of a recorded video, as :func:`_shown` gives it."""
    path, why = locate(ds, video, "video directory")
    if path is None:
        return _shown(None, why)
    frames = frame_paths(path)
    return _shown(frames[min(t * per_group, len(frames) - 1)], "")


def picture_panels(ds: xr.Dataset) -> list[dict[str, Any]]:
    """One entry per image and video frame group: its grid, a label, and its picture as a data URI (or a note).

    Pictures are found as :func:`~vlmask.viz.sources.locate` says (beside the result, absolute,
    as recorded) and shown only if their SHA-256 still matches, as the model saw them (EXIF
    orientation applied, frame 0 of an animation); otherwise ``src`` is None and ``note`` says why.

    Example:
        >>> [(p["label"], p["src"] is not None) for p in picture_panels(ds)]
        [('image 0: shapes.png', True)]
    """
    if ATTR.vision_grids not in ds.attrs or SEQ_ROW not in ds.coords:
        return []
    media = recorded_media(ds)
    located = [locate(ds, f, "image file") for f in media.images]
    grids = {g.index: g for g in vision_grids(ds) if g.source == "image"}
    out = []
    for panel in panels(ds):
        index, t = int(panel["index"]), int(panel["t"])
        if panel["source"] == "image":
            recorded = index < len(media.images)
            label = f"image {index}: {Path(media.images[index].path).name}" if recorded else f"image {index}"
            src, note = None, f"image {index} is not recorded"
            if recorded:
                src, note = _shown(*located[index], extent=grids[index].extent(t))
                label += "" if grids[index].t == 1 else " (base image)" if t == 0 else f" (tile {t})"
        else:
            label = f"video {index}: frame group {t}"
            src, note = None, f"video {index} is not recorded"
            if index < len(media.videos):
                src, note = _video_picture(ds, media.videos[index], t, media.frames_per_group)
        out.append({**panel, "label": label, "src": src, "note": note})
    return out


def check_dims(ds: xr.Dataset) -> None:
    """Refuse a result the pages cannot lay out: they show a sweep over masked tokens, one knockout per token.

    Example:
        >>> check_dims(xr.Dataset({"kl": (("step", "token"), [[0.0]])}, attrs={"schema_version": 3}))
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: this is not a complete vlmask result: it has no 'residual' variable (it has: kl)
    """
    check_result(ds, RESIDUAL, HEADS, KL)
    for name, dims in (*ORDER.items(), (KL, (STEP, TOKEN))):
        if set(ds[name].dims) != set(dims):
            extra = " (pick one window first: ds.isel(window=i))" if WINDOW in ds[name].dims else ""
            raise VlmaskError(
                f"{name} has dims ({', '.join(map(str, ds[name].dims))}): the report shows results over masked tokens "
                f"with dims ({', '.join(dims)}){extra}"
            )


def _attr(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    return str(value.item() if isinstance(value, np.generic) else value)


def report_data(ds: xr.Dataset) -> dict[str, Any]:
    """What the report page shows, as JSON-ready values: tokens, masked units, metrics, images, attributes.

    Metric arrays are flat, row-major over ``(step, token, layer, metric)`` for ``residual``,
    ``(step, token, layer, head, metric)`` for ``heads`` and ``(step, token)`` for the logit
    metrics, rounded to 4 significant digits.

    Example:
        >>> data = report_data(ds)
        >>> data["layers"], data["heads"], len(data["units"]["pos"]) == ds.sizes["token"]
        (4, 8, True)
    """
    check_dims(ds)
    values: dict[str, Numbers] = {name: Numbers(ds[name].transpose(*dims).values) for name, dims in ORDER.items()}
    for name in FINAL:
        if name in ds:
            values[name] = Numbers(ds[name].transpose(STEP, TOKEN).values.astype(np.float32))
    seq = {name: ds[f"{SEQ}_{name}"] for name in ("text", "kind", "image", "video", "t", "row", "col")}
    members = [[int(p) for p in str(m).split(",") if p] for m in ds[TOKEN_MEMBERS].values]
    masked_ids = ds[MASKED_TOKEN_ID].transpose(TOKEN, STEP).values.tolist()
    clean = _ints(ds[STEP_TOKEN_ID].values)
    return {
        "kind": "report",
        "prompt": str(ds.attrs.get(ATTR.prompt, "")),
        "model": str(ds.attrs.get(ATTR.model, "")),
        "clean_continuation": str(ds.attrs.get(ATTR.clean_continuation, "")),
        "continuation_label": _continuation_label(ds),
        "attrs": [[str(k), _attr(v)] for k, v in ds.attrs.items()],
        "layers": int(ds.sizes[LAYER]),
        "heads": int(ds.sizes[HEAD]),
        "metrics": _text(ds[METRIC].values),
        "logit_metrics": [name for name in FINAL if name in ds],
        "steps": {"token": _text(ds[STEP_TOKEN].values), "id": _ints(ds[STEP_TOKEN_ID].values)},
        "seq": {name: _text(da.values) if name in ("text", "kind") else _ints(da.values) for name, da in seq.items()},
        "units": {
            "pos": _ints(ds[TOKEN].values),
            "text": _text(ds[TOKEN_TEXT].values),
            "kind": _text(ds[TOKEN_KIND].values),
            "members": members,
            "continuation": _text(ds[MASKED_CONTINUATION].values),
            "changed": [[0 <= int(i) != c for i, c in zip(row, clean, strict=True)] for row in masked_ids],
        },
        "values": values,
        "panels": picture_panels(ds),
        "attention": attention_data(ds),
    }


def attention_data(ds: xr.Dataset) -> dict[str, Any] | None:
    """The clean attention beside the knockouts, for the page (None if the sweep did not read it).

    ``mass[source]`` is the head-mean attention on each unit, flat over ``(step, token,
    layer)``; ``spearman`` flat over ``(step, layer, source, effect)``, ``spearman_all`` over
    ``(step, source, effect)``, ``top_k`` over ``(step, layer, source, effect, k)``.

    Example:
        >>> data = attention_data(ds)
        >>> data["sources"], data["effects"], data["k"]
        (['attention', 'attention_norm'], ['kl', 'logprob_drop'], [1, 5, 10])
    """
    if ATTENTION not in ds or AGREEMENT_SPEARMAN not in ds:
        return None
    order = (STEP, LAYER, ATTENTION_SOURCE, EFFECT)
    return {
        "sources": _text(ds[ATTENTION_SOURCE].values),
        "effects": _text(ds[EFFECT].values),
        "k": _ints(ds["k"].values),
        "mass": {
            name: Numbers(ds[name].mean(HEAD).transpose(STEP, TOKEN, LAYER).values)
            for name in (ATTENTION, ATTENTION_NORM)
        },
        "spearman": Numbers(ds[AGREEMENT_SPEARMAN].transpose(*order).values),
        "spearman_all": Numbers(ds[AGREEMENT_SPEARMAN_ALL].transpose(STEP, ATTENTION_SOURCE, EFFECT).values),
        "top_k": Numbers(ds[AGREEMENT_TOP_K].transpose(*order, "k").values),
    }


def report_html(ds: xr.Dataset) -> str:
    """The text of :func:`write_report`'s page (for a file, or inline in a notebook: ``ds.vlmask.show()``)."""
    return page("report.js", report_data(ds), "vlmask report")


def write_report(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write one self-contained, offline HTML report of a result (inline scripts, images embedded).

    The page shows the prompt's tokens coloured by impact, a token x layer heatmap with a
    metric and step selector, the layer x head heatmap of a clicked token, the images with
    the masked cells overlaid, the clean and the knocked-out continuations, and every
    attribute. Its URL hash keeps the view: ``report.html#metric=residual:cosine&step=1&token=5``.

    Example:
        >>> write_report(ds, tmp / "run.html") == tmp / "run.html"  # or ds.vlmask.report(...)
        True
    """
    html = report_html(ds)
    out = write_page(html, path, overwrite=overwrite)
    log.info("wrote report %s (%d bytes)", out, len(html))
    return out
