"""Batch runs: many sweeps from one YAML file, one result file each, resumable and shardable.

- Each item writes ``OUTPUT_DIR/<name>.nc``, with its settings and their hash in the attributes
  (``batch_name``, ``batch_item``, ``batch_config_hash``) and the configuration file it came
  from (``batch_config``, its absolute path).
- Rerunning skips every item whose file exists with the same hash; a changed item is rerun.
  A file of an item's name that this configuration did not write (a ``vlmask run`` result,
  another batch's) is left alone: that item fails, unless ``overwrite``.
- An item that fails is reported with its error; the others still run.
- ``shard=(i, n)`` runs the items whose index in the file is ``i`` modulo ``n``.
- Each distinct model (model, dtype, device, attention implementation) is loaded once.
- :func:`open_batch` opens every item's file as one lazy Dataset with a ``prompt`` dimension.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from vlmask.batch.config import Config, Item, read_config
from vlmask.engine.sweep import sweep
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel, load_model
from vlmask.results.io import check_destination, save_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one item: ``status`` is ``done``, ``skipped`` (up to date) or ``failed``; ``line`` is
    where the item starts in its configuration file, or in the data ``file`` of its row."""

    name: str
    status: str
    path: Path
    error: str = ""
    seconds: float = 0.0
    line: int = 0
    file: str = ""

    @staticmethod
    def failed(item: Item, path: Path, error: str) -> Outcome:
        """``item``'s failure to write ``path``, told with where the item is written."""
        return Outcome(item.name, "failed", path, error, line=item.line, file=item.file)


