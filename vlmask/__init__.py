"""vlmask: which tokens (words or image patches) does a vision-language model use?

Attention knockout on Qwen3-VL (and Qwen2.5-VL, Qwen2-VL, text-only Qwen3 and Llama: see
:mod:`vlmask.model.families`) through nnsight, with results as a labeled xarray Dataset.

Example:
    >>> import vlmask
    >>> vl = vlmask.load_model()  # the built-in toy checkpoint; or "Qwen/Qwen3-VL-2B-Instruct"
    >>> ds = vlmask.sweep(vl, "what color is the circle ?", ["examples/shapes.png"], mask="vision", progress=False)
    >>> best = ds["logprob_drop"].sel(step=0).idxmax("token")  # the most-used vision token
    >>> int(best), int(ds["token_row"].sel(token=best)), int(ds["token_col"].sel(token=best))  # the circle's cell
    (4, 0, 1)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmask.batch.run import open_batch, run_batch
    from vlmask.batch.summary import summarize
    from vlmask.engine.probe import capture_residual, positions
    from vlmask.engine.sweep import sweep
    from vlmask.errors import VlmaskError
    from vlmask.model.load import VLModel, load_model
    from vlmask.results.io import long_table as long_table
    from vlmask.results.io import open_results, save_results
    from vlmask.results.schema import interventions_of as interventions_of
    from vlmask.spec import SweepSpec, windows
    from vlmask.viz.compare import compare
    from vlmask.viz.compare import write_compare as write_compare
    from vlmask.viz.heatmap import heatmap as heatmap
    from vlmask.viz.plot import plot_heatmap as plot_heatmap
    from vlmask.viz.report import write_report as write_report

_HOMES = {
    "open_batch": "batch.run",
    "run_batch": "batch.run",
    "summarize": "batch.summary",
    "capture_residual": "engine.probe",
    "positions": "engine.probe",
    "sweep": "engine.sweep",
    "VlmaskError": "errors",
    "VLModel": "model.load",
    "load_model": "model.load",
    "long_table": "results.io",  # the free functions behind ds.vlmask: thin aliases
    "open_results": "results.io",
    "save_results": "results.io",
    "interventions_of": "results.schema",
    "SweepSpec": "spec",
    "windows": "spec",
    "compare": "viz.compare",
    "write_compare": "viz.compare",
    "heatmap": "viz.heatmap",
    "plot_heatmap": "viz.plot",
    "write_report": "viz.report",
}
"""Each public name's module, imported on first use: ``import vlmask`` (and the command line's
``--help``) stays quick, and torch loads when a name that needs it is first used. The ``ds.vlmask``
accessor is registered when xarray is imported, before any Dataset can exist."""


class _AccessorWithXarray(importlib.abc.MetaPathFinder):
    """Registers the ``ds.vlmask`` accessor as soon as xarray is imported (``import vlmask`` does not import it)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "xarray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenAccessor(spec.loader)
        return spec


class _ThenAccessor(importlib.abc.Loader):
    """xarray's own loader, then the accessor's import."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        importlib.import_module("vlmask.viz.accessor")


if "xarray" in sys.modules:
    importlib.import_module("vlmask.viz.accessor")
else:
    sys.meta_path.insert(0, _AccessorWithXarray())


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vlmask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vlmask.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


# Grouped by what a user does, like xarray's; the methods of one result are ds.vlmask.* (heatmap, plot,
# report, table, interventions, compare, write_compare), whose free functions stay importable from here.
__all__ = [  # noqa: RUF022
    # models
    "VLModel",
    "load_model",
    # sweeps: ds = sweep(vl, prompt, images, ...) or sweep(vl, SweepSpec(...)); what to mask, at which layers
    "SweepSpec",
    "capture_residual",
    "positions",
    "sweep",
    "windows",
    # results: files, and two results side by side (one result's methods are ds.vlmask.*)
    "compare",
    "open_results",
    "save_results",
    # batches of sweeps from a YAML file, and statistics over many results
    "open_batch",
    "run_batch",
    "summarize",
    # the one exception type
    "VlmaskError",
]
