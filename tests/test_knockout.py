"""The engine's knockout against an independent plain-PyTorch reference, and its invariants."""

from __future__ import annotations

import pytest
import torch

import vlmask
from interventions import BlockKeys
from tests.reference import greedy, reference_run
from vlmask.engine.passes import PromptPasses
from vlmask.engine.state import PassPlan
from vlmask.inputs.prompt import build_prompt

PROMPT = "what color is the circle ?"


def _engine(vl, built, blocked, layers=None, vision_attention="native"):
    seq = built.inputs["input_ids"].shape[1]
    passes = PromptPasses.of(vl, built, seq, vision_attention)
    out = passes.model_pass(built.inputs["input_ids"], [BlockKeys(tuple(blocked), layers)], list(range(seq))).readout
    return out.residual[0], out.heads[0].flatten(-2), out.logits[0]


def _which(built, which):
    kinds = built.tokens.kind
    return {
        "first": 0,
        "text": kinds.index("text", kinds.index("vision") + 1),
        "vision": kinds.index("vision") + 5,
        "last": len(kinds) - 1,
        "before-last": len(kinds) - 2,
    }[which]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["first", "text", "vision", "before-last", "last"])
def test_knockout_equals_plain_pytorch_reference(tiny, tiny_eager, images, implementation, which):
    vl = tiny if implementation == "sdpa" else tiny_eager
    built = build_prompt(vl.processor, PROMPT, [images["square"]])
    p = _which(built, which)
    got = _engine(vl, built, {p})
    want = reference_run(vl, built.inputs, {p})
    for name, g, w in zip(("residual", "heads", "logits"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"{name} differs at p={p}")
    clean = reference_run(vl, built.inputs, set())
    if which != "last":
        assert not torch.allclose(want[2][p + 1 :], clean[2][p + 1 :], atol=1e-4), "knockout changed nothing"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_positions_up_to_p_are_bit_identical(tiny, tiny_eager, images, implementation):
    vl = tiny if implementation == "sdpa" else tiny_eager
    built = build_prompt(vl.processor, PROMPT, [images["square"]])
    seq = built.inputs["input_ids"].shape[1]
    passes = PromptPasses.of(vl, built, seq)
    ids = built.inputs["input_ids"]
    clean = passes.model_pass(ids, [BlockKeys(())], list(range(seq))).readout
    positions = [0, 4, 12, seq - 3]
    knockouts = [BlockKeys((p,)) for p in positions]
    out = passes.model_pass(ids.expand(len(positions), -1), knockouts, list(range(seq))).readout
    for row, p in enumerate(positions):
        assert torch.equal(out.residual[row, :, : p + 1], clean.residual[0, :, : p + 1])
        assert torch.equal(out.logits[row, : p + 1], clean.logits[0, : p + 1])
        assert not torch.equal(out.logits[row, p + 1 :], clean.logits[0, p + 1 :])


def test_blocking_nothing_equals_the_native_forward(tiny, images):
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    residual, _, logits = _engine(tiny, built, set())
    with torch.no_grad():
        native = tiny.hf(**built.inputs, output_hidden_states=True)
    torch.testing.assert_close(logits, native.logits[0], atol=1e-5, rtol=1e-5)
    for layer in range(tiny.num_layers - 1):  # hidden_states[i + 1] is layer i's output (the last one is normed)
        torch.testing.assert_close(residual[layer], native.hidden_states[layer + 1][0], atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager(tiny, tiny_eager, images):
    kwargs = {"mask": "all", "num_tokens": 3, "progress": False}
    a = vlmask.sweep(tiny, PROMPT, [images["square"]], **kwargs)
    b = vlmask.sweep(tiny_eager, PROMPT, [images["square"]], **kwargs)
    for name in ("residual", "heads", "kl", "logprob_drop"):
        torch.testing.assert_close(
            torch.from_numpy(a[name].values), torch.from_numpy(b[name].values), atol=1e-5, rtol=1e-4
        )
    assert (a["masked_token_id"] == b["masked_token_id"]).all()
    assert b.attrs["attn_implementation"] == "eager"


@pytest.mark.parametrize("layers", [(0,), (1, 2)])
def test_blocking_at_chosen_layers_only(tiny_eager, images, layers):
    built = build_prompt(tiny_eager.processor, PROMPT, [images["square"]])
    p = _which(built, "text")
    got = _engine(tiny_eager, built, {p}, layers=layers)
    want = reference_run(tiny_eager, built.inputs, {p}, layers=set(layers))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    everywhere = reference_run(tiny_eager, built.inputs, {p})
    assert not torch.allclose(want[2], everywhere[2], atol=1e-4)


def test_bidirectional_vision_is_an_explicit_non_native_option(tiny, images):
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    ranges = built.tokens.vision_ranges
    p = _which(built, "text")
    got = _engine(tiny, built, {p}, vision_attention="bidirectional")
    want = reference_run(tiny, built.inputs, {p}, bidirectional=ranges)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    native = _engine(tiny, built, {p})
    assert not torch.allclose(got[2], native[2], atol=1e-4)
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], vision_attention="bidirectional", progress=False)
    assert ds.attrs["vision_attention"] == "bidirectional" and ds.attrs["vision_attention_native"] == 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bidirectional_vision_knockouts_of_image_tokens_equal_the_reference(tiny, tiny_eager, images, implementation):
    """Under bidirectional vision attention an image's earlier tokens read its later ones, so knocking out a
    vision token changes the image's tokens before it too (from the next layer on): the sweep must recompute
    them, and every vision knockout's KL equals the hand-masked reference's."""
    vl = tiny if implementation == "sdpa" else tiny_eager
    built = build_prompt(vl.processor, PROMPT, [images["square"]])
    ranges = built.tokens.vision_ranges
    ds = vlmask.sweep(vl, PROMPT, [images["square"]], mask="vision", vision_attention="bidirectional", progress=False)
    clean = reference_run(vl, built.inputs, set(), bidirectional=ranges)[2][-1]
    positions = ds["token"].values.tolist()
    assert len(positions) == sum(end - start for start, end in ranges) > 2
    for i, p in enumerate(positions):
        knocked = reference_run(vl, built.inputs, {p}, bidirectional=ranges)[2][-1]
        assert float(ds["kl"].isel(token=i, step=0)) == pytest.approx(_kl(clean, knocked), abs=1e-5), p


