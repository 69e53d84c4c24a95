"""Masked generation at the work it needs: knockouts that leave at different steps advance in one pass per step,
on caches written in place."""

from __future__ import annotations

import torch

from interventions import BlockKeys
from tests.reference import extended, reference_run
from vlmask.engine.backend import Backend
from vlmask.engine.passes import PromptPasses
from vlmask.engine.state import DecoderInputs
from vlmask.engine.steps import BufferLayer
from vlmask.inputs.prompt import build_prompt

PROMPT = "what color is the circle ?"


def test_knockouts_that_leave_at_different_steps_advance_in_one_pass_per_step(tiny, images, monkeypatch):
    """Three knockouts leave the clean continuation at steps 0, 1 and 2 with tokens of their own: each step after
    the first departure is one decoder pass of every row that has left, and each row continues exactly as a full
    greedy rerun under its knockout from the tokens it left with."""
    steps = 5
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    n, kinds = len(built.tokens), built.tokens.kind
    passes = PromptPasses.of(tiny, built, n + steps - 1)
    clean = passes.clean_pass(built.inputs["input_ids"], steps)
    clean_ids, dec = clean.tokens, clean.inputs
    positions = [kinds.index("vision") + 3, kinds.index("text", kinds.index("vision") + 1), 0]
    words = [t for t, kind in zip(built.tokens.ids, built.tokens.kind, strict=True) if kind == "text"]
    others = [t for t in dict.fromkeys(words) if t not in clean_ids.tolist()][:3]
    forced = clean_ids.repeat(3, 1)
    for row, word in enumerate(others):  # row r follows the clean tokens before step r, then leaves with its word
        forced[row, row] = word
    calls, run = [], Backend.run_decoder

    def counted(self, vl, inputs, plan, **kw):
        calls.append(len(plan.rows))
        return run(self, vl, inputs, plan, **kw)

    monkeypatch.setattr(Backend, "run_decoder", counted)
    writes, update = [], BufferLayer.update

    def written(self, keys, values, *args, **kw):
        writes.append(keys.shape[0])
        return update(self, keys, values, *args, **kw)

    monkeypatch.setattr(BufferLayer, "update", written)
    knockouts = [BlockKeys((p,)) for p in positions]
    out = passes.masked_generation(dec, clean_ids, forced, knockouts, [p + 1 for p in positions])
    assert calls == [3, 1, 2, 3, 3]  # the packed pass, then one pass per step (1-4): the rows that have left by then
    assert writes == [rows for rows in calls[1:] for _ in range(tiny.num_layers)]  # each step's pass: in place
    for row, p in enumerate(positions):
        want = forced[row, : row + 1].tolist()
        while len(want) < steps:
            want.append(int(reference_run(tiny, extended(built.inputs, want), {p})[2][-1].argmax()))
        assert out[row].tolist() == want, f"knockout of {p}"


def test_a_pass_on_stacked_inputs_writes_its_keys_in_place_and_computes_the_same(tiny, images):
    """Stacked inputs' passes append their keys and values into the buffers (no copy of the cache), with the
    numbers a pass that concatenates gives, to the bit."""
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    ids = built.inputs["input_ids"]
    passes = PromptPasses.of(tiny, built, ids.shape[1] + 2)
    dec = passes.clean_pass(ids, 1, attention=False).inputs
    rows = dec.packed_rows(tiny, ([*dec.keys], [*dec.values]), [dec.seq_len] * 2, [0, 1], dec.seq_len)
    rows = rows.append_text(tiny, [5, 7])
    stacked = DecoderInputs.stacked([rows], capacity=dec.seq_len + 2)
    knockouts, read = [BlockKeys((3,)), BlockKeys((8,))], [dec.seq_len]
    for _ in range(2):  # the second step continues on the first's keys, still in the same buffers
        plain = passes.decoder_pass(rows, knockouts, read, extend=True)
        buffered = passes.decoder_pass(stacked, knockouts, read, extend=True)
        assert torch.equal(plain.readout.logits, buffered.readout.logits)
        assert torch.equal(plain.readout.residual, buffered.readout.residual)
        for k, plain_k, buffer in zip(buffered.inputs.keys, plain.inputs.keys, stacked.buffers[0], strict=True):
            assert k.data_ptr() == buffer.data_ptr() and torch.equal(k, plain_k)
        rows, stacked = (done.inputs.append_text(tiny, [9, 9]) for done in (plain, buffered))
        read = [read[0] + 1]
    assert stacked.buffers is not None and stacked.keys[0].shape[2] == dec.seq_len + 2
