"""Triage: the attention gradients against finite differences, the estimate's algebra, and exact confirmation."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vlmask
from interventions import AblateHeads, At, BlockEdges, BlockKeys
from vlmask import VLModel
from vlmask.engine import edge_weights, triage
from vlmask.engine.attention_calls import model_function
from vlmask.engine.edge_weights import EdgeIndex, LayerEdges, cut_edges
from vlmask.engine.passes import NOTHING, PromptPasses
from vlmask.engine.triage import estimate, traced_forward
from vlmask.engine.triage_run import audit_figures, choose, clopper_pearson_upper
from vlmask.inputs.prompt import build_prompt
from vlmask.model.families import family_of
from vlmask.results.io import open_results, save_results

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes.png"
QUESTION = "what is in this image ?"


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny64(request, tiny_dir: Path) -> VLModel:
    """The tiny Qwen3-VL checkpoint (GQA, DeepStack) in float64, with sdpa and with eager."""
    hf = Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_dir, attn_implementation=request.param, dtype=torch.float64
    ).eval()
    return VLModel(
        hf=hf,
        processor=AutoProcessor.from_pretrained(tiny_dir),
        name=str(tiny_dir),
        builtin=False,
        family=family_of(hf.config),
    )


def _setup(vl: VLModel, image: Path, base=NOTHING):
    built = build_prompt(vl.processor, QUESTION, [image], "auto")
    ids = built.inputs["input_ids"]
    seq = ids.shape[1]
    passes = PromptPasses.of(vl, built, seq)
    clean = passes.clean_pass(ids, 1, base)
    plan = passes.plan([base], seq, [seq - 1], internals=False)
    return built, clean, plan, seq


@contextlib.contextmanager
def _scaled(vl: VLModel, layer: int, key: int, eps: float):
    """Attention to ``key`` from every later query at ``layer`` scaled by ``1 - eps`` (then renormalised)."""
    implementation = vl.attn_implementation
    before = ALL_ATTENTION_FUNCTIONS._local_mapping.get(implementation)
    target = vl.decoder.layers[layer].self_attn

    def wrapper(module, query, k, v, mask, **kw):
        if module is target:
            if mask is None:  # triage hands sdpa a plain causal mask as none (its causal kernel)
                mask = torch.ones(query.shape[-2], k.shape[-2], dtype=torch.bool).tril()[None, None]
            additive = (
                mask
                if mask.dtype != torch.bool
                else torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, float("-inf"))
            )
            additive = additive.clone()
            additive[..., key + 1 :, key] += math.log1p(-eps)
            mask = additive
        return model_function(module, implementation, before)(module, query, k, v, mask, **kw)

    ALL_ATTENTION_FUNCTIONS[implementation] = wrapper
    try:
        yield
    finally:
        if before is None:
            del ALL_ATTENTION_FUNCTIONS._local_mapping[implementation]
        else:
            ALL_ATTENTION_FUNCTIONS[implementation] = before


def _top_logprob(logits: torch.Tensor, top: int) -> torch.Tensor:
    return torch.log_softmax(logits[0], -1)[top]


def _probs_grad(traced, layer: int, scalar: torch.Tensor) -> torch.Tensor:
    """``d scalar / dA (head, seq, seq)`` at ``layer``: the gradient reaches A only through its output A @ V."""
    (grad,) = torch.autograd.grad(scalar, [traced.outputs[layer]], retain_graph=True)
    return grad[0] @ traced.values[layer][0].transpose(-1, -2)


def test_forward_is_the_models_own(tiny64, images):
    _, clean, plan, seq = _setup(tiny64, images["square"])
    traced = traced_forward(tiny64, clean.inputs, plan, [seq - 1])
    assert traced.difference < 1e-6  # A @ V from the model's q, k, v is its own output (eager: a float32 softmax)
    torch.testing.assert_close(traced.logits.detach().float(), clean.readout.logits[0], rtol=1e-6, atol=1e-6)


def test_forward_runs_under_the_base(tiny64, images):
    """Under a base that blocks keys, the traced forward is the base's clean run, not the unmodified model's."""
    built, free, _, seq = _setup(tiny64, images["square"])
    base = BlockKeys(tuple(p for p, kind in enumerate(built.tokens.kind) if kind == "vision"))
    _, clean, plan, _ = _setup(tiny64, images["square"], base)
    assert not torch.allclose(clean.readout.logits, free.readout.logits, atol=1e-4)
    traced = traced_forward(tiny64, clean.inputs, plan, [seq - 1])
    torch.testing.assert_close(traced.logits.detach().float(), clean.readout.logits[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 2])
def test_gradient_matches_finite_differences(tiny64, images, layer, monkeypatch):
    monkeypatch.setattr(triage, "REPRODUCED", (math.inf, math.inf))  # the scaled forwards differ on purpose
    built, clean, plan, seq = _setup(tiny64, images["square"])
    key = next(p for p, kind in enumerate(built.tokens.kind) if kind == "vision") + 2
    traced = traced_forward(tiny64, clean.inputs, plan, [seq - 1], every_row=True)
    top = int(traced.logits[0].argmax())
    a, g = traced.kept[layer][0], _probs_grad(traced, layer, _top_logprob(traced.logits, top))
    lost = a[:, key + 1 :, key]  # s_q of each later row, (head, q)
    direction = torch.zeros_like(a)  # d A / d eps of scaling the key's attention by (1 - eps), renormalised
    direction[:, key + 1 :] = a[:, key + 1 :] * lost[..., None]
    direction[:, key + 1 :, key] = -lost * (1 - lost)
    predicted = float((g * direction).sum())
    # five-point central difference: the model's RMSNorm (and eager's softmax) run in float32, so small steps
    # drown in its rounding; what is left is ~1e-7 / eps of it
    eps, moved = 0.03, {}
    for step in (-2, -1, 1, 2):
        with _scaled(tiny64, layer, key, step * eps):
            logits = traced_forward(tiny64, clean.inputs, plan, [seq - 1], every_row=True).logits.detach()
        moved[step] = float(_top_logprob(logits, top))
    finite = (moved[-2] - 8 * moved[-1] + 8 * moved[1] - moved[2]) / (12 * eps)
    assert abs(predicted) > 1e-8
    assert finite == pytest.approx(predicted, rel=1e-4, abs=1e-5)


def test_attention_it_cannot_reproduce_is_refused(tiny64, images):
    """Attention that is more than the masked softmax triage rebuilds (here: one key's scores shifted)."""
    built, clean, plan, seq = _setup(tiny64, images["square"])
    key = next(p for p, kind in enumerate(built.tokens.kind) if kind == "vision")
    with _scaled(tiny64, 1, key, 0.9), pytest.raises(vlmask.VlmaskError, match="does more than a masked softmax"):
        traced_forward(tiny64, clean.inputs, plan, [seq - 1])


@pytest.mark.parametrize("chunked", [False, True])
def test_first_order_is_the_exact_row_change(tiny64, images, monkeypatch, chunked):
    """Each knockout's first-order term, for several knockouts gathered at once, is ``G`` times its exact row change
    (also with one knockout key per block of edge weights)."""
    if chunked:
        monkeypatch.setattr(edge_weights, "CHUNK", 1)
    built, clean, plan, seq = _setup(tiny64, images["square"])
    vision = [p for p, kind in enumerate(built.tokens.kind) if kind == "vision"]
    values = [BlockKeys((vision[1], vision[3])), BlockEdges(sources=(vision[0],), targets=(seq - 1, seq - 3))]
    traced = traced_forward(tiny64, clean.inputs, plan, [seq - 1])
    layer = 1
    a = traced.kept[layer][0]
    g = torch.stack([_probs_grad(traced, layer, traced.logits[0, i]) for i in (0, 5)])  # two buckets' dM/dA
    outputs = torch.cat(
        [torch.autograd.grad(traced.logits[0, i], [traced.outputs[layer]], retain_graph=True)[0] for i in (0, 5)]
    )
    for chosen in (values, values[1:]):  # rows of several edges; each row one edge (rows_are_edges)
        edges = cut_edges(chosen, plan.allowed, seq)[layer]
        index = EdgeIndex.of(edges, seq, a.device)
        assert index.rows_are_edges == (len(chosen) == 1)
        mixed = a @ traced.values[layer][0]  # A @ V (the estimate takes the model's own output, equal to ~1e-9)
        got = LayerEdges.of(a, index).changes(outputs, mixed, traced.values[layer][0], len(chosen))
        for i, iv in enumerate(chosen):
            cut = iv.blocked_edges(At(layer, seq))
            pairs = sorted(map(tuple, iv.blocked_pairs(At(layer, seq)).tolist()))
            assert pairs == sorted(map(tuple, cut.nonzero().tolist()))
            kept = a.masked_fill(cut, 0.0)
            changed = kept / kept.sum(-1, keepdim=True) - a  # the exact row change, renormalised
            for b in range(2):
                want = float((g[b] * changed).sum())
                assert float(got[b, i]) == pytest.approx(want, rel=1e-9, abs=1e-12), iv


def test_the_last_layer_estimates_from_the_read_rows_alone(tiny64, images, monkeypatch):
    """The tap computes only the read query rows at the last layer; every estimate is the one from every row (and
    an edge cut there at a row nothing reads changes nothing)."""
    built, clean, plan, seq = _setup(tiny64, images["square"])
    vision = [p for p, kind in enumerate(built.tokens.kind) if kind == "vision"]
    last = tiny64.num_layers - 1
    values = [
        BlockKeys((vision[1],)),
        BlockKeys((vision[2], vision[4]), layers=(last,)),
        BlockEdges(sources=(vision[0],), targets=(seq - 1, seq - 3)),
        BlockEdges(sources=(vision[3],), targets=(seq - 2,), layers=(last,)),
    ]
    traced = traced_forward(tiny64, clean.inputs, plan, [seq - 1])
    assert traced.kept[last].shape[-2:] == (1, seq) and traced.kept[0].shape[-2:] == (seq, seq)
    got = estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    every = traced_forward
    monkeypatch.setattr(triage, "traced_forward", lambda *a, **kw: every(*a, **kw, every_row=True))
    want = estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    assert float(want.kl[1, 0]) > 1e-12 and float(want.kl[3, 0]) == 0.0
    torch.testing.assert_close(got.kl, want.kl, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got.logprob_drop, want.logprob_drop, rtol=1e-9, atol=1e-15)


def test_logprob_estimate_is_the_gradient_along_the_knockout(tiny64, images):
    built, clean, plan, seq = _setup(tiny64, images["square"])
    p = next(p for p, kind in enumerate(built.tokens.kind) if kind == "vision") + 1
    value = BlockKeys((p,), layers=(1,))
    est = estimate(tiny64, clean.inputs, plan, [value], [seq - 1])
    traced = traced_forward(tiny64, clean.inputs, plan, [seq - 1])
    top = int(traced.logits[0].argmax())
    grad = _probs_grad(traced, 1, _top_logprob(traced.logits, top))
    a = traced.kept[1][0]
    kept = a.clone()
    kept[:, p + 1 :, p] = 0.0
    direct = float((grad * (kept / kept.sum(-1, keepdim=True) - a)).sum())
    assert float(est.logprob_drop[0, 0]) == pytest.approx(-direct, rel=1e-5)  # float32 RMSNorm inside
    assert float(est.kl[0, 0]) >= 0.0


def test_planted_cell_is_confirmed_and_first(doctest_vl):
    """The built-in model's asked-about cell: the exact sweep's top unit is confirmed and ranked first."""
    vl = doctest_vl  # the built-in model
    question = "what color is the circle ?"
    exact = vlmask.sweep(vl, question, [SHAPES], mask="vision", progress=False)
    ds = vlmask.sweep(vl, question, [SHAPES], mask="vision", triage=2, triage_audit=3, progress=False)
    top = int(exact["kl"].sel(step=0).argmax("token"))
    assert bool(ds["confirmed"].isel(token=top))
    assert int(ds["estimate_kl"].sel(step=0).argmax("token")) == top
    exact_rows = ds["confirmed"] | ds["audited"]
    confirmed = int(ds["confirmed"].sum())  # the top 2, and any knockout with a saturated row
    assert confirmed == ds.attrs["triage_confirmed"] >= 2 and int(exact_rows.sum()) == confirmed + 3
    for name in ("kl", "logprob_drop", "prob_change_pct", "residual", "heads"):
        got, want = ds[name].where(exact_rows, drop=True), exact[name].where(exact_rows, drop=True)
        # the same passes on fewer knockouts: packs of other lengths, so float32 sums in another order
        np.testing.assert_allclose(got.values, want.values, rtol=1e-4, atol=1e-5)
        assert bool(ds[name].where(~exact_rows, drop=True).isnull().all())
    assert (ds["masked_token_id"].where(~exact_rows, drop=True) == -1).all()
    assert ds.attrs["triage_k"] == 2 and ds.attrs["triage_audit_size"] == 3
    assert ds.attrs["title"].startswith("triage: ")


def test_an_answer_is_estimated_and_confirmed_on_its_token(doctest_vl):
    """With an answer, the estimates and the exact values are about the answer's token, not the top one."""
    vl, question = doctest_vl, "what color is the circle ?"
    exact = vlmask.sweep(vl, question, [SHAPES], mask="vision", answer="green", progress=False)
    ds = vlmask.sweep(vl, question, [SHAPES], mask="vision", answer="green", triage=2, triage_audit=3, progress=False)
    greedy = vlmask.sweep(vl, question, [SHAPES], mask="vision", triage=2, triage_audit=3, progress=False)
    assert ds.attrs["measured_token"] == "answer" and ds["step_token"].values[0] != greedy["step_token"].values[0]
    rows = ds["confirmed"] | ds["audited"]
    got, want = ds["logprob_drop"].where(rows, drop=True), exact["logprob_drop"].where(rows, drop=True)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ds["estimate_logprob_drop"].values, greedy["estimate_logprob_drop"].values)
    # first order tracks the exact drop of the answer's log-probability where it was computed
    est = ds["estimate_logprob_drop"].where(rows, drop=True).values.ravel()
    assert np.corrcoef(est, got.values.ravel())[0, 1] > 0.5


