"""Cross-prompt statistics: the mean effect of each knockout over many results, with bootstrap intervals.

A batch gives one result per prompt; a study reports, per layer window, unit kind or
intervention, the mean effect over the prompts and how sure that mean is. :func:`summarize`
turns results into that: each result is first reduced to one value per cell and prompt (the
mean over the prompt's units in the cell), then cells are averaged over prompts, with a
percentile bootstrap interval over prompts (seeded; prompts are resampled together, so
cells stay paired) and the number of prompts behind each cell.

Units are aligned across prompts by what they are, not by position: a vision unit by its
image (or video frame group, or LLaVA-NeXT tile), grid cell and extent (``image 0 r1 c2``,
``image 0 r1 c0 1x4``, ``image 0 tile 2 r0 c1``), a text or special token by its text (``text
'circle'``; repeats within a prompt are averaged), an intervention by its JSON. Results are read
one at a time and only the metric variables are loaded, so thousands of files fit in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from vlmask.batch.run import PROMPT, result_files
from vlmask.errors import VlmaskError
from vlmask.results.io import open_results
from vlmask.results.schema import (
    INTERVENTION,
    INTERVENTION_JSON,
    KL,
    LOGPROB_DROP,
    PROB_CHANGE_PCT,
    STEP,
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
    VISION,
    WINDOW,
    WINDOW_END,
    WINDOW_START,
    check_result,
)

GROUPINGS = ("unit", "unit_kind", "window", "layer", "intervention")
"""What :func:`summarize` can group by (``unit-kind`` is accepted for ``unit_kind``)."""
SUMMARY_METRICS = (KL, LOGPROB_DROP, PROB_CHANGE_PCT)
ALL_LAYERS = "all"  # the window label of a result without windows: its knockouts act at its layers


def unit_keys(ds: xr.Dataset) -> list[str]:
    """What each knockout of ``ds`` is, comparably across prompts: a vision unit's image and cell, a token's text.

    Example:
        >>> unit_keys(ds)[:4]  # this result's vision units are grid rows: 1 row x 4 columns
        ["special '<|im_start|>'", "text 'user'", "special '<|vision_start|>'", 'image 0 r0 c0 1x4']
    """
    if INTERVENTION in ds.dims:
        return [str(v) for v in ds[INTERVENTION_JSON].values]
    out = []
    for k in range(ds.sizes[TOKEN]):
        kind = str(ds[TOKEN_KIND].values[k])
        if kind != VISION:
            out.append(f"{kind} {str(ds[TOKEN_TEXT].values[k]).strip()!r}")
            continue
        row, col = int(ds[TOKEN_ROW].values[k]), int(ds[TOKEN_COL].values[k])
        video = int(ds[TOKEN_VIDEO].values[k])
        t = int(ds[TOKEN_T].values[k])
        source = (
            f"video {video} t{t}" if video >= 0 else f"image {int(ds[TOKEN_IMAGE][k])}" + (f" tile {t}" if t else "")
        )
        rows, cols = int(ds[TOKEN_ROWS].values[k]), int(ds[TOKEN_COLS].values[k])
        out.append(f"{source} r{row} c{col}" + (f" {rows}x{cols}" if (rows, cols) != (1, 1) else ""))
    return out


def _by(by: str | Sequence[str]) -> list[str]:
    names = [by] if isinstance(by, str) else list(by)
    names = [n.strip().replace("-", "_") for name in names for n in name.split(",") if n.strip()]
    bad = [n for n in names if n not in GROUPINGS]
    if bad or not names:
        raise VlmaskError(f"cannot summarize by {bad[0] if bad else by!r}: expected some of {', '.join(GROUPINGS)}")
    if len(set(names)) != len(names):
        raise VlmaskError(f"summarize by {names}: each grouping at most once")
    return names


def prompt_table(ds: xr.Dataset, step: int = 0, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One result as a long table: a row per knockout (and window) at ``step``, with its grouping keys.

    Columns: ``unit``, ``unit_kind``, ``window``, ``layer``, ``intervention`` and the metrics.

    Example:
        >>> prompt_table(ds)[["unit", "unit_kind", "window", "layer"]].iloc[3].tolist()
        ['image 0 r0 c0 1x4', 'vision', 'all', 'all']
    """
    check_result(ds, *metrics)
    if STEP not in ds.dims or not {TOKEN, INTERVENTION} & set(ds.dims):
        raise VlmaskError(
            f"this is not a sweep result: it has dims {list(ds.dims)}, not step and token (or intervention)"
        )
    if step not in ds[STEP].values:
        raise VlmaskError(f"step {step} is not in this result: it has steps {ds[STEP].values.tolist()}")
    units = unit_keys(ds)
    dim = INTERVENTION if INTERVENTION in ds.dims else TOKEN
    kinds = ["intervention"] * len(units) if dim == INTERVENTION else [str(k) for k in ds[TOKEN_KIND].values]
    at = ds[list(metrics)].sel({STEP: step}).load()
    if WINDOW in ds.dims:
        labels = [f"{a}-{b}" for a, b in zip(ds[WINDOW_START].values, ds[WINDOW_END].values, strict=True)]
        centres = [str(c) for c in ds[WINDOW].values]
        at = at.transpose(dim, WINDOW)
    else:
        labels, centres = [ALL_LAYERS], [ALL_LAYERS]
        at = at.expand_dims(WINDOW, axis=-1)
    n_windows = len(labels)
    table = {
        "unit": np.repeat(units, n_windows),
        "unit_kind": np.repeat(kinds, n_windows),
        "window": np.tile(labels, len(units)),
        "layer": np.tile(centres, len(units)),
        "intervention": np.repeat(units if dim == INTERVENTION else ["knockout"] * len(units), n_windows),
    }
    table |= {m: at[m].values.astype(np.float64).ravel() for m in metrics}
    return pd.DataFrame(table)


