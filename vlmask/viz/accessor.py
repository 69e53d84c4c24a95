"""``ds.vlmask``: the functions that take a result first, as methods of the Dataset (an xarray accessor).

``import vlmask`` registers it. It lives in ``vlmask.viz``, the lowest layer that sees every
function it delegates to (heatmaps, pages and the comparison are viz; the long table and the
readers are results): an accessor in ``vlmask.results`` would have to import viz, a layer above it.

Example:
    >>> ds.vlmask.heatmap("kl").dims
    ('panel', 'row', 'col')
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

if TYPE_CHECKING:
    import pandas as pd

    from vlmask.viz.notebook import Inline

# Each method imports its free function when called: registering the accessor (on importing xarray)
# must not import the modules behind it, which import xarray themselves.


@xr.register_dataset_accessor("vlmask")
class VlmaskAccessor:
    """The methods of a vlmask result Dataset, ``ds.vlmask.*``; each is the free function of the same job."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def heatmap(self, metric: str = "logprob_drop", layer: int | str | None = None, step: int = 0) -> xr.DataArray:
        """``metric`` of each masked vision unit on its image's grid: dims ``panel, row, col`` (:func:`heatmap`).

        Example:
            >>> heat = ds.vlmask.heatmap("residual:cosine", layer=2)
            >>> heat.sizes["panel"], heat.attrs["layer"]
            (1, '2')
        """
        from vlmask.viz.heatmap import heatmap

        return heatmap(self._ds, metric, layer, step)

    def plot(
        self,
        path: str | Path,
        metric: str = "logprob_drop",
        layer: int | str | None = None,
        step: int = 0,
        *,
        overwrite: bool = False,
        cmap: str = "inferno",
        alpha: float = 0.6,
    ) -> Path:
        """Write the heatmap over the images as a PNG (:func:`~vlmask.viz.plot.plot_heatmap`).

        Example:
            >>> ds.vlmask.plot(tmp / "run.png", metric="kl").name
            'run.png'
        """
        from vlmask.viz.plot import plot_heatmap

        return plot_heatmap(self._ds, path, metric, layer, step, overwrite=overwrite, cmap=cmap, alpha=alpha)

    def report(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the interactive HTML report (:func:`~vlmask.viz.report.write_report`).

        Example:
            >>> ds.vlmask.report(tmp / "run.html").stat().st_size > 10_000
            True
        """
        from vlmask.viz.report import write_report

        return write_report(self._ds, path, overwrite=overwrite)

    def show(self, height: int = 900) -> Inline:
        """The interactive report inline in Jupyter: a sandboxed iframe, no server (:func:`~vlmask.viz.notebook.show`).

        Example:
            >>> ds.vlmask.show()._repr_html_().startswith("<iframe sandbox")
            True
        """
        from vlmask.viz.notebook import show

        return show(self._ds, height)

    def table(self) -> pd.DataFrame:
        """The long table: one row per step x token x layer [x head] x metric (:func:`~vlmask.results.io.long_table`).

        Example:
            >>> ds.vlmask.table()["variable"].unique().tolist()
            ['residual', 'heads', 'logits']
        """
        from vlmask.results.io import long_table

        return long_table(self._ds)

    def interventions(self) -> tuple[Any, xr.DataArray]:
        """The base and each knockout, rebuilt (:func:`~vlmask.results.schema.interventions_of`).

        Example:
            >>> base, knockouts = ds.vlmask.interventions()
            >>> knockouts.dims, type(knockouts.values[0]).__name__
            (('token',), 'BlockKeys')
        """
        from vlmask.results.schema import interventions_of

        return interventions_of(self._ds)

    def compare(self, other: xr.Dataset) -> xr.Dataset:
        """Each masked token's impact here and in ``other``, aligned, and the difference (:func:`compare`).

        Example:
            >>> both = ds.vlmask.compare(text_only)
            >>> set(both["token_kind"].values.tolist())
            {'text'}
        """
        from vlmask.viz.compare import compare

        return compare(self._ds, other)

    def write_compare(
        self,
        other: xr.Dataset,
        path: str | Path,
        *,
        names: tuple[str, str] = ("A", "B"),
        overwrite: bool = False,
    ) -> Path:
        """Write the HTML page comparing this result with ``other`` (:func:`~vlmask.viz.compare.write_compare`).

        Example:
            >>> ds.vlmask.write_compare(text_only, tmp / "compare.html", names=("image", "text")).name
            'compare.html'
        """
        from vlmask.viz.compare import write_compare

        return write_compare(self._ds, other, path, names=names, overwrite=overwrite)
