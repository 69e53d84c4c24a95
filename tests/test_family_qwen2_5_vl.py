"""Qwen2.5-VL passes the correctness table (tests/family_table.py) on a tiny random checkpoint."""

from __future__ import annotations

import pytest

from tests.conftest import family_models
from tests.family_table import TABLE


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family_models("qwen2_5_vl", tmp_path_factory)


@pytest.mark.parametrize("check", TABLE, ids=lambda check: check.__name__)
def test_qwen2_5_vl_table(models, images, check):
    sdpa, eager = models
    assert sdpa.family.name == "Qwen2.5-VL"
    check(sdpa, eager, images)


def test_qwen2_5_vl_video_knockout_equals_reference(models, tmp_path):
    """Videos carry ``second_per_grid_ts`` (seconds per frame group), which Qwen2.5-VL's positions use."""
    import numpy as np
    import torch
    from PIL import Image

    import vlmask
    from tests.reference import reference_run
    from vlmask.inputs.prompt import build_prompt

    for frame in range(4):
        pixels = np.random.default_rng(frame).integers(0, 255, (56, 84, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{frame:03d}.png")
    vl = models[0]
    built = build_prompt(vl.processor, "what color is the circle ?", videos=[tmp_path], video_fps=4.0)
    assert built.inputs["second_per_grid_ts"].tolist() == [0.5]
    ds = vlmask.sweep(vl, "what color is the circle ?", videos=[tmp_path], video_fps=4.0, mask="vision", progress=False)
    clean = torch.log_softmax(reference_run(vl, built.inputs, set())[2][-1].double(), -1)
    for p in ds["token"].values[[0, -1]]:
        masked = torch.log_softmax(reference_run(vl, built.inputs, {int(p)})[2][-1].double(), -1)
        kl = float((clean.exp() * (clean - masked)).sum())
        assert kl > 1e-6 and float(ds["kl"].sel(token=p, step=0)) == pytest.approx(kl, abs=1e-5)
