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

from vlmask.batch.run import open_batch, run_batch
from vlmask.engine.knockouts import interventions_of, windows
from vlmask.engine.probe import capture_residual, positions
from vlmask.engine.sweep import sweep
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel, load_model
from vlmask.results.io import long_table, open_results, save_results
from vlmask.spec import SweepSpec
from vlmask.viz.compare import compare, write_compare
from vlmask.viz.heatmap import heatmap
from vlmask.viz.plot import plot_heatmap
from vlmask.viz.report import write_report

__all__ = [
    "SweepSpec",
    "VLModel",
    "VlmaskError",
    "capture_residual",
    "compare",
    "heatmap",
    "interventions_of",
    "load_model",
    "long_table",
    "open_batch",
    "open_results",
    "plot_heatmap",
    "positions",
    "run_batch",
    "save_results",
    "sweep",
    "windows",
    "write_compare",
    "write_report",
]
