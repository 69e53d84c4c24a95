"""Batch items on a Dask distributed cluster: an existing scheduler, or a local cluster of worker processes.

The items, the skip-if-up-to-date check and the files are the serial runner's
(:func:`~vlmask.batch.run.run_batch`); only where an item runs changes:

- each item is one Dask task; a worker process loads each model once, on first use, and
  keeps it for the items of that model it serves;
- a task writes its result atomically into the shared output directory, exactly as the serial
  runner does, so a worker killed mid-item leaves no partial file; Dask then reruns the
  item on another worker (its ``allowed-failures`` rule);
- a failing item is reported as failed, and the others go on;
- progress counts items done over the whole cluster.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlmask.batch.config import Config, Item, read_config
from vlmask.batch.run import Outcome, _describe, _groups, _run_item
from vlmask.errors import VlmaskError

log = logging.getLogger(__name__)

_MODELS: dict[tuple, Any] = {}
"""The models this worker process has loaded, by their load options (one process, one cache)."""


def _serve(item: Item, path: str, config: str, threads: int | None) -> Outcome:
    """Run one item in a worker process (the Dask task): load its model once per process, sweep, write."""
    import torch

    from vlmask.model.load import load_model

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        if item.model not in _MODELS:
            _MODELS.clear()  # one model at a time per worker: the next model's items come in groups
            options = {k: v for k, v in item.model if v is not None}
            _MODELS[item.model] = load_model(options.pop("model", None), **options)
        _run_item(_MODELS[item.model], item, Path(path), Path(config), progress=False)
    except Exception as err:  # one item's failure must not stop the others
        return Outcome.failed(item, Path(path), _describe(err))
    return Outcome(item.name, "done", Path(path), seconds=time.perf_counter() - started)


def _client(scheduler: str | None, workers: int | None) -> tuple[Any, Any]:
    """A client of ``scheduler`` (an address), or of a new local cluster of ``workers`` processes (and that cluster)."""
    try:
        from distributed import Client
    except ImportError:
        raise VlmaskError(
            "running a batch on a cluster needs dask.distributed: pip install 'distributed' (or vlmask[cluster])"
        ) from None
    if (scheduler is None) == (workers is None):
        raise VlmaskError("give either a scheduler address or a number of local workers, not both or neither")
    if scheduler is not None:
        try:
            return Client(scheduler, timeout="30s"), None
        except (OSError, TimeoutError, ValueError) as err:
            raise VlmaskError(f"no Dask scheduler answered at {scheduler!r}: {err}") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise VlmaskError(f"workers must be a whole number of at least 1, got {workers!r}")
    cluster = _local_cluster(workers)
    return Client(cluster), cluster


def _local_cluster(workers: int) -> Any:
    """``workers`` worker processes on this machine: one per GPU with dask-cuda where it is installed."""
    import torch
    from distributed import LocalCluster

    if torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster  # sets CUDA_VISIBLE_DEVICES per worker
        except ImportError:
            log.warning("dask-cuda is not installed: the %d workers share the visible GPUs", workers)
        else:
            return LocalCUDACluster(n_workers=workers, threads_per_worker=1)
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def run_batch_on_cluster(
    config: str | Path | Config,
    output_dir: str | Path | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    report: Callable[[Outcome], None] | None = None,
    overwrite: bool = False,
) -> list[Outcome]:
    """:func:`~vlmask.batch.run.run_batch` with its items run on a Dask cluster: ``scheduler`` (an address such
    as ``tcp://10.0.0.5:8786``) or a local cluster of ``workers`` processes, started and closed here.

    The output directory must be shared by the workers (it is, for a local cluster).

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (config := folder / "b.yaml").write_text("[{name: a, prompt: test}, {name: b, prompt: hi}]")
        >>> [o.status for o in run_batch_on_cluster(config, folder / "results", workers=1)]
        ['done', 'done']
    """
    cfg = config if isinstance(config, Config) else read_config(config)
    # absolute: remote workers resolve relative paths against their own working directory
    out_dir = (Path(output_dir) if output_dir is not None else cfg.output_dir or Path("output")).resolve()
    outcomes: dict[int, Outcome] = {}
    client, cluster = _client(scheduler, workers)

    def record(item: Item, outcome: Outcome) -> None:
        outcomes[item.index] = outcome
        if report is not None:
            report(outcome)

    try:
        groups = _groups(cfg, shard, out_dir, overwrite, record)  # skipped and refused items, as run_batch
        todo = [item for items in groups.values() for item in items]  # grouped by model: a worker keeps one
        threads = max(1, (os.cpu_count() or 1) // workers) if workers else None  # a remote worker keeps its own
        _submit_all(client, todo, out_dir, cfg.path.resolve(), threads, record, progress)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [outcomes[i] for i in sorted(outcomes)]


def _submit_all(
    client: Any,
    items: list[Item],
    out_dir: Path,
    config: Path,
    threads: int | None,
    record: Callable[[Item, Outcome], None],
    progress: bool,
) -> None:
    """Submit ``items`` (each worker's torch on ``threads`` threads, if given) and record each as it ends."""
    from distributed import as_completed

    futures = {}
    for item in items:
        key = f"vlmask-{item.name}-{item.config_hash[:16]}"
        futures[client.submit(_serve, item, str(out_dir / f"{item.name}.nc"), str(config), threads, key=key)] = item
    bar = tqdm(total=len(futures), desc="items", unit="item", disable=not progress)
    for future in as_completed(futures):
        item = futures[future]
        try:
            outcome = future.result()
        except Exception as err:  # the task itself was lost (e.g. its workers kept dying): report, go on
            outcome = Outcome.failed(item, out_dir / f"{item.name}.nc", _describe(err))
        record(item, outcome)
        bar.update(1)
    bar.close()
