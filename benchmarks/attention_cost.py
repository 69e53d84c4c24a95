"""What the clean attention readout costs: S1 and S2 of benchmarks/sweep.py with attention on and off, interleaved.

    python -m benchmarks.attention_cost --pairs 5 --threads 1        # CPU, the small model
    python -m benchmarks.attention_cost --device cuda --size 2b

Runs alternate (off, on, off, on, ...) in one process after a warm-up, so drift and other load
on the machine fall on both alike; each scenario reports the median seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlmask
from benchmarks.sweep import SCENARIOS, build_model, prompt_of


def _sync(vl) -> None:
    if vl.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenario", action="append", choices=("S1", "S2"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, image = Path(tmp) / "model", Path(tmp) / "image.png"
        build_model(model, args.size)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(image)
        vl = vlmask.load_model(model, device=args.device)
        for attention in (True, False):  # warm-up: first-call costs of torch and nnsight
            vlmask.sweep(vl, "w1 w2 w3", [image], mask="all", num_tokens=2, progress=False, attention=attention)
        for name in args.scenario or ["S1", "S2"]:
            sc = SCENARIOS[name]
            images = [image] if sc["image"] else []

            def run(attention: bool, sc=sc, images=images, name=name) -> float:
                _sync(vl)
                start = time.perf_counter()
                vlmask.sweep(
                    vl,
                    prompt_of(name),
                    images,
                    mask=sc["mask"],
                    num_tokens=sc["steps"],
                    progress=False,
                    attention=attention,
                )
                _sync(vl)
                return time.perf_counter() - start

            times = {False: [], True: []}
            for _ in range(args.pairs):
                for attention in (False, True):
                    times[attention].append(run(attention))
            off, on = float(np.median(times[False])), float(np.median(times[True]))
            row = {"scenario": name, "off_s": off, "on_s": on, "ratio": on / off, "runs": times[True] + times[False]}
            print(json.dumps({**row, "runs": {str(k): v for k, v in times.items()}}), flush=True)


if __name__ == "__main__":
    main()
