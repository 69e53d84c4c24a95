"""Compare two results token by token, e.g. the same question asked with and without an image.

Positions differ between the two (the image adds tokens), so the masked units are aligned
by content: text and special tokens by their text, in order (:class:`difflib.SequenceMatcher`),
vision units by their image, frame group and grid cell.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vlmask.errors import VlmaskError
from vlmask.results.metrics import LOGIT_METRICS
from vlmask.results.schema import (
    AGREEMENT_SPEARMAN,
    AGREEMENT_SPEARMAN_ALL,
    ATTENTION,
    ATTENTION_NORM,
    ATTR,
    HEAD,
    LAYER,
    METRIC,
    RESIDUAL,
    STEP,
    STEP_TOKEN,
    TOKEN,
    TOKEN_COL,
    TOKEN_COLS,
    TOKEN_IMAGE,
    TOKEN_KIND,
    TOKEN_ROW,
    TOKEN_ROWS,
    TOKEN_T,
    TOKEN_TEXT,
    TOKEN_VIDEO,
    TOP_CHANGED,
    VISION,
    json_attr,
)
from vlmask.viz.page import Numbers, page, write_page
from vlmask.viz.report import check_dims

log = logging.getLogger(__name__)

COMPARED = tuple(m for m in LOGIT_METRICS if m != TOP_CHANGED)
_CELL = (TOKEN_IMAGE, TOKEN_VIDEO, TOKEN_T, TOKEN_ROW, TOKEN_COL, TOKEN_ROWS, TOKEN_COLS)


def align(a: xr.Dataset, b: xr.Dataset) -> list[tuple[int, int]]:
    """Pairs ``(index in a, index in b)`` of the ``token`` dims that hold the same masked unit, in ``a``'s order.

    Text and special units are matched by their text in order (the longest matching runs
    first, as :class:`difflib.SequenceMatcher` finds them); vision units by their image or
    video, frame group and cells.

    Example:
        >>> pairs = align(ds, text_only)  # ds also masks the image's markers and rows, which text_only lacks
        >>> pairs[:2], len(pairs) == text_only.sizes["token"]
        ([(1, 0), (8, 1)], True)
    """
    pairs = []
    kind_a, kind_b = a[TOKEN_KIND].values, b[TOKEN_KIND].values
    words_a = [i for i, k in enumerate(kind_a) if k != VISION]
    words_b = [i for i, k in enumerate(kind_b) if k != VISION]
    text_a = [str(a[TOKEN_TEXT].values[i]) for i in words_a]
    text_b = [str(b[TOKEN_TEXT].values[i]) for i in words_b]
    matcher = difflib.SequenceMatcher(None, text_a, text_b, autojunk=False)
    for block in matcher.get_matching_blocks():
        pairs += [(words_a[block.a + k], words_b[block.b + k]) for k in range(block.size)]

    def cells(ds: xr.Dataset) -> dict[tuple[int, ...], int]:
        if not all(c in ds.coords for c in _CELL):
            return {}
        keys = zip(*(ds[c].values.tolist() for c in _CELL), strict=True)
        kinds = ds[TOKEN_KIND].values
        return {key: i for i, (key, kind) in enumerate(zip(keys, kinds, strict=True)) if kind == VISION}

    vision_b = cells(b)
    pairs += [(i, vision_b[key]) for key, i in cells(a).items() if key in vision_b]
    return sorted(pairs)


def compare(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Each masked token's impact in ``a`` and in ``b``, aligned by token text and order, and the difference.

    Dims ``step`` (the steps both have), ``token`` (one entry per aligned unit) and ``metric``.
    Variables ``{m}_a``, ``{m}_b`` and ``{m}_diff = {m}_a - {m}_b`` for ``m`` in ``kl``,
    ``logprob_drop``, ``prob_change_pct``; ``top_changed_a``/``_b``; and ``residual_a``,
    ``residual_b``, ``residual_diff`` at each result's final layer; where both read attention,
    ``attention_{a,b,diff}`` and ``attention_norm_{a,b,diff}`` (per unit, layer and head) and
    each side's own ``agreement_spearman[_all_layers]_{a,b}``. Coordinates ``token_a`` and
    ``token_b`` (the positions), ``token_text``, ``token_text_b`` and ``token_kind``; ``step_token_a``,
    ``step_token_b``. Attributes name both prompts and list the unmatched units as JSON.

    Example:
        >>> both = compare(ds, text_only)  # or ds.vlmask.compare(text_only)
        >>> bool((both["kl_diff"] == both["kl_a"] - both["kl_b"]).all()), both.attrs["diff"]
        (True, 'a - b')
    """
    check_dims(a)
    check_dims(b)
    pairs = align(a, b)
    if not pairs:
        raise VlmaskError(
            f"no masked token of A ({a.sizes[TOKEN]}: {_preview(a)}) matches one of B "
            f"({b.sizes[TOKEN]}: {_preview(b)}) by text or image cell: compare results of the same question"
        )
    ia, ib = (np.array(side, dtype=np.int64) for side in zip(*pairs, strict=True))
    steps = min(a.sizes[STEP], b.sizes[STEP])
    metrics = [m for m in a[METRIC].values.tolist() if m in b[METRIC].values.tolist()]

    def side(ds: xr.Dataset, index: np.ndarray) -> xr.Dataset:
        picked = ds.isel(token=index, step=slice(0, steps))
        return picked.assign_coords(token=np.arange(len(index)), step=np.arange(steps))

    sa, sb = side(a, ia), side(b, ib)
    data: dict[str, Any] = {}
    for name in COMPARED:
        data[f"{name}_a"], data[f"{name}_b"] = sa[name], sb[name]
        data[f"{name}_diff"] = sa[name] - sb[name]
    data["top_changed_a"], data["top_changed_b"] = sa[TOP_CHANGED], sb[TOP_CHANGED]
    final_a = sa[RESIDUAL].isel(layer=-1, drop=True).sel(metric=metrics)
    final_b = sb[RESIDUAL].isel(layer=-1, drop=True).sel(metric=metrics)
    data["residual_a"], data["residual_b"], data["residual_diff"] = final_a, final_b, final_a - final_b
    data |= _attention(sa, sb, a.isel(step=slice(0, steps)), b.isel(step=slice(0, steps)))
    out = xr.Dataset({k: v.reset_coords(drop=True) for k, v in data.items()})
    out = out.assign_coords(
        {
            TOKEN: np.arange(len(pairs)),
            f"{TOKEN}_a": (TOKEN, a[TOKEN].values[ia]),
            f"{TOKEN}_b": (TOKEN, b[TOKEN].values[ib]),
            TOKEN_TEXT: (TOKEN, a[TOKEN_TEXT].values[ia]),
            f"{TOKEN_TEXT}_b": (TOKEN, b[TOKEN_TEXT].values[ib]),
            TOKEN_KIND: (TOKEN, a[TOKEN_KIND].values[ia]),
            f"{STEP_TOKEN}_a": (STEP, a[STEP_TOKEN].values[:steps]),
            f"{STEP_TOKEN}_b": (STEP, b[STEP_TOKEN].values[:steps]),
        }
    )
    out.attrs = _attrs(a, b, ia, ib, same=list(out["step_token_a"].values) == list(out["step_token_b"].values))
    return out


