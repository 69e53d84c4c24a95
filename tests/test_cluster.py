"""Batches on Dask distributed: a local cluster gives the serial run's files; a killed worker loses no item."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import xarray as xr

import vlmask
from vlmask.batch.cluster import run_batch_on_cluster
from vlmask.batch.run import parse_shard
from vlmask.cli import main

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what color is the circle ?", "what shape is red ?", "what color is the square ?", "what is blue ?"]


def _config(folder: Path, n: int, num_tokens: int = 1) -> Path:
    items = "\n".join(
        f"  - {{name: q{k}, prompt: '{QUESTIONS[k % len(QUESTIONS)]}', image: {ROOT / 'examples' / 'shapes.png'},"
        f" mask: {'vision' if k % 2 else 'text'}}}"
        for k in range(n)
    )
    path = folder / "batch.yaml"
    path.write_text(f"defaults: {{num_tokens: {num_tokens}}}\nitems:\n{items}\n")
    return path


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_a_two_worker_cluster_writes_the_serial_files_and_a_rerun_skips_them(tmp_path):
    config = _config(tmp_path, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # each worker's: bit for bit needs the same threads
    try:
        serial = vlmask.run_batch(config, tmp_path / "serial")
    finally:
        torch.set_num_threads(threads)
    done = run_batch_on_cluster(config, tmp_path / "cluster", workers=2)
    assert [o.status for o in done] == ["done"] * 4 == [o.status for o in serial]
    assert _files(tmp_path / "cluster") == _files(tmp_path / "serial") == {f"q{k}.nc" for k in range(4)}
    for k in range(4):
        with (
            xr.open_dataset(tmp_path / "serial" / f"q{k}.nc") as a,
            xr.open_dataset(tmp_path / "cluster" / f"q{k}.nc") as b,
        ):
            xr.testing.assert_identical(a.load(), b.load())
    again = run_batch_on_cluster(config, tmp_path / "cluster", workers=1)
    assert [o.status for o in again] == ["skipped"] * 4


def test_a_worker_killed_mid_batch_loses_no_item_and_leaves_no_partial_file(tmp_path):
    config = _config(tmp_path, 6, num_tokens=2)
    out = tmp_path / "out"
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        outcomes: list = []
        runner = threading.Thread(
            target=lambda: outcomes.extend(run_batch_on_cluster(config, out, scheduler=cluster.scheduler_address))
        )
        runner.start()
        deadline = time.monotonic() + 300
        while not any(name.endswith(".nc") for name in _files(out)) and time.monotonic() < deadline:
            time.sleep(0.2)  # the first item is done: both workers have a model loaded and items in hand
        with distributed.Client(cluster.scheduler_address) as client:
            pids = client.run(os.getpid)
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=600)
        assert not runner.is_alive()
    finally:
        cluster.close()
    assert [o.status for o in outcomes] == ["done"] * 6, [o.error for o in outcomes]
    assert _files(out) == {f"q{k}.nc" for k in range(6)}  # every item, and no partial or temporary file
    for k in range(6):
        vlmask.open_results(out / f"q{k}.nc").close()


def test_cluster_mistakes_are_one_line(tmp_path, capsys):
    config = _config(tmp_path, 1)
    assert main(["batch", str(config), "--workers", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert "workers must be a whole number of at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(vlmask.VlmaskError, match="either a scheduler address or a number of local workers"):
        run_batch_on_cluster(config, tmp_path / "o", scheduler="tcp://127.0.0.1:1", workers=2)


def test_shard_auto_reads_the_slurm_array(monkeypatch):
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("auto", env) == (2, 3)
    assert parse_shard(
        "auto", {**env, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "4", "SLURM_ARRAY_TASK_ID": "8"}
    ) == (2, 3)
    with pytest.raises(vlmask.VlmaskError, match="SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set"):
        parse_shard("auto", {})
    with pytest.raises(vlmask.VlmaskError, match="outside its array of 3 tasks"):
        parse_shard("auto", {**env, "SLURM_ARRAY_TASK_ID": "9"})