def bootstrap_ci(
    values: np.ndarray, resamples: int, seed: int, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean over prompts of ``values (prompt, cell)`` (NaN: no value), and its percentile bootstrap interval.

    Prompts are resampled with replacement, all cells together; a cell's mean in a resample
    is over the resampled prompts that have a value for it.

    Example:
        >>> mean, low, high = bootstrap_ci(np.array([[1.0], [3.0]]), resamples=200, seed=0)
        >>> mean.tolist(), bool(1.0 <= low[0] <= high[0] <= 3.0)
        ([2.0], True)
    """
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    means = np.empty((resamples, values.shape[1]))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell no resampled prompt has is NaN, as it should be
        for first in range(0, resamples, 64):  # in chunks: (chunk, prompt, cell) stays small
            picks = rng.integers(0, n, size=(min(64, resamples - first), n))
            means[first : first + len(picks)] = np.nanmean(values[picks], axis=1)
        tail = (1 - confidence) / 2 * 100
        low, high = np.nanpercentile(means, [tail, 100 - tail], axis=0)
        return np.nanmean(values, axis=0), low, high


def _results(sources: Any) -> Iterator[tuple[str | None, xr.Dataset]]:
    """Each result of ``sources`` with the file it came from (None for a Dataset), one at a time (files are
    opened lazily and closed after use)."""
    if isinstance(sources, (xr.Dataset, str, Path)):
        sources = [sources]
    for source in sources:
        if isinstance(source, xr.Dataset) and PROMPT in source.dims:  # open_batch's view: one prompt at a time
            for k in range(source.sizes[PROMPT]):
                one = source.isel({PROMPT: k})
                yield None, one.isel({TOKEN: one[KL].notnull().any(STEP).values}) if TOKEN in one.dims else one
        elif isinstance(source, xr.Dataset):
            yield None, source
        else:
            for path in result_files(source):
                with open_results(path) as ds:
                    yield str(path), ds


def _prompt_cells(sources: Any, names: list[str], step: int, metrics: Sequence[str]) -> list[pd.DataFrame]:
    """Per result, its mean over the units of each cell of ``names``; a bad result is an error naming its file."""
    per_prompt = []
    for k, (where, ds) in enumerate(_results(sources)):
        try:
            table = prompt_table(ds, step, metrics)
        except VlmaskError as err:
            raise VlmaskError(str(err) if where is None else f"'{where}': {err}") from None
        per_prompt.append(table.groupby(names, sort=False)[list(metrics)].mean().assign(prompt=k))
    if not per_prompt:
        raise VlmaskError("no results to summarize: give at least one result file or Dataset")
    return per_prompt


def _statistics(
    per_prompt: list[pd.DataFrame],
    names: list[str],
    metrics: Sequence[str],
    resamples: int,
    seed: int,
    confidence: float,
) -> pd.DataFrame:
    """Per cell: each metric's mean over prompts and its bootstrap interval, and how many prompts have the cell."""
    cells = pd.concat(per_prompt).reset_index().set_index(["prompt", *names])
    out = {}
    for m in metrics:
        wide = cells[m].unstack(names)  # (prompt, cell)
        mean, low, high = bootstrap_ci(wide.to_numpy(), resamples, seed, confidence)
        index = wide.columns
        out[m], out[f"{m}_ci_low"], out[f"{m}_ci_high"] = (pd.Series(v, index=index) for v in (mean, low, high))
        out["prompts"] = pd.Series(wide.notna().sum(axis=0).to_numpy(), index=index)
    return pd.DataFrame(out)


def summarize(
    sources: xr.Dataset | str | Path | Iterable[xr.Dataset | str | Path],
    by: str | Sequence[str] = "unit",
    *,
    step: int = 0,
    metrics: Sequence[str] = SUMMARY_METRICS,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> xr.Dataset:
    """The mean effect over prompts per cell of ``by``, with bootstrap intervals and prompt counts.

    Args:
        sources: results, one per prompt: Datasets (one result, or :func:`~vlmask.open_batch`'s
            view), ``.nc`` files, result directories or batch YAML files, or a list of these.
        by: one or more of :data:`GROUPINGS` (a list, or comma-separated): ``unit`` (aligned by
            image cell or token text), ``unit_kind`` (vision, text, special), ``window``
            (``start-end``), ``layer`` (the window's centre layer), ``intervention``.
        step: the generation step summarized.
        resamples: bootstrap resamples of the prompts; ``seed`` seeds numpy's generator.

    Returns:
        A Dataset on the ``by`` dims: per metric its mean, ``{metric}_ci_low`` and
        ``{metric}_ci_high``, and ``prompts`` (how many prompts have the cell).

    Example:
        >>> s = summarize([ds, ds], by="unit_kind", resamples=100)
        >>> int(s["prompts"].sel(unit_kind="vision")), sorted(s.data_vars)[:3]
        (2, ['kl', 'kl_ci_high', 'kl_ci_low'])
    """
    names = _by(by)
    if resamples < 1 or not 0 < confidence < 1:
        raise VlmaskError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples} and {confidence}")
    per_prompt = _prompt_cells(sources, names, step, metrics)
    summary = xr.Dataset.from_dataframe(_statistics(per_prompt, names, metrics, resamples, seed, confidence))
    summary.attrs = {
        "by": ",".join(names),
        "step": step,
        "resamples": resamples,
        "seed": seed,
        "confidence": confidence,
        "results": len(per_prompt),
        "method": "mean over prompts of each prompt's mean over its units in the cell; percentile bootstrap over "
        "prompts (numpy default_rng)",
    }
    return summary
