"""The interactive HTML report of one result: token strip, token x layer and layer x head heatmaps, images.

:func:`report_data` gathers what the page shows from a result Dataset (pure, apart from
reading the recorded images); :func:`write_report` writes the self-contained page.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from PIL import Image

from vlmask.errors import VlmaskError
from vlmask.inputs.video import frame_paths, video_hash
from vlmask.results.metrics import LOGIT_METRICS
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
    recorded_media,
)
from vlmask.viz.heatmap import panels
from vlmask.viz.page import Numbers, page, write_page

log = logging.getLogger(__name__)

MAX_SIDE = 1024  # larger pictures are shrunk to this many pixels on their longest side
ORDER = {RESIDUAL: (STEP, TOKEN, LAYER, METRIC), HEADS: (STEP, TOKEN, LAYER, HEAD, METRIC)}
"""The dims the pages lay the vector metrics out in (row-major), and the only ones they accept."""
BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def _text(values: Any) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def _ints(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).tolist()]


def _data_uri(path: Path) -> str:
    """``path`` as a ``data:`` URI, re-encoded as PNG only if browsers can't show it or it is large."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as picture:
        mime = BROWSER_FORMATS.get(picture.format or "")
        if mime is None or max(picture.size) > MAX_SIDE:
            picture = picture.convert("RGB")
            picture.thumbnail((MAX_SIDE, MAX_SIDE))
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            raw, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _picture(
    path: Path, actual: str | None, expected: str, what: str, shown: Path | None = None
) -> tuple[str | None, str]:
    """(data URI of ``shown`` or None, note) for a recorded file or directory whose SHA-256 should be ``expected``."""
    if actual is None:
        return None, f"{what} '{path}' recorded in the result is not readable here: the cells are drawn on a blank grid"
    if actual != expected:
        return None, (
            f"{what} '{path}' has changed since the sweep (SHA-256 {actual[:12]}..., recorded {expected[:12]}...): "
            "not shown, the cells are drawn on a blank grid"
        )
    try:
        return _data_uri(shown or path), ""
    except OSError as err:
        return None, f"{what} '{path}' cannot be read as an image ({err}): the cells are drawn on a blank grid"


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _dir_hash(path: Path) -> str | None:
    try:
        return video_hash(path) if path.is_dir() else None
    except Exception:  # an unreadable directory is reported as a note, never an error
        return None


def picture_panels(ds: xr.Dataset) -> list[dict[str, Any]]:
    """One entry per image and video frame group: its grid, a label, and its picture as a data URI (or a note).

    Pictures are read from the paths recorded in ``ds`` and shown only if their SHA-256 still
    matches; otherwise ``src`` is None and ``note`` says why.

    Example:
        >>> [(p["label"], p["src"] is not None) for p in picture_panels(ds)]
        [('image 0: shapes.png', True)]
    """
    if ATTR.vision_grids not in ds.attrs or SEQ_ROW not in ds.coords:
        return []
    media = recorded_media(ds)
    image_files = [f.path for f in media.images]
    per_group = media.frames_per_group
    images = [_picture(Path(f.path), _file_hash(Path(f.path)), f.sha256, "image file") for f in media.images]
    videos = [(Path(v.path), _dir_hash(Path(v.path)), v.sha256) for v in media.videos]
    out = []
    for panel in panels(ds):
        index, t = int(panel["index"]), int(panel["t"])
        if panel["source"] == "image":
            label = f"image {index}: {Path(image_files[index]).name}" if index < len(image_files) else f"image {index}"
            src, note = images[index] if index < len(images) else (None, f"image {index} is not recorded")
        else:
            label = f"video {index}: frame group {t}"
            src, note = None, f"video {index} is not recorded"
            if index < len(videos):
                path, actual, expected = videos[index]
                frames = frame_paths(path) if actual is not None else [path]
                first = frames[min(t * per_group, len(frames) - 1)]
                src, note = _picture(path, actual, expected, "video directory", first)
        out.append({**panel, "label": label, "src": src, "note": note})
    return out


def check_dims(ds: xr.Dataset) -> None:
    """Refuse a result the pages cannot lay out: they show a sweep over masked tokens, one knockout per token.

    Example:
        >>> check_dims(xr.Dataset({"kl": (("step", "token"), [[0.0]])}))
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: this is not a vlmask result: it has no 'residual' variable
    """
    for name in (RESIDUAL, HEADS, KL):
        if name not in ds:
            raise VlmaskError(f"this is not a vlmask result: it has no {name!r} variable")
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
    for name in LOGIT_METRICS:
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
        "attrs": [[str(k), _attr(v)] for k, v in ds.attrs.items()],
        "layers": int(ds.sizes[LAYER]),
        "heads": int(ds.sizes[HEAD]),
        "metrics": _text(ds[METRIC].values),
        "logit_metrics": [name for name in LOGIT_METRICS if name in ds],
        "steps": {"token": _text(ds[STEP_TOKEN].values), "id": _ints(ds[STEP_TOKEN_ID].values)},
        "seq": {name: _text(da.values) if name in ("text", "kind") else _ints(da.values) for name, da in seq.items()},
        "units": {
            "pos": _ints(ds[TOKEN].values),
            "text": _text(ds[TOKEN_TEXT].values),
            "kind": _text(ds[TOKEN_KIND].values),
            "members": members,
            "continuation": _text(ds[MASKED_CONTINUATION].values),
            "changed": [[int(i) != c for i, c in zip(row, clean, strict=True)] for row in masked_ids],
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
    html = page("report.js", report_data(ds), "vlmask report")
    out = write_page(html, path, overwrite=overwrite)
    log.info("wrote report %s (%d bytes)", out, len(html))
    return out
