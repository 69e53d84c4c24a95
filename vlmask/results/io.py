"""Result files: netCDF written atomically, read back, and long-form tables (CSV, JSON).

Every file is written to a hidden temporary file beside it, then renamed. Inside
:func:`output_set`, the renames wait until the block ends, so that the files of one run land
together or not at all. A write that fails (a full disk, a read-only filesystem) is a
:class:`VlmaskError` naming the file and the cause. Importing this module loads neither
xarray nor pandas: the command line reads :data:`FORMATS` while parsing its options.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmask.errors import VlmaskError

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

FORMATS = ("nc", "csv", "json")


@dataclass
class _Pending:
    """The files of one :func:`output_set`: written temporaries waiting to be renamed, and folders it made."""

    renames: list[tuple[Path, Path]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)


_PENDING: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("vlmask_output_set", default=None)


_HOST = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname()) or "host"


def _writer() -> str:
    """Who writes a temporary file: this host and process (``node1-4242``), so a killed writer's can be told."""
    return f"{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _stale_temporaries(path: Path) -> list[Path]:
    """Hidden temporaries of ``path``'s stem (``.run.nc.node1-4242.k2j4x8_a.tmp``) left by a killed writer: those
    whose writer was a process of this host that is gone, and empty ones of any writer (or of older versions)."""
    pattern = re.compile(
        rf"\.{re.escape(path.stem)}\.[A-Za-z0-9]+\.(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]{{8}}\.tmp"
    )
    if not path.parent.is_dir():
        return []
    stale = []
    for p in path.parent.iterdir():
        match = pattern.fullmatch(p.name)
        if match is None or not p.is_file():
            continue
        dead = match["host"] == _HOST and not _alive(int(match["pid"]))
        if dead or p.stat().st_size == 0:
            stale.append(p)
    return stale


def _make_folder(folder: Path) -> None:
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    pending = _PENDING.get()
    if pending is not None:
        pending.folders.extend(missing)  # deepest first: removed in this order if the set fails


def _cause(err: BaseException, folder: Path) -> str:
    """What went wrong in words, with the free space where a full disk is likely."""
    text = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())
    full = isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))
    if full:
        with contextlib.suppress(OSError):
            text += f" ({shutil.disk_usage(folder).free // 1024} KiB free there)"
    return text


def _is_write_failure(err: BaseException) -> bool:
    """A failure of the disk, not of the program: any OSError, or netCDF's own (``NetCDF: HDF error``)."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and str(err).startswith("NetCDF:"))


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    An interrupted or failed write leaves neither a partial ``path`` nor the temporary file,
    and a write that fails for the disk's sake raises :class:`VlmaskError` naming ``path`` and
    the cause. Temporaries of the same stem that a killed writer left are removed (see
    :func:`_stale_temporaries`). The
    file gets the permissions a plain ``open`` would give it (``0o666`` less the umask), not the
    temporary file's private ``0o600``. Inside :func:`output_set` the rename waits for the set.

    Example:
        >>> atomic_write(tmp / "a.txt", lambda t: t.write_text("hi")).read_text()
        'hi'
    """
    try:
        _make_folder(path.parent)
        for stale in _stale_temporaries(path):
            stale.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise VlmaskError(f"cannot write '{path}': {_cause(err, path.parent)}") from None
    os.close(fd)
    tmp, pending, umask = Path(name), _PENDING.get(), os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        if pending is None:
            os.replace(tmp, path)
        else:
            pending.renames.append((tmp, path))
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(err):
            raise VlmaskError(f"cannot write '{path}': {_cause(err, path.parent)}") from None
        raise
    return path


def _keep(path: Path) -> Path:
    """A hidden second name of ``path``'s current file (a hard link, else a copy), to restore it from."""
    old = path.with_name(f".{path.name}.{_writer()}.old")
    old.unlink(missing_ok=True)
    try:
        os.link(path, old)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, old)
    return old


@contextlib.contextmanager
def output_set() -> Iterator[list[Path]]:
    """The files written inside land together when the block ends, or none of them does.

    Each :func:`atomic_write` inside (results, tables, pages, pictures) writes its temporary
    file; at the end all are renamed into place. If anything fails or is interrupted first,
    every temporary, every file of the set already renamed and every folder made for it are
    removed, and files it replaced (``--overwrite``) are put back as they were. The list it
    yields holds the files that landed (filled at the end).

    Example:
        >>> with output_set() as landed:
        ...     _ = atomic_write(tmp / "x.txt", lambda t: t.write_text("x"))
        ...     (tmp / "x.txt").exists()  # not yet
        False
        >>> [p.name for p in landed], (tmp / "x.txt").read_text()
        (['x.txt'], 'x')
    """
    pending, landed, kept = _Pending(), [], []
    token = _PENDING.set(pending)
    try:
        yield landed
        for tmp, path in pending.renames:
            try:
                if path.exists():  # --overwrite: keep the old file until the whole set has landed
                    kept.append((_keep(path), path))
                os.replace(tmp, path)
            except OSError as err:
                raise VlmaskError(f"cannot write '{path}': {_cause(err, path.parent)}") from None
            landed.append(path)
    except BaseException:
        for path in landed:
            path.unlink(missing_ok=True)
        for old, path in kept:
            os.replace(old, path)  # the files from before are back, untouched
        landed.clear()
        raise
    finally:
        _PENDING.reset(token)
        for tmp, _ in pending.renames:
            tmp.unlink(missing_ok=True)
        for old, _ in kept:
            old.unlink(missing_ok=True)
        if not landed:
            for folder in pending.folders:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty


def check_destination(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before any work, outputs that exist (unless ``overwrite``) or whose folder cannot take files.

    The folder may not exist yet: then the nearest folder above it that does must take a
    file. Nothing is left behind by the check.

    Example:
        >>> check_destination([tmp / "new" / "run.nc"], overwrite=False)
        >>> check_destination([Path("README.md") / "run.nc"], overwrite=False)
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: output folder 'README.md' is a file, not a folder
    """
    for path in paths:
        refuse_existing(path, overwrite)
    for folder in dict.fromkeys(path.parent for path in paths):
        above = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
        if not above.is_dir():
            where = "" if above == folder else f" (in '{folder}')"
            raise VlmaskError(f"output folder '{above}'{where} is a file, not a folder")
        try:
            fd, name = tempfile.mkstemp(prefix=".vlmask-check.", suffix=".tmp", dir=above)
        except OSError as err:
            raise VlmaskError(f"cannot write in output folder '{above}': {_cause(err, above)}") from None
        os.close(fd)
        os.unlink(name)


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
    from vlmask.results.schema import relative_paths

    ds.attrs.update(relative_paths(ds, path))
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def open_results(path: str | Path) -> xr.Dataset:
    """Open a result file written by :func:`save_results` (loaded into memory).

    Example:
        >>> import xarray as xr
        >>> same = open_results(save_results(ds, tmp / "run.nc"))
        >>> xr.testing.assert_identical(same, ds)
        >>> int(same["kl"].sel(step=0).idxmax("token")) in same["token"].values
        True
    """
    import xarray as xr

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
        >>> from vlmask.results.schema import METRIC_VARIABLES
        >>> table = long_table(ds)  # or ds.vlmask.table()
        >>> len(table) == sum(ds[name].size for name in METRIC_VARIABLES)
        True
    """
    import pandas as pd

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
    )

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
