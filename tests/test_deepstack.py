"""Qwen3-VL's ``vision_removal="full"``: a blocked vision key also gets no DeepStack features, against a reference.

The reference is the model's own forward with a hand-built mask (tests/reference.py) and a
plain forward pre-hook on the language decoder that zeroes the DeepStack rows of the blocked
vision positions, so nothing is added there after the first decoder layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import vlmask
from interventions import BlockKeys
from tests.conftest import family_models
from tests.reference import decoder_of, extended, reference_run
from vlmask.inputs.prompt import build_prompt

PROMPT = "what color is the circle ?"


@contextmanager
def without_deepstack_at(hf, positions: set[int]):
    """The decoder adds no DeepStack features at ``positions`` (zeroed rows of ``deepstack_visual_embeds``)."""

    def pre(module, args, kwargs):
        visual = kwargs.get("visual_pos_masks")
        if visual is None:
            return args, kwargs
        rows = [int(visual[0, :p].sum()) for p in sorted(positions) if visual[0, p]]
        levels = []
        for level in kwargs["deepstack_visual_embeds"]:
            level = level.clone()
            level[rows] = 0.0
            levels.append(level)
        return args, {**kwargs, "deepstack_visual_embeds": levels}

    handle = decoder_of(hf).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _log_probs(vl, inputs, blocked, layers, removed):
    with without_deepstack_at(vl.hf, removed):
        logits = reference_run(vl, inputs, blocked, layers=layers)[2]
    return torch.log_softmax(logits[-1].double(), -1)


def _kl(clean, masked):
    return float((clean.exp() * (clean - masked)).sum())


@pytest.mark.parametrize("backend", ["nnsight", "hooks"])
@pytest.mark.parametrize("layers", [None, (0,)], ids=["all-layers", "layer-0"])
def test_full_removal_equals_the_reference_that_zeroes_deepstack(tiny, images, layers, backend):
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    vision = [p for p, kind in enumerate(built.tokens.kind) if kind == "vision"]
    chosen = [vision[0], vision[5], vision[-1]]
    options = dict(mask=",".join(map(str, chosen)), num_tokens=2, progress=False, backend=backend)
    if layers is not None:
        options["layers"] = layers
    full = vlmask.sweep(tiny, PROMPT, [images["square"]], vision_removal="full", **options)
    keys = vlmask.sweep(tiny, PROMPT, [images["square"]], **options)
    assert (full.attrs["vision_removal"], keys.attrs["vision_removal"]) == ("full", "keys")
    clean_ids = full["step_token_id"].values.tolist()
    keys_off = []  # how far "keys" is from the reference that withholds DeepStack
    for step, inputs in enumerate([built.inputs, extended(built.inputs, clean_ids[:1])]):
        clean = _log_probs(tiny, inputs, set(), None, set())
        for p in chosen:
            want = _kl(clean, _log_probs(tiny, inputs, {p}, layers, {p}))
            got, by_keys = (float(ds["kl"].sel(token=p, step=step)) for ds in (full, keys))
            assert got == pytest.approx(want, abs=1e-6), f"p={p} step={step}"  # measured: within 3e-7
            keys_off.append(abs(by_keys - want))
    if layers is None:
        # blocked at every layer, the position is read by no one: its own DeepStack features change nothing
        assert max(keys_off) < 1e-6
    else:
        # read at layers 1-2, its stream without DeepStack features is what later positions see there
        # (measured: "keys" is 4e-6 to 5e-5 nats off the reference on this tiny random model)
        assert max(keys_off) > 1e-5


def test_full_removal_is_refused_for_a_family_without_deepstack(tmp_path_factory, images):
    vl = family_models("qwen2_vl", tmp_path_factory)[0]
    with pytest.raises(vlmask.VlmaskError, match=r"only Qwen3-VL adds, and model .* is Qwen2-VL: use vision removal"):
        vlmask.sweep(vl, PROMPT, [images["square"]], mask="vision", vision_removal="full", progress=False)


def test_full_removal_is_refused_for_a_base_that_blocks_vision_keys(tiny, images):
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    p = built.tokens.kind.index("vision")
    with pytest.raises(vlmask.VlmaskError, match=f"the base blocks vision keys \\[{p}\\]"):
        vlmask.sweep(tiny, PROMPT, [images["square"]], base=BlockKeys((p,)), vision_removal="full", progress=False)


def test_the_spec_takes_keys_or_full():
    assert vlmask.SweepSpec("hi").vision_removal == "keys"
    with pytest.raises(vlmask.VlmaskError, match="vision removal 'all' is not known: expected one of keys, full"):
        vlmask.SweepSpec("hi", vision_removal="all")