def _checked(vl, **options):
    ds = vlmask.sweep(vl, QUESTION, **options, triage=2, triage_check=True, progress=False)
    assert ds.attrs["triage_check_max_difference"] < 1e-4
    assert np.isfinite(ds["estimate_kl"].values).all() and (ds["estimate_kl"].values >= 0).all()
    assert 0.0 <= ds.attrs["triage_check_recall_at_k"] <= 1.0
    return ds


def test_windows_text_units_and_eager(tiny, tiny_eager, images):
    for model in (tiny, tiny_eager):
        ds = _checked(model, images=[images["square"]], mask="prompt", layers=vlmask.windows(k=1), num_tokens=2)
        assert ds["estimate_kl"].dims == ("step", "token", "window")
        assert ds["confirmed"].dims == ("token", "window") and int(ds["confirmed"].sum()) >= 2


def test_block_edges_base_and_full_removal(tiny, images):
    built = build_prompt(tiny.processor, QUESTION, [images["square"]], "auto")
    seq = len(built.tokens)
    vision = [p for p, kind in enumerate(built.tokens.kind) if kind == "vision"]
    over = [BlockEdges(sources=(v,), targets=(seq - 1,)) for v in vision[:6]]
    ds = _checked(tiny, images=[images["square"]], over=over, base=BlockKeys((1,)))
    assert ds["estimate_kl"].dims == ("step", "intervention")
    keys = _checked(tiny, images=[images["wide"], images["other"]], mask="vision")
    full = _checked(tiny, images=[images["wide"], images["other"]], mask="vision", vision_removal="full")
    assert not np.allclose(keys["estimate_kl"].values, full["estimate_kl"].values)  # DeepStack term counted


