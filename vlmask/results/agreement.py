"""How far attention agrees with knockout: what the model looks at vs what it uses, per unit.

Pure functions over arrays (:func:`spearman`, :func:`top_k_overlap`, :func:`sink_flags`,
each along the last axis), and :func:`with_attention`, which adds a result's per-unit
attention and its agreement with the knockout effects to the Dataset. Attention mass of a
unit at a layer is the sum over the unit's members of the attention probability, averaged
over heads (each head's row sums to 1 over the keys, so the mean does too).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from vlmask.results.schema import (
    AGREEMENT_SPEARMAN,
    AGREEMENT_SPEARMAN_ALL,
    AGREEMENT_TOP_K,
    AGREEMENT_TOP_K_ALL,
    ATTENTION,
    ATTENTION_DESCRIPTIONS,
    ATTENTION_NORM,
    ATTENTION_NORM_SEQ,
    ATTENTION_SEQ,
    ATTENTION_SINK,
    ATTENTION_SOURCE,
    EFFECT,
    HEAD,
    KL,
    LAYER,
    LOGPROB_DROP,
    SEQ,
    STEP,
    TOKEN,
    TOKEN_MEMBERS,
    TOP_K,
)

K_VALUES = (1, 5, 10)
EFFECTS = (KL, LOGPROB_DROP)
SOURCES = {ATTENTION: ATTENTION_SEQ, ATTENTION_NORM: ATTENTION_NORM_SEQ}


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1 = smallest) along the last axis, ties given their average rank (``scipy.stats.rankdata``'s default).

    Example:
        >>> ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, axis=-1, kind="stable")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    out = np.empty(x.shape)
    n = x.shape[-1]
    flat_sorted, flat_order, flat_out = sorted_x.reshape(-1, n), order.reshape(-1, n), out.reshape(-1, n)
    for row, values in enumerate(flat_sorted):
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        ends = np.r_[starts[1:], n]
        average = (starts + ends + 1) / 2  # ranks start..end-1, 1-based, averaged
        flat_out[row, flat_order[row]] = np.repeat(average, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of ``a`` and ``b`` along the last axis (NaN where either is constant).

    Example:
        >>> float(spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 9.0])))
        1.0
    """
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(-1) / np.where(denominator > 0, denominator, 1), np.nan)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """The fraction of the ``k`` largest of ``a`` that are among the ``k`` largest of ``b``, along the last axis.

    ``k`` is capped at the axis length; equal values are ordered by position (the first one
    counts as larger), so each top-k set has exactly ``k`` members.

    Example:
        >>> float(top_k_overlap(np.array([5.0, 4.0, 1.0, 0.0]), np.array([0.0, 9.0, 8.0, 1.0]), 2))
        0.5
    """
    k = min(k, a.shape[-1])
    top_a = np.argsort(-np.asarray(a, dtype=float), axis=-1, kind="stable")[..., :k]
    top_b = np.argsort(-np.asarray(b, dtype=float), axis=-1, kind="stable")[..., :k]
    shared = (top_a[..., :, None] == top_b[..., None, :]).any(-1).sum(-1)
    return shared / k


