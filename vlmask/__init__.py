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

import vlmask.viz.accessor  # noqa: F401  (registers the ``ds.vlmask`` accessor)
from vlmask.batch.run import open_batch, run_batch
from vlmask.batch.summary import summarize
from vlmask.engine.probe import capture_residual, positions
from vlmask.engine.sweep import sweep
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel, load_model
from vlmask.results.io import long_table as long_table  # the free functions behind ds.vlmask: thin aliases
from vlmask.results.io import open_results, save_results
from vlmask.results.schema import interventions_of as interventions_of
from vlmask.spec import SweepSpec, windows
from vlmask.viz.compare import compare
from vlmask.viz.compare import write_compare as write_compare
from vlmask.viz.heatmap import heatmap as heatmap
from vlmask.viz.plot import plot_heatmap as plot_heatmap
from vlmask.viz.report import write_report as write_report

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