def test_a_window_estimates_the_sum_of_its_layers(doctest_vl):
    """The log-prob estimate is first order, so a window's is the sum of its layers' (each alone): it
    checks that a window's estimate counts exactly its own layers."""
    options = dict(mask="prompt", triage=2, progress=False)
    one = vlmask.sweep(doctest_vl, "what color is the circle ?", [SHAPES], layers=vlmask.windows(k=1), **options)
    three = vlmask.sweep(doctest_vl, "what color is the circle ?", [SHAPES], layers=vlmask.windows(k=3), **options)
    per_layer = one["estimate_logprob_drop"].values  # (step, token, layer)
    layers = per_layer.shape[-1]
    for centre in range(layers):
        want = per_layer[..., max(0, centre - 1) : min(layers, centre + 2)].sum(-1)
        got = three["estimate_logprob_drop"].values[..., centre]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert np.abs(per_layer).max() > 1e-5  # not vacuous: some layer moves the answer


def test_round_trip_and_readers(doctest_vl, tmp_path):
    vl = doctest_vl
    ds = vlmask.sweep(vl, "what color is the circle ?", [SHAPES], mask="vision", triage=3, progress=False)
    back = open_results(save_results(ds, tmp_path / "triage.nc"))
    xr.testing.assert_identical(back, ds)
    assert back["top_changed"].dtype == float and back["confirmed"].dtype == bool


