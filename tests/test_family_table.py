"""Every supported family passes the correctness table (tests/family_table.py) on a tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmask
from tests.conftest import family_models
from tests.family_table import TABLE
from tests.reference import reference_run
from vlmask.inputs.prompt import build_prompt

FAMILIES = {
    "qwen3_vl": "Qwen3-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen2_vl": "Qwen2-VL",
    "qwen3": "Qwen3",
    "llama": "Llama",
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each family's tiny checkpoint, loaded with sdpa and with eager, built once per module."""
    cache: dict[str, tuple[vlmask.VLModel, vlmask.VLModel]] = {}

    def get(model_type: str) -> tuple[vlmask.VLModel, vlmask.VLModel]:
        if model_type not in cache:
            cache[model_type] = family_models(model_type, tmp_path_factory)
        return cache[model_type]

    return get


@pytest.mark.parametrize("check", TABLE, ids=lambda check: check.__name__)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_table(built, images, model_type, check):
    sdpa, eager = built(model_type)
    assert sdpa.family.name == FAMILIES[model_type]
    check(sdpa, eager, images)


def _frames(folder) -> None:
    """Four 56x84 random frames, a video as a folder of images."""
    for frame in range(4):
        pixels = np.random.default_rng(frame).integers(0, 255, (56, 84, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{frame:03d}.png")


def test_qwen2_5_vl_video_knockout_equals_reference(built, tmp_path):
    """Videos carry ``second_per_grid_ts`` (seconds per frame group), which Qwen2.5-VL's positions use."""
    _frames(tmp_path)
    vl = built("qwen2_5_vl")[0]
    prompt = build_prompt(vl.processor, "what color is the circle ?", videos=[tmp_path], video_fps=4.0)
    assert prompt.inputs["second_per_grid_ts"].tolist() == [0.5]
    ds = vlmask.sweep(vl, "what color is the circle ?", videos=[tmp_path], video_fps=4.0, mask="vision", progress=False)
    clean = torch.log_softmax(reference_run(vl, prompt.inputs, set())[2][-1].double(), -1)
    for p in ds["token"].values[[0, -1]]:
        masked = torch.log_softmax(reference_run(vl, prompt.inputs, {int(p)})[2][-1].double(), -1)
        kl = float((clean.exp() * (clean - masked)).sum())
        assert kl > 1e-6 and float(ds["kl"].sel(token=p, step=0)) == pytest.approx(kl, abs=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_triage_on_every_family(built, images, model_type):
    """Triage reads every family's own attention (sdpa and eager: A @ V is its output, or it would refuse),
    gives finite estimates for every unit, and its confirmed values equal the exhaustive sweep's."""
    for vl in built(model_type):
        text_only = model_type in ("qwen3", "llama")
        ds = vlmask.sweep(
            vl,
            "what color is the circle ?",
            [] if text_only else [images["square"]],
            mask="prompt" if text_only else "vision",
            triage=2,
            triage_check=True,
            progress=False,
        )
        estimates = ds["estimate_kl"].values
        assert np.isfinite(estimates).all() and (estimates >= 0).all() and estimates.max() > 0
        assert int(ds["confirmed"].sum()) >= 2 and ds.attrs["triage_check_max_difference"] < 1e-4


def test_triage_on_a_video(built, tmp_path):
    """A Qwen2.5-VL video's frame tokens are units like any other: estimated, confirmed, equal to the exhaustive."""
    _frames(tmp_path)
    for vl in built("qwen2_5_vl"):
        ds = vlmask.sweep(
            vl,
            "what color is the circle ?",
            videos=[tmp_path],
            video_fps=4.0,
            mask="vision",
            triage=2,
            triage_check=True,
            progress=False,
        )
        assert np.isfinite(ds["estimate_kl"].values).all() and ds.attrs["triage_check_max_difference"] < 1e-4