PROMPT = "prompt"  # the dimension of open_batch's view: one entry per result


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(i, n)`` from ``"i/n"``, with ``0 <= i < n``; ``"auto"`` reads a Slurm job array's task id and count.

    Example:
        >>> parse_shard("1/3")
        (1, 3)
        >>> parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "8"})
        (4, 8)
        >>> parse_shard("3/3")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: shard '3/3' is not understood: write i/n with 0 <= i < n, like 0/4
    """
    if text == "auto":
        return _slurm_shard(os.environ if env is None else env)
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise VlmaskError(f"shard {text!r} is not understood: write i/n with 0 <= i < n, like 0/4")
    return i, n


def _slurm_shard(env: Mapping[str, str]) -> tuple[int, int]:
    """This task's shard of a Slurm job array (``sbatch --array=0-7``): ids counted from the array's first."""
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    if any(name not in env for name in names):
        raise VlmaskError(
            "shard 'auto' reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set: run it as a task of "
            "a Slurm job array (sbatch with an array of tasks) or give i/n"
        )
    try:
        task, count = int(env[names[0]]), int(env[names[1]])
        first, stride = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
    except ValueError:
        raise VlmaskError(f"Slurm array variables are not whole numbers: {[env.get(n) for n in names]}") from None
    i, off = divmod(task - first, max(stride, 1))  # --array=0-15:4 runs tasks 0, 4, 8, 12
    if off or not 0 <= i < count:
        raise VlmaskError(f"Slurm task {task} is outside its array of {count} tasks starting at {first}")
    return i, count


def shard_items(items: Sequence[Item], shard: tuple[int, int]) -> list[Item]:
    """The items of shard ``(i, n)``: those whose index is ``i`` modulo ``n``."""
    i, n = shard
    return [item for item in items if item.index % n == i]


def provenance(path: Path) -> dict[str, str]:
    """The batch attributes of the result at ``path`` (``batch_config``, ``batch_config_hash``, ...), {} if none."""
    if not path.exists():
        return {}
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return {k: str(v) for k, v in ds.attrs.items() if k.startswith("batch_")}
    except (OSError, ValueError):
        return {}


def up_to_date(path: Path, config_hash: str) -> bool:
    """Whether ``path`` holds a result made from settings with ``config_hash``."""
    return provenance(path).get("batch_config_hash") == config_hash


def _not_ours(path: Path, item: Item, config: Path) -> str | None:
    """Why the existing file ``path`` may not be replaced by ``item`` of ``config`` (None if it may)."""
    if not path.exists():
        return None
    made = provenance(path)
    if made.get("batch_config") == str(config) and made.get("batch_name") == item.name:
        return None
    origin = f"the batch {made['batch_config']}" if "batch_config" in made else "a batch"
    return (
        f"'{path}' exists and was written by {origin if made else 'something else (not a batch)'}, not by this"
        " item: pass --overwrite (overwrite=True) to replace it, or rename the item"
    )


def _run_item(vl: VLModel, item: Item, path: Path, config: Path, progress: bool) -> None:
    ds = sweep(vl, item.spec, progress=progress)
    ds.attrs.update(
        batch_config=str(config),
        batch_name=item.name,
        batch_item=json.dumps(item.settings, sort_keys=True),
        batch_config_hash=item.config_hash,
    )
    save_results(ds, path, overwrite=True)


def _groups(
    cfg: Config, shard: tuple[int, int], out_dir: Path, overwrite: bool, record: Callable[[Item, Outcome], None]
) -> dict[tuple, list[Item]]:
    """The shard's items to run, by model; up-to-date ones are recorded as skipped, others' files as failed."""
    items = shard_items(cfg.items, shard)
    check_destination([out_dir / f"{item.name}.nc" for item in items], overwrite=True)
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        path = out_dir / f"{item.name}.nc"
        if up_to_date(path, item.config_hash):
            record(item, Outcome(item.name, "skipped", path))
        elif (why := None if overwrite else _not_ours(path, item, cfg.path.resolve())) is not None:
            record(item, Outcome.failed(item, path, why))
        else:
            groups.setdefault(item.model, []).append(item)
    return groups


def run_batch(
    config: str | Path | Config,
    output_dir: str | Path | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    load: Callable[..., Any] | None = None,
    report: Callable[[Outcome], None] | None = None,
    overwrite: bool = False,
) -> list[Outcome]:
    """Run the items of a batch configuration (or of one shard of it) and return what happened to each.

    The configuration is validated as a whole first (:class:`VlmaskError` listing every
    problem). ``output_dir`` wins over the file's ``output_dir``, which wins over
    ``output``. ``report`` is called as each item finishes; ``load`` defaults to ``load_model``.
    An item whose file exists but was not written by this configuration fails (the file is
    kept) unless ``overwrite``; an output folder that cannot take files is refused before
    any model loads.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (config := folder / "b.yaml").write_text("[{name: a, prompt: test}, {name: b, prompt: hi}]")
        >>> [o.status for o in run_batch(config, folder / "results", shard=(0, 2))]  # item a only
        ['done']
        >>> [o.status for o in run_batch(config, folder / "results")]  # a is up to date
        ['skipped', 'done']
    """
    cfg = config if isinstance(config, Config) else read_config(config)
    load = load_model if load is None else load
    out_dir = Path(output_dir) if output_dir is not None else cfg.output_dir or Path("output")
    outcomes: dict[int, Outcome] = {}

    def record(item: Item, outcome: Outcome) -> None:
        outcomes[item.index] = outcome
        if report is not None:
            report(outcome)

    for model, items in _groups(cfg, shard, out_dir, overwrite, record).items():
        options = {k: v for k, v in model if v is not None}
        try:
            vl = load(options.pop("model", None), **options)
        except Exception as err:  # a model that cannot load fails its items, not the batch
            for item in items:
                record(item, Outcome.failed(item, out_dir / f"{item.name}.nc", _describe(err)))
            continue
        for item in items:
            path, started = out_dir / f"{item.name}.nc", time.perf_counter()
            try:
                _run_item(vl, item, path, cfg.path.resolve(), progress)
            except Exception as err:  # one item's failure must not stop the others
                log.debug("item %s failed", item.name, exc_info=True)
                record(item, Outcome.failed(item, path, _describe(err)))
            else:
                record(item, Outcome(item.name, "done", path, seconds=time.perf_counter() - started))
        del vl
    return [outcomes[i] for i in sorted(outcomes)]


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if not isinstance(err, VlmaskError):
        return f"{type(err).__name__}: {text}"
    return text if err.option is None else f"{err.option}: {text}"


def result_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The result files of ``source``: a batch YAML (its items' files that exist), a directory (its ``*.nc``),
    a file, or a list of files."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.suffix in (".yaml", ".yml") and source.is_file():
            cfg = read_config(source)
            out_dir = cfg.output_dir or Path("output")
            return [out_dir / f"{item.name}.nc" for item in cfg.items if (out_dir / f"{item.name}.nc").exists()]
        if source.is_dir():
            return sorted(source.glob("*.nc"))
        return [source]
    return [Path(p) for p in source]


def _label(ds: xr.Dataset) -> xr.Dataset:
    """One result as one entry of the ``prompt`` dimension, named after its item (or its file)."""
    name = ds.attrs.get("batch_name") or Path(ds.encoding.get("source", "result")).stem
    # Text labels are small, and dask cannot chunk object arrays: load them; numbers stay lazy.
    ds = ds.assign({k: v.load() for k, v in ds.data_vars.items() if v.dtype.kind in "OUS"})
    ds = ds.assign_coords({k: v.load() for k, v in ds.coords.items() if v.dtype.kind in "OUS"})
    ds = ds.expand_dims({PROMPT: [name]})
    return ds.assign_coords(
        prompt_text=("prompt", [ds.attrs.get("prompt", "")]),
        prompt_model=("prompt", [ds.attrs.get("model", "")]),
        prompt_num_tokens=("prompt", [int(ds.attrs.get("num_tokens", 0))]),
    )


def open_batch(source: str | Path | Sequence[str | Path]) -> xr.Dataset:
    """Every result of a batch as one lazy Dataset (dask-backed) with a ``prompt`` dimension.

    ``source`` is an output directory (every ``*.nc`` in it), a batch configuration
    (its items' files that exist), or a list of result files. Items differ in length, so
    the others are aligned on their index coordinates (``token`` = the masked unit's
    first position, ``step``, ``seq``) with an outer join: NaN where an item has no such
    entry. Per-item labels (``token_text``, ``seq_text``, ...) become ``(prompt, ...)``;
    ``prompt_text``, ``prompt_model`` and ``prompt_num_tokens`` label each prompt.
    Attributes that differ between items are dropped. The files stay open until the
    Dataset is closed: use ``with open_batch(...) as ds:`` (with this HDF5 build, opening
    one of the files again while the view is open can fail with "NetCDF: HDF error").

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "b.yaml").write_text("items:\\n  - {name: a, prompt: test}\\n  - {name: b, prompt: hi}\\n")
        >>> _ = run_batch(folder / "b.yaml", folder / "results")
        >>> with open_batch(folder / "results") as ds:
        ...     ds["prompt"].values.tolist(), ds["kl"].dims
        (['a', 'b'], ('prompt', 'step', 'token'))
    """
    files = result_files(source)
    missing = [f for f in files if not f.exists()]
    if missing or not files:
        raise VlmaskError(f"no batch results to open at {source!s}" if not files else f"'{missing[0]}' does not exist")
    try:
        return xr.open_mfdataset(
            [str(f) for f in files],
            engine="netcdf4",
            combine="nested",
            concat_dim="prompt",
            join="outer",
            data_vars="all",
            coords="different",
            compat="no_conflicts",
            combine_attrs="drop_conflicts",
            preprocess=_label,
        )
    except (OSError, ValueError) as err:
        raise VlmaskError(f"batch results at {source!s} cannot be combined: {err}") from None
