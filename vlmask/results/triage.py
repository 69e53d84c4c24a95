"""A triage sweep's Dataset: the estimates of every knockout beside the exact values of those run exactly.

Exact variables hold NaN where a knockout was not run exactly (``top_changed`` becomes float
for that: 1.0, 0.0 or NaN; ``masked_token_id`` is -1 and ``masked_continuation`` empty there).
The attention-agreement variables are left out: they rank every unit by its exact effect.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from vlmask.results.schema import (
    AGREEMENT_SPEARMAN,
    AGREEMENT_SPEARMAN_ALL,
    AGREEMENT_TOP_K,
    AGREEMENT_TOP_K_ALL,
    ATTENTION_SINK,
    AUDITED,
    CONFIRMED,
    ESTIMATE_KL,
    ESTIMATE_LOGPROB_DROP,
    MASKED_CONTINUATION,
    MASKED_TOKEN_ID,
    STEP,
    TOP_CHANGED,
    TRIAGE_DESCRIPTIONS,
    knockout_dims,
)

AGREEMENT = (AGREEMENT_SPEARMAN, AGREEMENT_SPEARMAN_ALL, AGREEMENT_TOP_K, AGREEMENT_TOP_K_ALL, ATTENTION_SINK)


def with_triage(
    ds: xr.Dataset,
    estimate_kl: np.ndarray,
    estimate_logprob_drop: np.ndarray,
    confirmed: np.ndarray,
    audited: np.ndarray,
    figures: dict[str, Any],
) -> xr.Dataset:
    """``ds`` (every knockout, NaN where not run exactly) with the triage's variables and figures.

    ``estimate_* (knockout, step)`` and ``confirmed``, ``audited`` ``(knockout,)`` are row-major over
    the knockout dims; ``figures`` become attributes (numbers and strings).
    """
    dims = knockout_dims(ds)
    shape = tuple(ds.sizes[d] for d in dims)

    def unfold(rows: np.ndarray) -> np.ndarray:
        return np.moveaxis(rows.reshape(*shape, -1), -1, 0)

    exact = (confirmed | audited).reshape(shape)
    ds = ds.drop_vars([name for name in AGREEMENT if name in ds])
    ds[ESTIMATE_KL] = ((STEP, *dims), unfold(estimate_kl))
    ds[ESTIMATE_LOGPROB_DROP] = ((STEP, *dims), unfold(estimate_logprob_drop))
    ds[CONFIRMED] = (dims, confirmed.reshape(shape))
    ds[AUDITED] = (dims, audited.reshape(shape))
    mask = xr.DataArray(exact, dims=dims)
    ds[TOP_CHANGED] = ds[TOP_CHANGED].astype(float).where(mask).assign_attrs(ds[TOP_CHANGED].attrs)
    ds[MASKED_TOKEN_ID] = ds[MASKED_TOKEN_ID].where(mask, -1).assign_attrs(ds[MASKED_TOKEN_ID].attrs)
    ds[MASKED_CONTINUATION] = ds[MASKED_CONTINUATION].where(mask, "").assign_attrs(ds[MASKED_CONTINUATION].attrs)
    for name, text in TRIAGE_DESCRIPTIONS.items():
        ds[name].attrs["description"] = text
    ds.attrs.update(figures)
    ds.attrs["title"] = "triage: " + ds.attrs.get("title", "")
    return ds


def is_triage(ds: xr.Dataset) -> bool:
    """Whether ``ds`` is a triage result (some knockouts only estimated).

    Example:
        >>> is_triage(ds)
        False
    """
    return ESTIMATE_KL in ds.data_vars
