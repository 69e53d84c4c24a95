"""Triage vs the exhaustive exact sweep, on the benchmark model: ``python -m benchmarks.sweep --triage``.

- S2: 196 vision knockouts (a 448x448 image), ``triage=K`` in check mode: the triage's time
  (estimate, then the top K and the audit exactly), the exhaustive exact sweep's time, the
  Spearman correlation of estimated and exact KL over every knockout, recall@10 among the
  confirmed, and how recall of the exact top 10 grows with the estimated top K'.
- S5: 1,024 vision knockouts (a 1024x1024 image at mask unit ``token``: this model's tokens are
  32 pixels, Qwen2.5-VL's 28, where 896x896 gives 1,024), in check mode too: the exhaustive exact
  sweep runs in full (~200 s on 2 cores). With ``sample`` (``--triage-s5-sample N``, for a slow
  machine) it is instead extrapolated from an exact run of N random knockouts, scaled by the
  positions each recomputes (its cost is linear in them); no recall then.

Each scenario's triage first runs once untimed on the same inputs (a warm-up: the first pass at a
new sequence length pays for memory and kernels that later ones reuse; the exhaustive sweep, which
runs after the triage, would otherwise get them for free).
Every figure is one run on whatever the machine is doing: noisy where other jobs share the CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vlmask
from vlmask.inputs.prompt import build_prompt

QUESTION = "what is the color of the object in the middle of this picture and what is its shape ?"
KEYS = (
    "triage_estimate_seconds",
    "triage_seconds",
    "triage_confirmed",
    "triage_audit_size",
    "triage_audit_hits",
    "triage_audit_rate_upper95",
    "triage_expected_missed_upper95",
    "triage_saturated_knockouts",
)


def _image(folder: Path, side: int) -> Path:
    path = folder / f"image{side}.png"
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def checked(vl: vlmask.VLModel, image: Path, k: int, scenario: str) -> dict[str, Any]:
    """Triage with K = ``k`` in check mode on the image's vision knockouts (after an untimed warm-up)."""
    vlmask.sweep(vl, QUESTION, [image], mask="vision", triage=k, progress=False)
    ds = vlmask.sweep(vl, QUESTION, [image], mask="vision", triage=k, triage_check=True, progress=False)
    figures = {key: ds.attrs[key] for key in KEYS}
    return {
        "scenario": scenario,
        "knockouts": int(ds.sizes["token"]),
        "k": k,
        **figures,
        "exhaustive_seconds": ds.attrs["triage_check_exhaustive_seconds"],
        "speedup": ds.attrs["triage_check_speedup"],
        "spearman": ds.attrs["triage_check_spearman"],
        "recall_at_10": ds.attrs["triage_check_recall_at_10"],
        "recall_at_k": ds.attrs["triage_check_recall_at_k"],
        "recall10_within_top": json.loads(ds.attrs["triage_check_recall10_within"]),
        "max_difference": ds.attrs["triage_check_max_difference"],
    }


def _allow_tokens(vl: vlmask.VLModel, tokens: int) -> None:
    """Let the processor keep images of up to ``tokens`` vision tokens (the benchmark's keeps 256)."""
    vl.processor.image_processor.size.longest_edge = 32 * 32 * tokens


def s5(vl: vlmask.VLModel, image: Path, k: int, sample: int | None) -> dict[str, Any]:
    """Triage on 1,024 vision knockouts: in check mode, or (``sample``) against an extrapolated exhaustive time."""
    _allow_tokens(vl, 1024)
    if not sample:
        return checked(vl, image, k, "S5")
    vlmask.sweep(vl, QUESTION, [image], mask="vision", triage=k, progress=False)  # warm-up
    started = time.perf_counter()
    ds = vlmask.sweep(vl, QUESTION, [image], mask="vision", triage=k, progress=False)
    triage_s = time.perf_counter() - started
    built = build_prompt(vl.processor, QUESTION, [image])
    positions = ds["token"].values
    picked = np.random.default_rng(1).choice(positions, min(sample, len(positions)), replace=False)
    started = time.perf_counter()
    vlmask.sweep(vl, QUESTION, [image], mask=[int(p) for p in picked], progress=False)
    sample_s = time.perf_counter() - started
    seq = len(built.tokens)
    recomputed = float(np.sum(seq - positions - 1)) / float(np.sum(seq - picked - 1))
    exhaustive = sample_s * recomputed
    return {
        "scenario": "S5",
        "knockouts": int(ds.sizes["token"]),
        "tokens": seq,
        "k": k,
        **{key: ds.attrs[key] for key in KEYS},
        "triage_wall_seconds": triage_s,
        "sample": len(picked),
        "sample_seconds": sample_s,
        "exhaustive_seconds_extrapolated": exhaustive,
        "speedup_extrapolated": exhaustive / triage_s,
    }


def study(
    model: Path, folder: Path, k: int = 20, s5_sample: int | None = None, scenarios: tuple[str, ...] = ("S2", "S5")
) -> list[dict[str, Any]]:
    """The triage rows of ``scenarios``: S2, then S5 (its exhaustive sweep extrapolated from ``s5_sample``)."""
    vl = vlmask.load_model(str(model))
    vlmask.sweep(vl, "w1 w2 w3", [], mask="all", num_tokens=2, triage=1, progress=False)  # warm-up
    rows = []
    if "S2" in scenarios:
        rows.append(checked(vl, _image(folder, 448), k, "S2"))
        print(json.dumps(rows[-1]), flush=True)
    if "S5" in scenarios:
        rows.append(s5(vl, _image(folder, 1024), k, s5_sample))  # 32-pixel tokens: 32 x 32
        print(json.dumps(rows[-1]), flush=True)
    print(f"threads: {torch.get_num_threads()}; one run each (noisy where the CPU is shared)")
    return rows
