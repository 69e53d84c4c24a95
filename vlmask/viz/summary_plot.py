"""Draw a cross-prompt summary: the mean effect along one grouping, a line per other cell, with CI bands (PNG)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vlmask.errors import VlmaskError
from vlmask.results.io import atomic_write, refuse_existing

log = logging.getLogger(__name__)

MAX_LINES = 12  # more lines than this are unreadable: summarize by fewer groupings


def _order(labels: np.ndarray) -> np.ndarray:
    """Layer and window labels in layer order (``3``, ``10``, ``0-8``; ``all`` last), others as they are."""

    def key(label: Any) -> tuple[int, float, str]:
        text = str(label)
        head = text.split("-")[0]
        return (0, float(head), text) if head.lstrip("-").isdigit() else (1, 0.0, text)

    return np.array(sorted(labels, key=key), dtype=object)


def summary_figure(summary: xr.Dataset, metric: str = "kl") -> Any:
    """The matplotlib Figure of :func:`plot_summary`."""
    from matplotlib.figure import Figure

    if metric not in summary.data_vars or f"{metric}_ci_low" not in summary.data_vars:
        names = [v for v in summary.data_vars if f"{v}_ci_low" in summary.data_vars]
        raise VlmaskError(f"this summary has no metric {metric!r}: expected one of {', '.join(names)}")
    x_dim, *others = summary.attrs["by"].split(",")
    summary = summary.sel({x_dim: _order(summary[x_dim].values)})
    stacked = summary.stack(line=others) if others else summary.expand_dims(line=["all prompts"])
    if stacked.sizes["line"] > MAX_LINES:
        raise VlmaskError(
            f"{stacked.sizes['line']} lines ({', '.join(others)}) are too many to draw: at most {MAX_LINES}; "
            "summarize by fewer groupings or select some first"
        )
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    xs = np.arange(summary.sizes[x_dim])
    for k in range(stacked.sizes["line"]):
        one = stacked.isel(line=k)
        label = " / ".join(map(str, np.atleast_1d(stacked["line"].values[k])))
        (drawn,) = ax.plot(xs, one[metric].values, marker="o", label=label)
        ax.fill_between(
            xs, one[f"{metric}_ci_low"].values, one[f"{metric}_ci_high"].values, alpha=0.2, color=drawn.get_color()
        )
    ax.set_xticks(xs, [str(v) for v in summary[x_dim].values], rotation=45 if len(xs) > 8 else 0, fontsize=8)
    ax.set_xlabel(x_dim.replace("_", " "))
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    attrs = summary.attrs
    ax.set_title(
        f"{metric}: mean over {attrs['results']} results, {attrs['confidence']:.0%} bootstrap interval "
        f"({attrs['resamples']} resamples, seed {attrs['seed']}), step {attrs['step']}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_summary(summary: xr.Dataset, path: str | Path, metric: str = "kl", *, overwrite: bool = False) -> Path:
    """Write the effect along the summary's first grouping, a line (with its interval band) per other cell, as PNG.

    Example:
        >>> from vlmask import summarize
        >>> plot_summary(summarize([ds, ds], by="unit_kind", resamples=50), tmp / "summary.png").name
        'summary.png'
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    fig = summary_figure(summary, metric)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    log.info("wrote summary plot %s", path)
    return path
