"""The benchmark itself runs end to end (on a tiny model) and checks its methods agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sweep import QUESTION

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_runs_and_every_method_agrees_with_naive(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.sweep", "--quick", "--before", "HEAD", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["threads"] == 1 and report["repeats"] == 1
    (row,) = report["results"]
    assert row["scenario"] == "S1" and row["threads"] == 1  # the worker ran with the thread count asked for
    assert row["knockouts"] == len(QUESTION.split())  # --mask prompt: the question's words
    for method in ("naive", "naive-nnsight", "hooks", "vlmask"):
        assert row[f"{method}_s"] > 0
    assert row["ideal_s"] > 0 and "nnsight_overhead" in row and "vlmask_efficiency" in row
    assert row["needed_s"] > 0 and 0 < row["attention_share_of_decoder"] < 1
    assert row["needed_sequential_s"] == 0 and row["needed_no_steps_s"] > 0  # S1: one step, nothing sequential
    assert report["before"] == "HEAD" and row["vlmask-before_s"] > 0 and row["vs_before"] > 0  # the engine at HEAD
    for method in ("naive", "naive-nnsight", "hooks", "vlmask"):
        low, high = row[f"{method}_range_s"]
        assert low <= row[f"{method}_s"] <= high
    assert row["max_kl"] > 1e-2  # knockouts move the distribution: agreeing to 1e-4 is not trivial
    methods = ("naive-nnsight", "hooks", "vlmask", "vlmask-dense", "vlmask-before")
    assert max(row[f"{method}_max_diff"] for method in methods) <= 1e-4
    assert row["vlmask-dense_s"] > 0 and row["segments_vs_dense"] > 0  # the dense packs, side by side
    for method in ("vlmask", "vlmask-dense"):  # where the time goes: each stage within the sweep
        stages = row[f"{method}_stages_s"]
        assert set(stages) == {"vision encoder", "clean pass", "packed passes", "generation", "assembly"}
        assert all(0 <= t <= row[f"{method}_range_s"][1] for t in stages.values())  # rounded to ms: may be 0
        assert stages["clean pass"] > 0 and stages["packed passes"] > 0
    assert row["one_position_ms"] > 0 and row["raw_one_position_ms"] > 0
