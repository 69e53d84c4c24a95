"""On the built-in shapes model: how often triage confirms the asked-about cell and ranks it first.

    python -m benchmarks.triage_scenes                 # 100 held-out scenes, K = 3
    python -m benchmarks.triage_scenes --n 20 --k 1 --model path/to/shapes

The scenes are the built-in model's held-out knockout scenes (``KNOCKOUT_SEED``, half colour
and half shape questions, as :func:`vlmask.builtin.shapes.knockout_report` draws them). Per
scene, one triage sweep over the 16 vision tokens; the asked-about cell counts as found when it
is confirmed and ranked first, both by the estimate and by the exact KL among the knockouts run
exactly. ``--exact`` also runs the exhaustive exact sweep, to say how often the asked cell is
the exact top at all (the model's own ground truth). Rerun it after the model is retrained.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import vlmask
from vlmask.builtin import DEFAULT_MODEL_PATH
from vlmask.builtin.shapes import VISION_START
from vlmask.builtin.world import KNOCKOUT_SEED, sample_scene


def run(model: str, n: int, k: int, exact: bool) -> dict:
    vl = vlmask.load_model(model)
    rng = np.random.default_rng(KNOCKOUT_SEED)
    scenes = [sample_scene(rng, ("color", "shape")[i % 2]) for i in range(n)]
    counts = {"confirmed": 0, "estimate_first": 0, "found": 0, "exact_top_is_asked": 0}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, scene in enumerate(scenes):
            image = Path(tmp) / f"scene{i}.png"
            scene.image.save(image)
            ds = vlmask.sweep(vl, scene.question, [image], mask="vision", triage=k, progress=False)
            asked = VISION_START + scene.target_token
            kl = ds["kl"].sel(step=0)
            confirmed = bool(ds["confirmed"].sel(token=asked))
            first = int(ds["estimate_kl"].sel(step=0).idxmax("token")) == asked
            counts["confirmed"] += confirmed
            counts["estimate_first"] += first
            counts["found"] += confirmed and first and int(kl.fillna(-np.inf).idxmax("token")) == asked
            if exact:
                full = vlmask.sweep(vl, scene.question, [image], mask="vision", progress=False)
                counts["exact_top_is_asked"] += int(full["kl"].sel(step=0).idxmax("token")) == asked
    out = {"n": n, "k": k, **{name: c / n for name, c in counts.items()}, "seconds": time.perf_counter() - started}
    if not exact:
        del out["exact_top_is_asked"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--exact", action="store_true", help="also run each scene's exhaustive exact sweep")
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.n, args.k, args.exact)))


if __name__ == "__main__":
    main()