def _attention(sa: xr.Dataset, sb: xr.Dataset, a: xr.Dataset, b: xr.Dataset) -> dict[str, xr.DataArray]:
    """The aligned attention of both sides and their difference, and each side's agreement: where both read
    attention on models of the same shape (layers and heads)."""
    if not all(ATTENTION in ds and AGREEMENT_SPEARMAN in ds for ds in (a, b)):
        return {}
    if (a.sizes[LAYER], a.sizes[HEAD]) != (b.sizes[LAYER], b.sizes[HEAD]):
        return {}
    out = {}
    for name in (ATTENTION, ATTENTION_NORM):
        out[f"{name}_a"], out[f"{name}_b"], out[f"{name}_diff"] = sa[name], sb[name], sa[name] - sb[name]
    for name in (AGREEMENT_SPEARMAN, AGREEMENT_SPEARMAN_ALL):
        for side, ds in (("a", a), ("b", b)):
            out[f"{name}_{side}"] = ds[name].assign_coords(step=np.arange(ds.sizes[STEP]))
    return out


_ATTRS = (ATTR.prompt, ATTR.model, ATTR.clean_continuation, ATTR.image_files, ATTR.mask, ATTR.mask_unit)


def _attrs(a: xr.Dataset, b: xr.Dataset, ia: np.ndarray, ib: np.ndarray, same: bool) -> dict[str, Any]:
    """The comparison's attributes: both sides' provenance, and the units of each left unmatched (JSON)."""

    def unmatched(ds: xr.Dataset, matched: np.ndarray) -> str:
        left = sorted(set(range(ds.sizes[TOKEN])) - set(matched.tolist()))
        return json.dumps([[int(ds[TOKEN][i]), str(ds[TOKEN_TEXT].values[i])] for i in left])

    return {
        **{f"{key}_{s}": str(ds.attrs.get(key, "")) for s, ds in (("a", a), ("b", b)) for key in _ATTRS},
        "diff": "a - b",
        "residual_layer_a": int(a.sizes[LAYER] - 1),
        "residual_layer_b": int(b.sizes[LAYER] - 1),
        "same_continuation": int(same),
        "unmatched_a": unmatched(a, ia),
        "unmatched_b": unmatched(b, ib),
    }