def test_refusals(tiny, images):
    with pytest.raises(vlmask.VlmaskError, match="cut attention edges"):
        vlmask.sweep(tiny, QUESTION, [images["square"]], over=[AblateHeads(layer=0, heads=(1,))], triage=1)
    with pytest.raises(vlmask.VlmaskError, match="give triage"):
        vlmask.SweepSpec(QUESTION, triage_check=True)


def test_choice_and_audit_figures():
    score = np.array([5.0, 1.0, 4.0, 0.0, 3.0, 2.0, 0.5, 0.1])
    confirmed, audited = choose(score, 2, np.array([0, 0, 0, 1, 0, 0, 0, 0], bool), 2)
    assert np.flatnonzero(confirmed).tolist() == [0, 2, 3] and int(audited.sum()) == 2
    assert not (confirmed & audited).any()
    exact = np.where(confirmed | audited, score, np.nan)
    figures = audit_figures(exact, confirmed, audited, 2)
    assert figures["triage_unexamined"] == 3
    assert figures["triage_audit_rate_upper95"] == pytest.approx(clopper_pearson_upper(figures["triage_audit_hits"], 2))
    assert clopper_pearson_upper(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300))


def test_views_accept_triage_results(doctest_vl, tmp_path):
    vl = doctest_vl
    ds = vlmask.sweep(vl, "what color is the circle ?", [SHAPES], mask="vision", triage=3, progress=False)
    heat = ds.vlmask.heatmap("estimate_kl")
    assert heat.attrs["triage"].startswith("triage estimate") and int(heat.notnull().sum()) == 16
    exact = ds.vlmask.heatmap("kl")
    assert "exact for" in exact.attrs["triage"] and int(exact.notnull().sum()) == int(
        (ds["confirmed"] | ds["audited"]).sum()
    )
    assert ds.vlmask.plot(tmp_path / "estimate.png", "estimate_kl").stat().st_size > 0
    page = ds.vlmask.report(tmp_path / "report.html").read_text()
    assert "estimate_kl" in page
    both = ds.vlmask.compare(vlmask.sweep(vl, "what color is the circle ?", [SHAPES], mask="vision", progress=False))
    assert both.sizes["token"] == 16
    from vlmask.batch.summary import summarize

    assert len(summarize([save_results(ds, tmp_path / "t.nc")])) > 0


