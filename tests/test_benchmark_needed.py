"""The benchmark's 'needed' price: sequential steps counted as the issue defines the least work."""

from __future__ import annotations

import pytest

from benchmarks.needed import ideals


def _run(left_rows: list[int], raw: dict[str, float]) -> dict:
    return {
        "clean_forward_s": 1.0,
        "clean_decoder_s": 0.8,
        "attention_layer_s": 0.01,
        "prompt_forward_s": 0.9,
        "seq": 100,
        "layers": 2,
        "recomputed": 500,
        "allowed_pairs": 20_000,
        "needed_pairs": 15_000,
        "needed_positions": 400,
        "left_rows_per_step": left_rows,
        "raw_step_s": raw,
    }


def test_each_step_is_one_raw_pass_over_the_clean_row_and_the_rows_that_left():
    run = _run([0, 2, 3], {"1": 0.01, "3": 0.02, "4": 0.025})
    got = ideals([run], {"naive": 10.0, "vlmask": 2.0})
    linear = (0.8 - 2 * 0.01) / 100
    pairs = 2 * 15_000 * 0.01 / 100**2
    assert got["needed_sequential_s"] == pytest.approx(0.055, abs=1e-3)  # steps 1, 2, 3: 1, 3 and 4 rows
    assert got["needed_s"] == pytest.approx(0.9 + 400 * linear + pairs + 0.055, abs=1e-3)
    loose = 1.0 + 500 * linear + 2 * 20_000 * 0.01 / 100**2  # everything teacher-forced, no steps
    assert got["needed_no_steps_s"] == pytest.approx(loose, abs=1e-3)
    assert got["vlmask_vs_needed"] == pytest.approx(got["needed_s"] / 2.0, abs=1e-3)


def test_one_step_has_nothing_sequential():
    got = ideals([_run([], {"1": 0.01})], {"naive": 10.0, "vlmask": 2.0})
    assert got["needed_sequential_s"] == 0
