"""A result's report inline in Jupyter: the same self-contained page in a sandboxed iframe, no server, no network.

The page goes into the iframe's ``srcdoc`` attribute, escaped as an attribute value, so
nothing in it is markup of the notebook; ``sandbox="allow-scripts"`` (without
``allow-same-origin``) lets the report's own scripts run, in an opaque origin that cannot
reach the notebook, and the page keeps its Content-Security-Policy (no requests at all).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import xarray as xr

from vlmask.errors import VlmaskError
from vlmask.viz.report import report_html


@dataclass(frozen=True)
class Inline:
    """An HTML page that Jupyter shows inline (``_repr_html_``): a sandboxed iframe of ``page``, ``height`` px tall.

    Example:
        >>> shown = Inline("<p>hi</p>", height=200)
        >>> shown._repr_html_()[:62]
        '<iframe sandbox="allow-scripts" title="vlmask report" srcdoc="'
    """

    page: str
    height: int = 900

    def _repr_html_(self) -> str:
        return (
            f'<iframe sandbox="allow-scripts" title="vlmask report" srcdoc="{html.escape(self.page, quote=True)}" '
            f'style="width: 100%; height: {self.height}px; border: 1px solid #ccc"></iframe>'
        )


def show(ds: xr.Dataset, height: int = 900) -> Inline:
    """The result's interactive report, to show inline in a notebook (the last expression of a cell).

    Example:
        >>> show(ds, height=600).height  # in Jupyter: ds.vlmask.show()
        600
    """
    if isinstance(height, bool) or not isinstance(height, int) or height < 100:
        raise VlmaskError(f"height must be a whole number of pixels, at least 100, got {height!r}")
    return Inline(report_html(ds), height)