def test_cli_flags(tiny_dir, images, tmp_path, capsys):
    from vlmask.cli import main

    args = ["run", "--model", str(tiny_dir), "--prompt", QUESTION, "--image", str(images["square"])]
    args += ["--mask", "vision", "--output", "t", "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*args, "--triage", "2", "--triage-audit", "1"]) == 0
    ds = open_results(tmp_path / "t.nc")
    assert int(ds["confirmed"].sum()) >= 2 and int(ds["audited"].sum()) == 1
    assert main([*args, "--overwrite", "--triage-check"]) == 2
    assert "--triage" in capsys.readouterr().err


def test_one_backward_per_bucket_gives_the_batched_estimates(tiny64, images, monkeypatch):
    """Where autograd cannot batch the backward passes, one per bucket gives the same estimates."""
    built, clean, plan, seq = _setup(tiny64, images["square"])
    vision = [p for p, kind in enumerate(built.tokens.kind) if kind == "vision"]
    values = [BlockKeys((p,)) for p in vision[:4]]
    grad, calls = torch.autograd.grad, []

    def counted(*args, is_grads_batched=False, **kw):
        calls.append(is_grads_batched)
        return grad(*args, is_grads_batched=is_grads_batched, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    batched = estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    assert calls == [True]  # one step: one batched backward pass, no fallback

    def unbatched(*args, is_grads_batched=False, **kw):
        if is_grads_batched:
            raise RuntimeError("no batching rule (test)")
        return grad(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", unbatched)
    each = estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    assert torch.allclose(each.kl, batched.kl, rtol=1e-10, atol=1e-14)
    assert torch.allclose(each.logprob_drop, batched.logprob_drop, rtol=1e-10, atol=1e-14)


def test_a_16_bit_model_is_estimated_in_float32_sums():
    """The built-in model in bfloat16: every estimate finite, and the exact top unit ranked first by the estimate."""
    vl = vlmask.load_model(dtype="bfloat16")
    ds = vlmask.sweep(vl, "what color is the circle ?", [SHAPES], mask="vision", triage=2, progress=False)
    estimate_kl = ds["estimate_kl"].sel(step=0)
    assert bool(estimate_kl.notnull().all()) and float(estimate_kl.max()) > 0
    exact_top = int(ds["kl"].sel(step=0).fillna(-1).argmax("token"))
    assert int(estimate_kl.argmax("token")) == exact_top and bool(ds["confirmed"].isel(token=exact_top))


def test_a_plain_causal_mask_reaches_sdpa_as_none(tiny64, images, monkeypatch):
    """Under sdpa, the clean forward's plain causal mask is handed over as none (the causal kernel, at every layer
    but the last, which computes the read row only) and gives the same estimates as the mask itself; a base that
    cuts edges keeps its mask; eager always gets its mask."""
    built, clean, plan, seq = _setup(tiny64, images["square"])
    vision = [p for p, kind in enumerate(built.tokens.kind) if kind == "vision"]
    values = [BlockKeys((p,)) for p in vision[:4]]
    seen, own = [], triage.model_function

    def spied(module, implementation, before):
        call = own(module, implementation, before)
        return lambda m, q, k, v, mask, **kw: (seen.append(mask is None), call(m, q, k, v, mask, **kw))[1]

    monkeypatch.setattr(triage, "model_function", spied)
    fast = estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    whole, last = seen[:-1], seen[-1]  # the last layer computes the read row only: its row of the mask
    assert whole and all(whole) == (tiny64.attn_implementation == "sdpa") and any(whole) == all(whole) and not last
    monkeypatch.setattr(triage._Tap, "_causal", lambda self, mask, query, key: False)
    masked = estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    assert torch.allclose(fast.kl, masked.kl, rtol=1e-9, atol=1e-12)
    assert torch.allclose(fast.logprob_drop, masked.logprob_drop, rtol=1e-9, atol=1e-12)
    monkeypatch.undo()
    monkeypatch.setattr(triage, "model_function", spied)
    base = BlockKeys((vision[-1],))
    built, clean, plan, seq = _setup(tiny64, images["square"], base)
    seen.clear()
    estimate(tiny64, clean.inputs, plan, values, [seq - 1])
    assert seen and not any(seen)  # the base's mask is not plain causal


def test_check_mode_prices_the_exhaustive_sweep_with_its_own_head_means(tiny, images, monkeypatch):
    """Under a mean-ablation base, the check's exhaustive sweep computes its own head means, as a sweep would."""
    calls, made = [], PromptPasses.with_head_means

    def counted(self, prompt_ids):
        calls.append(prompt_ids.shape)
        return made(self, prompt_ids)

    monkeypatch.setattr(PromptPasses, "with_head_means", counted)
    _checked(tiny, images=[images["square"]], mask="vision", base=AblateHeads(layer=0, heads=(0,), mode="mean"))
    assert len(calls) == 2  # the triage's, then the exhaustive sweep's