def _preview(ds: xr.Dataset, n: int = 4) -> str:
    words = [repr(str(t)) for t in ds[TOKEN_TEXT].values[:n]]
    return ", ".join(words) + (", ..." if ds.sizes[TOKEN] > n else "")


def compare_data(both: xr.Dataset, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """What the compare page shows, JSON-ready: aligned tokens; per metric ``a``, ``b``, ``diff`` over (step, token)
    (the clean attention too, as ``attention`` and ``attention:norm`` at the final layer, where both read it)."""
    metrics = {name: name for name in COMPARED}
    metrics.update({f"residual:{m}": m for m in both["metric"].values.tolist()})
    values = {}
    for label, metric in metrics.items():
        parts = {}
        for s in ("a", "b", "diff"):
            da = both[f"{metric}_{s}"] if label in COMPARED else both[f"residual_{s}"].sel(metric=metric)
            parts[s] = Numbers(da.transpose(STEP, TOKEN).values)
        values[label] = parts
    for label, name in ((ATTENTION, ATTENTION), (f"{ATTENTION}:norm", ATTENTION_NORM)):
        if f"{name}_a" in both:  # the clean attention on the unit, at the final layer, mean over heads
            at = {s: both[f"{name}_{s}"].isel(layer=-1).mean(HEAD) for s in ("a", "b", "diff")}
            values[label] = {s: Numbers(da.transpose(STEP, TOKEN).values) for s, da in at.items()}
    return {
        "kind": "compare",
        "names": list(names),
        "attrs": [[str(k), str(v)] for k, v in both.attrs.items()],
        "sides": {s: {key: str(both.attrs.get(f"{key}_{s}", "")) for key in _ATTRS} for s in ("a", "b")},
        "steps": {s: [str(t) for t in both[f"step_token_{s}"].values] for s in ("a", "b")},
        "rows": {
            "pos_a": [int(p) for p in both["token_a"].values],
            "pos_b": [int(p) for p in both["token_b"].values],
            "text": [str(t) for t in both["token_text"].values],
            "text_b": [str(t) for t in both["token_text_b"].values],
            "kind": [str(k) for k in both["token_kind"].values],
        },
        "unmatched": {s: json_attr(both, f"unmatched_{s}") for s in ("a", "b")},
        "metrics": list(values),
        "values": values,
    }


def write_compare(
    a: xr.Dataset, b: xr.Dataset, path: str | Path, *, names: tuple[str, str] = ("A", "B"), overwrite: bool = False
) -> Path:
    """Write a self-contained HTML page comparing ``a`` and ``b`` token by token (see :func:`compare`).

    Example:
        >>> write_compare(ds, text_only, tmp / "compare.html", names=("image", "text")).name
        'compare.html'
    """
    html = page("compare.js", compare_data(compare(a, b), names), "vlmask compare")
    out = write_page(html, path, overwrite=overwrite)
    log.info("wrote comparison %s (%d bytes)", out, len(html))
    return out