def sink_flags(attention: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """Attention sinks along the last axis: attention at or above its 90th percentile, effect at or below its median.

    Percentiles are numpy's (linear interpolation).

    Example:
        >>> attention = np.array([0.9, 0.05, 0.03, 0.02] + [0.0] * 6)
        >>> sink_flags(attention, np.arange(10.0)).tolist()[:2]
        [True, False]
    """
    attention, effect = np.asarray(attention, dtype=float), np.asarray(effect, dtype=float)
    top = attention >= np.quantile(attention, 0.9, axis=-1, keepdims=True)
    low = effect <= np.median(effect, axis=-1, keepdims=True)
    return top & low


def _over_units(fn, attention: xr.DataArray, effect: xr.DataArray, **kw) -> xr.DataArray:
    return xr.apply_ufunc(fn, attention, effect, input_core_dims=[[TOKEN], [TOKEN]], kwargs=kw)


def _bare(values: np.ndarray, dims: tuple[str, ...]) -> xr.DataArray:
    """A DataArray without coordinates: the Dataset it joins has them (and nothing need be aligned)."""
    return xr.DataArray(values, dims=dims)


def _agreement(mass: xr.DataArray, effect: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Spearman and top-k overlap of ``mass`` with ``effect`` over ``token``: dims ``step, [layer,]
    attention_source, effect, [k,] ...``."""
    rho = _over_units(spearman, mass, effect)
    overlap = [_over_units(top_k_overlap, mass, effect, k=k) for k in K_VALUES]
    overlap = _bare(np.stack([o.values for o in overlap], axis=-1), (*overlap[0].dims, TOP_K))
    lead = [d for d in (STEP, LAYER, ATTENTION_SOURCE, EFFECT) if d in rho.dims]
    return rho.transpose(*lead, ...), overlap.transpose(*lead, TOP_K, ...)


def unit_attention(ds: xr.Dataset, name: str) -> xr.DataArray:
    """``name`` (an attention variable on ``seq``) summed over each unit's members: dims ``(..., token, ...)``."""
    members = np.zeros((ds.sizes[TOKEN], ds.sizes[SEQ]), dtype=np.float32)
    for i, text in enumerate(ds[TOKEN_MEMBERS].values):
        members[i, [int(p) for p in str(text).split(",") if p]] = 1.0
    values = ds[name].transpose(..., SEQ).values @ members.T  # (..., token)
    dims = tuple(d for d in ds[name].dims if d != SEQ)
    axis = ds[name].dims.index(SEQ)
    return _bare(np.moveaxis(values, -1, axis), (*dims[:axis], TOKEN, *dims[axis:]))


def with_attention(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its per-unit attention, agreement with the knockout effects, and sink flags.

    Needs the clean attention on ``seq`` (:data:`ATTENTION_SEQ`, :data:`ATTENTION_NORM_SEQ`)
    and a ``token`` sweep (else only the descriptions are added). Every attention variable
    gets its ``description``.

    Example:
        >>> sorted(set(with_attention(ds)[AGREEMENT_SPEARMAN].dims))
        ['attention_source', 'effect', 'layer', 'step']
    """
    if ATTENTION_SEQ not in ds or TOKEN not in ds.dims:
        return _described(ds.copy())
    units = {name: unit_attention(ds, seq_name) for name, seq_name in SOURCES.items()}
    heads = units[ATTENTION].dims.index(HEAD)
    mass_dims = (ATTENTION_SOURCE, *(d for d in units[ATTENTION].dims if d != HEAD))
    mass = _bare(np.stack([u.values.mean(heads) for u in units.values()]), mass_dims)
    effect = _bare(np.stack([ds[name].values for name in EFFECTS]), (EFFECT, *ds[EFFECTS[0]].dims))
    new = dict(units)
    new[AGREEMENT_SPEARMAN], new[AGREEMENT_TOP_K] = _agreement(mass, effect)
    new[AGREEMENT_SPEARMAN_ALL], new[AGREEMENT_TOP_K_ALL] = _agreement(mass.mean(LAYER), effect)
    raw = mass.isel({ATTENTION_SOURCE: 0})
    sinks = xr.apply_ufunc(sink_flags, raw, effect, input_core_dims=[[TOKEN], [TOKEN]], output_core_dims=[[TOKEN]])
    new[ATTENTION_SINK] = sinks.transpose(STEP, TOKEN, ...)
    coords = {ATTENTION_SOURCE: list(SOURCES), EFFECT: list(EFFECTS), TOP_K: list(K_VALUES)}
    return _described(ds.assign(new).assign_coords(coords))


def _described(ds: xr.Dataset) -> xr.Dataset:
    for name, text in ATTENTION_DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = text
    return ds
