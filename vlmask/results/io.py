"""Result files: netCDF written atomically, read back, and long-form tables (CSV, JSON)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from vlmask.errors import VlmaskError
from vlmask.results.metrics import LOGIT_METRICS
from vlmask.results.schema import (
    HEAD,
    INTERVENTION,
    INTERVENTION_TYPE,
    LAYER,
    METRIC,
    METRIC_VARIABLES,
    STEP,
    STEP_TOKEN,
    TOKEN,
    TOKEN_KIND,
    TOKEN_TEXT,
    WINDOW,
    WINDOW_END,
    WINDOW_START,
    relative_paths,
)

FORMATS = ("nc", "csv", "json")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    An interrupted or failed write leaves neither a partial ``path`` nor the temporary file.
    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask),
    not the temporary file's private ``0o600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Refuse to replace ``path`` unless ``overwrite``: every writer of results and pages asks this first.

    Example:
        >>> refuse_existing(Path("examples/shapes.png"), overwrite=True)  # allowed
        >>> try:
        ...     refuse_existing(Path("examples/shapes.png"), overwrite=False)
        ... except VlmaskError as err:
        ...     print(str(err).split(":")[0])
        output 'examples/shapes.png' already exists
    """
    if path.exists() and not overwrite:
        raise VlmaskError(f"output '{path}' already exists: choose another path or allow overwriting (overwrite=True)")


def save_results(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``ds`` to netCDF atomically (a temporary file, then a rename).

    First records in ``ds.attrs`` where its images and videos lie relative to ``path``
    (:func:`~vlmask.results.schema.relative_paths`), so the file finds them wherever both are moved.

    Example:
        >>> save_results(ds, tmp / "run.nc") == tmp / "run.nc"
        True
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    ds.attrs.update(relative_paths(ds, path))
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def open_results(path: str | Path) -> xr.Dataset:
    """Open a result file written by :func:`save_results` (loaded into memory).

    Example:
        >>> same = open_results(save_results(ds, tmp / "run.nc"))
        >>> xr.testing.assert_identical(same, ds)
        >>> int(same["kl"].sel(step=0).idxmax("token")) in same["token"].values
        True
    """
    path = Path(path)
    if not path.exists():
        raise VlmaskError(f"result file '{path}' does not exist")
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return ds.load()
    except (OSError, ValueError) as err:
        raise VlmaskError(f"'{path}' is not a vlmask netCDF result: {err}") from None


def long_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per step x token x layer [x head] x metric, for spreadsheets.

    Columns: ``step, step_token, token, token_text, token_kind, layer, head, variable,
    metric, value``; ``layer`` and ``head`` are empty where they do not apply. Intervention
    sweeps add ``intervention, intervention_type`` (``token`` is empty), windowed ones
    ``window, window_start, window_end``.

    Example:
        >>> table = long_table(ds)  # or ds.vlmask.table()
        >>> len(table) == sum(ds[name].size for name in METRIC_VARIABLES)
        True
    """
    frames = []
    for name in METRIC_VARIABLES:
        da = ds[name].astype(float)
        if METRIC not in da.dims:
            da = da.expand_dims({METRIC: [name]})
        frame = da.to_dataframe(name="value").reset_index()
        frame["variable"] = "logits" if name in LOGIT_METRICS else name
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    extra = [c for c in (INTERVENTION, INTERVENTION_TYPE, WINDOW, WINDOW_START, WINDOW_END) if c in table]
    columns = [STEP, STEP_TOKEN, TOKEN, TOKEN_TEXT, TOKEN_KIND, *extra, LAYER, HEAD, "variable", METRIC, "value"]
    for col in columns:
        if col not in table:
            table[col] = pd.NA
    table = table[columns]
    table[[LAYER, HEAD]] = table[[LAYER, HEAD]].astype("Int64")
    return table


def write_tables(ds: xr.Dataset, stem: str | Path, formats: list[str], *, overwrite: bool = False) -> list[Path]:
    """Write the long table as ``stem.csv`` and/or ``stem.json`` (records), atomically."""
    table, written = None, []
    for fmt in formats:
        if fmt == "nc":
            continue
        if fmt not in FORMATS:
            raise VlmaskError(f"format {fmt!r} is not known: expected some of {FORMATS}")
        path = Path(f"{stem}.{fmt}")
        refuse_existing(path, overwrite)
        table = long_table(ds) if table is None else table
        if fmt == "csv":
            atomic_write(path, lambda tmp, table=table: table.to_csv(tmp, index=False))
        else:
            atomic_write(path, lambda tmp, table=table: table.to_json(tmp, orient="records"))
        written.append(path)
    return written