def _kl(clean, masked):
    pc, pm = torch.softmax(clean.double(), -1), torch.softmax(masked.double(), -1)
    return float((pc * (pc.log() - pm.log())).sum())


@pytest.mark.parametrize("image", [True, False])
def test_sweep_metrics_match_reference(tiny, images, image):
    steps = 3
    files = [images["square"]] if image else []
    ds = vlmask.sweep(tiny, PROMPT, files, mask="all", num_tokens=steps, batch_size=5, progress=False)
    built = build_prompt(tiny.processor, PROMPT, files)
    clean_ids = greedy(tiny, built.inputs, steps)
    assert ds["step_token_id"].values.tolist() == clean_ids
    from tests.reference import extended

    forced = extended(built.inputs, clean_ids[:-1])
    n = built.inputs["input_ids"].shape[1]
    clean = reference_run(tiny, forced, set())
    kinds = built.tokens.kind
    chosen = {0, kinds.index("text", 1), n - 2, n - 1}
    if image:
        chosen |= {kinds.index("vision"), kinds.index("vision") + 7, kinds.index("text", kinds.index("vision"))}
    for p in sorted(chosen):
        masked = reference_run(tiny, forced, {p})
        for step in range(steps):
            pos = n - 1 + step
            row = ds.sel(token=p, step=step)
            d = masked[0][:, pos] - clean[0][:, pos]
            torch.testing.assert_close(
                torch.from_numpy(row["residual"].sel(metric="l2").values), d.norm(dim=-1), atol=1e-5, rtol=1e-4
            )
            cos = torch.nn.functional.cosine_similarity(masked[0][:, pos], clean[0][:, pos], dim=-1)
            torch.testing.assert_close(
                torch.from_numpy(row["residual"].sel(metric="cosine").values), 1 - cos, atol=1e-5, rtol=1e-3
            )
            head_d = (masked[1][:, pos] - clean[1][:, pos]).unflatten(-1, (tiny.num_heads, -1)).norm(dim=-1)
            torch.testing.assert_close(
                torch.from_numpy(row["heads"].sel(metric="l2").values), head_d, atol=1e-5, rtol=1e-4
            )
            assert float(row["kl"]) == pytest.approx(_kl(clean[2][pos], masked[2][pos]), abs=1e-5)
            top = int(clean[2][pos].argmax())
            lc, lm = (torch.log_softmax(x[2][pos].double(), -1)[top] for x in (clean, masked))
            assert float(row["logprob_drop"]) == pytest.approx(float(lc - lm), abs=1e-5)
            assert float(row["prob_change_pct"]) == pytest.approx(
                float((lm.exp() - lc.exp()) / lc.exp() * 100), abs=1e-3
            )
            assert bool(row["top_changed"]) == (int(masked[2][pos].argmax()) != top)


def test_masked_generation_equals_naive_greedy(tiny, images):
    steps = 4
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=steps, progress=False)
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    clean = ds["step_token_id"].values.tolist()
    diverged = 0
    for p in ds["token"].values:
        want = greedy(tiny, built.inputs, steps, {int(p)})
        assert ds["masked_token_id"].sel(token=p).values.tolist() == want, f"token {p}"
        diverged += want != clean
    assert diverged > 0, "no knockout changed the generation: the test would not see a wrong continuation"


