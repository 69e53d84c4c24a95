"""Packed passes at the work they need: per-row attention segments, the shared clean cache, the stage timings."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import xarray as xr

import vlmask
from interventions import BlockKeys
from vlmask.engine.attention_calls import Segments, packed_attention
from vlmask.engine.passes import PromptPasses
from vlmask.engine.stages import STAGES
from vlmask.inputs.prompt import build_prompt

PROMPT = "what color is the circle ?"


def _sweep(vl, images, **kw):
    return vlmask.sweep(vl, PROMPT, [images["square"]], mask="all", num_tokens=3, progress=False, **kw)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_segments_equal_the_dense_pack(tiny, tiny_eager, images, implementation, monkeypatch):
    """Per-row attention segments give the numbers one dense call over the whole pack gives."""
    vl = tiny if implementation == "sdpa" else tiny_eager
    calls, attend = [], Segments.attend

    def counted(self, *args, **kw):
        calls.append(len(self.firsts))
        return attend(self, *args, **kw)

    monkeypatch.setattr(Segments, "attend", counted)
    segmented = _sweep(vl, images, batch_size=6)
    assert calls and max(calls) == 6 and len(calls) % vl.num_layers == 0  # every layer of every packed pass
    monkeypatch.setenv("VLMASK_PACKED_ATTENTION", "dense")
    calls.clear()
    dense = _sweep(vl, images, batch_size=6)
    assert not calls
    assert float(dense["kl"].max()) > 1e-3
    for name in ("residual", "heads", "kl", "logprob_drop"):
        xr.testing.assert_allclose(segmented[name], dense[name], atol=1e-5, rtol=1e-4)
    xr.testing.assert_equal(segmented["masked_token_id"], dense["masked_token_id"])


def test_an_unknown_packed_attention_is_refused(monkeypatch):
    monkeypatch.setenv("VLMASK_PACKED_ATTENTION", "sparse")
    with pytest.raises(vlmask.VlmaskError, match=r"'sparse' is not known: expected one of \['segments', 'dense'\]"):
        packed_attention()


def test_a_pass_reads_the_clean_cache_without_copying_or_changing_it(tiny, images):
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    ids = built.inputs["input_ids"]
    passes = PromptPasses.of(tiny, built, ids.shape[1] + 1)
    dec = passes.clean_pass(ids, 2, attention=False).inputs
    before = [k.clone() for k in dec.keys]
    p = ids.shape[1] - 4
    done = passes.decoder_pass(dec, [BlockKeys((p,))], [dec.seq_len - 1], starts=[p + 1], extend=True)
    for k, kept in zip(dec.keys, before, strict=True):
        assert torch.equal(k, kept)  # the shared clean keys are unchanged
    own = done.inputs.keys[0]
    assert torch.equal(own[:, :, : p + 1], dec.keys[0][:, :, : p + 1])  # the row's own cache: clean before its start
    assert not torch.equal(own[:, :, p + 1 :], dec.keys[0][:, :, p + 1 :])  # and its own keys after


def test_every_stage_of_a_sweep_is_timed_at_debug(tiny, images, caplog):
    with caplog.at_level(logging.DEBUG, logger="vlmask.stages"):
        _sweep(tiny, images)
    seen = {r.stage for r in caplog.records if r.name == "vlmask.stages"}
    assert seen == set(STAGES)
    assert all(r.seconds >= 0 for r in caplog.records if r.name == "vlmask.stages")


def test_swaps_in_other_threads_wait_and_leave_nothing_behind():
    """The swap is process-wide: a second thread's pass waits for the first's to end; afterwards nothing is left."""
    import threading

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vlmask.engine.attention_calls import swapping

    had = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    inside, order = threading.Event(), []

    def first():
        with swapping("sdpa", lambda before, *a, **k: None):
            inside.set()
            time.sleep(0.3)
            order.append("first out")

    def second():
        inside.wait()
        with swapping("sdpa", lambda before, *a, **k: None):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first out", "second in"]
    assert ("sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping) == had


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_last_layer_computes_only_the_read_positions_and_the_first_each_position_once(
    tiny, tiny_eager, images, implementation, monkeypatch
):
    """Past the last layer's keys and values only the read positions matter: its MLP sees just those rows. A packed
    pass's first-layer projections see each position once, not once per row. Every number is what the pass that
    computes every row gives."""
    from vlmask.engine import steps
    from vlmask.engine.steps import LayerSteps

    vl = tiny if implementation == "sdpa" else tiny_eager
    rows: dict[str, list[int]] = {"mlp": [], "q": []}
    hooks = [
        vl.decoder.layers[-1].mlp.register_forward_hook(lambda m, a, y: rows["mlp"].append(y.shape[1])),
        vl.decoder.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, y: rows["q"].append(y.shape[1])),
    ]
    try:
        narrowed = _sweep(vl, images, batch_size=6)
        seen = {k: max(v) for k, v in rows.items()}
        for v in rows.values():
            v.clear()
        monkeypatch.setattr(LayerSteps, "_narrowed", lambda self, vl, attention: [])
        monkeypatch.setattr(steps, "first_projections", lambda vl: [])
        full = _sweep(vl, images, batch_size=6)
    finally:
        for hook in hooks:
            hook.remove()
    seq = narrowed.sizes["token"] + 2  # the prompt and the first two steps' tokens
    assert seen["mlp"] == 6 * 3  # a packed pass of 6 knockouts, each read at its 3 steps' positions
    assert seen["q"] <= seq < max(rows["q"])  # untrimmed: every recomputed position of every row
    assert max(rows["mlp"]) > 100
    assert float(full["kl"].max()) > 1e-3
    for name in ("residual", "heads", "kl", "logprob_drop"):
        xr.testing.assert_allclose(narrowed[name], full[name], atol=1e-6, rtol=1e-5)
    xr.testing.assert_equal(narrowed["masked_token_id"], full["masked_token_id"])
