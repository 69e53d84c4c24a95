"""Qwen2-VL and Qwen2.5-VL place a video's frame groups back to back: each group is its own vision range."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmask
from tests.conftest import family_models
from tests.reference import reference_run
from vlmask.cli import main
from vlmask.inputs.prompt import build_prompt
from vlmask.results.schema import vision_ranges

PROMPT = "what color is the circle ?"


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Four frames: two groups of two (temporal patch 2)."""
    root = tmp_path_factory.mktemp("frames")
    for frame in range(4):
        pixels = np.random.default_rng(frame).integers(0, 255, (56, 84, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{frame:03d}.png")
    return root


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_each_frame_group_is_a_range_and_bidirectional_attention_stays_inside_it(tmp_path_factory, frames, model_type):
    vl = family_models(model_type, tmp_path_factory)[0]
    built = build_prompt(vl.processor, PROMPT, videos=[frames], video_fps=4.0)
    groups, rows, cols = built.inputs["video_grid_thw"][0].tolist()
    per_group = rows * cols // 4  # merged 2x2
    assert groups == 2
    ranges = built.tokens.vision_ranges
    assert len(ranges) == groups and all(end - start == per_group for start, end in ranges)
    assert ranges[0][1] == ranges[1][0]  # back to back: nothing between the groups
    ds = vlmask.sweep(
        vl, PROMPT, videos=[frames], video_fps=4.0, mask="vision", vision_attention="bidirectional", progress=False
    )
    assert [tuple(r) for r in vision_ranges(ds)] == ranges
    # the reference makes each group bidirectional on its own: the first group cannot read the second
    clean = torch.log_softmax(reference_run(vl, built.inputs, set(), bidirectional=ranges)[2][-1].double(), -1)
    whole = [(ranges[0][0], ranges[-1][1])]  # what one merged range would allow
    merged = torch.log_softmax(reference_run(vl, built.inputs, set(), bidirectional=whole)[2][-1].double(), -1)
    assert not torch.allclose(clean, merged, atol=1e-4)
    for p in (ranges[0][0], ranges[1][0]):
        masked = torch.log_softmax(reference_run(vl, built.inputs, {p}, bidirectional=ranges)[2][-1].double(), -1)
        kl = float((clean.exp() * (clean - masked)).sum())
        assert float(ds["kl"].sel(token=p, step=0)) == pytest.approx(kl, abs=1e-5)


def test_the_cli_prints_one_range_per_frame_group(tmp_path_factory, frames, tmp_path, capsys, monkeypatch):
    vl = family_models("qwen2_vl", tmp_path_factory)[0]
    ranges = build_prompt(vl.processor, PROMPT, videos=[frames], video_fps=4.0).tokens.vision_ranges
    assert len(ranges) == 2
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--model", vl.name, "--video", str(frames), "--prompt", PROMPT, "--mask", "vision"]
    assert main([*argv, "--output", "video", "--no-progress"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vision tokens:")]
    assert printed == [
        f"vision tokens: positions {start}-{end - 1} ({end - start} tokens, video 0 frame group {t})"
        for t, (start, end) in enumerate(ranges)
    ]