def test_batch_size_does_not_change_results(tiny, images):
    a = vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=2, batch_size=1, progress=False)
    b = vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=2, batch_size=7, progress=False)
    c = vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=2, max_memory="1KiB", progress=False)
    for name in ("residual", "heads", "kl"):
        for other in (b, c):
            torch.testing.assert_close(
                torch.from_numpy(a[name].values), torch.from_numpy(other[name].values), atol=1e-5, rtol=1e-5
            )


def test_passes_follow_the_batch_size_and_the_memory_budget():
    from vlmask.engine.packing import plan_batches

    starts = [1, 5, 20, 21, 22]
    assert plan_batches(starts, 25, None, lambda p, r: True) == [slice(0, 5)]
    assert plan_batches(starts, 25, 2, lambda p, r: True) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    # recomputed positions 24, 20, 5, 4, 3: 24 + 20 do not fit in 30, 20 + 5 + 4 do, one more does not
    assert plan_batches(starts, 25, None, lambda p, r: p <= 30) == [slice(0, 1), slice(1, 4), slice(4, 5)]
    assert plan_batches(starts, 25, None, lambda p, r: False) == [slice(k, k + 1) for k in range(5)]


def test_blocking_the_measured_position_itself_changes_nothing_at_that_step(tiny, images):
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=2, progress=False)
    last = int(ds["step_position"].sel(step=0))
    row = ds.sel(token=last, step=0)
    assert float(row["kl"]) == 0.0 and float(abs(row["residual"]).max()) == 0.0
    assert float(ds.sel(token=last, step=1)["kl"]) > 0.0


def test_first_changed_position():
    knockouts = [BlockKeys((4,)), BlockKeys((4, 2)), BlockKeys((9,)), BlockKeys((4,), layers=(5,))]
    assert PassPlan.first_changed(knockouts, seq_len=10, num_layers=2) == [5, 3, 10, 10]


@pytest.mark.parametrize("which", ["text", "vision"])
def test_a_knockouts_own_cache_continues_exactly_like_a_full_rerun(tiny, images, which):
    """Masked generation's path: recompute a knockout's positions once, then one new position per step."""
    from tests.reference import extended

    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    n, p = len(built.tokens), _which(built, which)
    passes = PromptPasses.of(tiny, built, n + 2)
    dec = passes.clean_pass(built.inputs["input_ids"], 1).inputs
    tokens = [built.tokens.ids[-3], built.tokens.ids[-4]]
    want = reference_run(tiny, extended(built.inputs, tokens), {p})
    own = dec.append_text(tiny, tokens[0])
    done = passes.decoder_pass(own, [BlockKeys((p,))], [n], starts=[p + 1], extend=True)
    first, own = done.readout, done.inputs.append_text(tiny, tokens[1])
    second = passes.decoder_pass(own, [BlockKeys((p,))], [n + 1], starts=[n + 1], extend=True).readout
    torch.testing.assert_close(first.logits[0, 0], want[2][n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.logits[0, 0], want[2][n + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.residual[0, :, 0], want[0][:, n + 1], atol=1e-5, rtol=1e-5)


def test_knockouts_that_leave_together_advance_together_on_their_own_caches(tiny, images):
    """Three knockouts leave the clean continuation at step 0 with different tokens; each must then
    continue exactly as a full greedy rerun under that knockout, from that token."""
    from tests.reference import extended

    steps = 4
    built = build_prompt(tiny.processor, PROMPT, [images["square"]])
    n = len(built.tokens)
    passes = PromptPasses.of(tiny, built, n + steps - 1)
    clean = passes.clean_pass(built.inputs["input_ids"], steps)
    clean_ids, dec = clean.tokens, clean.inputs
    positions = [_which(built, "text"), _which(built, "vision"), _which(built, "first")]
    words = [t for t, kind in zip(built.tokens.ids, built.tokens.kind, strict=True) if kind == "text"]
    firsts = [t for t in dict.fromkeys(words) if t != int(clean_ids[0])][:3]
    forced = clean_ids.repeat(3, 1)
    forced[:, 0] = torch.tensor(firsts)
    knockouts = [BlockKeys((p,)) for p in positions]
    out = passes.masked_generation(dec, clean_ids, forced, knockouts, [p + 1 for p in positions])
    for row, p in enumerate(positions):
        want = [firsts[row]]
        for _ in range(steps - 1):
            want.append(int(reference_run(tiny, extended(built.inputs, want), {p})[2][-1].argmax()))
        assert out[row].tolist() == want, f"knockout of {p}"
    assert len({tuple(r) for r in out.tolist()}) == 3
