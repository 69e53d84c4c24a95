"""Time a batch serially and on a local Dask cluster, in one run, on the same items (built-in model).

    python -m benchmarks.cluster                 # 40 items, a 2-worker LocalCluster vs the serial runner
    python -m benchmarks.cluster --items 8 --workers 2

Both write into fresh folders; the cluster's files must equal the serial ones (to 1e-6: the serial
runner's torch uses every core, each worker one, so float sums may round differently; attributes exactly).
The cluster's time includes starting the cluster and each worker loading the model once; the
overhead per item is (cluster - serial / workers) / items, an upper bound on what Dask adds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import xarray as xr

import vlmask
from vlmask.batch.cluster import run_batch_on_cluster

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what color is the circle ?", "what shape is red ?", "what color is the square ?", "what is blue ?"]


def _config(folder: Path, n: int) -> Path:
    image = ROOT / "examples" / "shapes.png"
    items = "\n".join(
        f"  - {{name: q{k}, prompt: '{QUESTIONS[k % len(QUESTIONS)]}', image: {image}, mask: vision}}" for k in range(n)
    )
    path = folder / "batch.yaml"
    path.write_text(f"defaults: {{num_tokens: 2}}\nitems:\n{items}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = _config(folder, args.items)
        start = time.perf_counter()
        serial = vlmask.run_batch(config, folder / "serial")
        serial_s = time.perf_counter() - start
        start = time.perf_counter()
        cluster = run_batch_on_cluster(config, folder / "cluster", workers=args.workers)
        cluster_s = time.perf_counter() - start
        assert all(o.status == "done" for o in serial + cluster)
        for k in range(args.items):
            a, b = (vlmask.open_results(folder / run / f"q{k}.nc") for run in ("serial", "cluster"))
            xr.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float sums: 2 threads vs 1 per worker
            assert a.attrs == b.attrs
    row = {
        "items": args.items,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "serial_s": round(serial_s, 2),
        "cluster_s": round(cluster_s, 2),
        "speedup": round(serial_s / cluster_s, 2),
        "overhead_per_item_s": round((cluster_s - serial_s / args.workers) / args.items, 3),
    }
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
