"""The clean attention readout and its agreement with the knockouts."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr
from PIL import Image

import vlmask
from interventions import BlockKeys
from tests.browser import needs_chromium, open_page, screenshot
from tests.family_table import attention_readout_error, eager_attentions
from tests.reference import extended
from vlmask.cli import main
from vlmask.engine.attention_read import value_norms
from vlmask.engine.passes import PromptPasses
from vlmask.engine.state import PassPlan
from vlmask.inputs.prompt import build_prompt
from vlmask.results.agreement import ranks, sink_flags, spearman, top_k_overlap
from vlmask.viz.compare import compare_data
from vlmask.viz.heatmap import agreement_text, heatmap

PROMPT = "what color is the circle ?"
SHAPES = "examples/shapes.png"
ARTIFACTS = Path(__file__).parent / "artifacts"

# ---- agreement metrics against scipy / numpy, ties included ------------------------------------

CASES = [
    (np.array([0.1, 0.5, 0.2, 0.9, 0.3]), np.array([1.0, 3.0, 2.0, 5.0, 4.0])),
    (np.array([0.2, 0.2, 0.1, 0.5, 0.5, 0.0]), np.array([3.0, 1.0, 1.0, 2.0, 0.0, 0.0])),  # ties on both sides
    (np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 3.0, 2.0, 1.0])),
    (np.array([0.0, 0.0, 0.0, 1.0, 1.0]), np.array([5.0, 5.0, 1.0, 2.0, 2.0])),
]


@pytest.mark.parametrize(("a", "b"), CASES)
def test_spearman_and_ranks_equal_scipy(a, b):
    np.testing.assert_allclose(ranks(a), scipy.stats.rankdata(a))
    assert float(spearman(a, b)) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_along_the_last_axis_of_a_transposed_array():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (6, 3)).astype(float), rng.integers(0, 4, (6, 3)).astype(float)  # many ties
    got = spearman(a.T, b.T)  # the last axis is a strided view
    want = [scipy.stats.spearmanr(a[:, i], b[:, i]).statistic for i in range(3)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_spearman_of_a_constant_is_nan():
    assert np.isnan(spearman(np.ones(4), np.arange(4.0)))


def _top_k_by_hand(a, b, k):
    k = min(k, len(a))
    top_a = sorted(range(len(a)), key=lambda i: (-a[i], i))[:k]
    top_b = sorted(range(len(b)), key=lambda i: (-b[i], i))[:k]
    return len(set(top_a) & set(top_b)) / k


@pytest.mark.parametrize(("a", "b"), CASES)
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_top_k_overlap_equals_hand_count(a, b, k):
    assert float(top_k_overlap(a, b, k)) == pytest.approx(_top_k_by_hand(a, b, k))


def test_top_k_overlap_breaks_ties_by_position():
    # the two tied largest of a: positions 1 and 2; top-1 of a is position 1, which is b's top
    assert float(top_k_overlap(np.array([0.0, 2.0, 2.0]), np.array([0.0, 1.0, 0.5]), 1)) == 1.0
    assert float(top_k_overlap(np.array([0.0, 2.0, 2.0]), np.array([0.0, 0.5, 1.0]), 1)) == 0.0


def test_sink_flags_equal_numpy_percentiles():
    rng = np.random.default_rng(1)
    attention, effect = rng.random((3, 20)), rng.random((3, 20))
    attention[:, 5] = attention[:, 6]  # a tie
    want = (attention >= np.percentile(attention, 90, axis=1)[:, None]) & (
        effect <= np.percentile(effect, 50, axis=1)[:, None]
    )
    np.testing.assert_array_equal(sink_flags(attention, effect), want)
    assert want.any() and not want.all()


# ---- the readout ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl(doctest_vl):
    return doctest_vl  # the built-in model


@pytest.fixture(scope="module")
def eager_vl():
    return vlmask.load_model(attn_implementation="eager")


@pytest.fixture(scope="module")
def shapes(vl):
    return build_prompt(vl.processor, PROMPT, [SHAPES])


@pytest.mark.parametrize("backend", ["nnsight", "hooks"])
def test_builtin_readout_equals_eager_output_attentions(vl, eager_vl, backend):
    for model in (vl, eager_vl):
        assert attention_readout_error(model, eager_vl, {"square": SHAPES}, backend, steps=3) <= 1e-5


def _clean(vl, built, steps, **kw):
    ids = built.inputs["input_ids"]
    passes = PromptPasses.of(vl, built, ids.shape[1] + steps - 1, kw.pop("vision_attention", "native"))
    return passes.clean_pass(ids, steps, **kw)


def test_readout_uses_the_mask_of_the_clean_pass(vl, eager_vl, shapes):
    """A base knockout and bidirectional vision attention change the clean pass's mask: the readout follows."""
    steps, ids = 2, shapes.inputs["input_ids"]
    read = list(range(ids.shape[1] - 1, ids.shape[1] + steps - 1))
    start, end = shapes.tokens.vision_ranges[0]
    cases = [
        ({"base": BlockKeys((start + 1,))}, {"blocked": {start + 1}}),
        ({"vision_attention": "bidirectional"}, {"bidirectional": [(start, end)]}),
    ]
    for kw, mask in cases:
        clean = _clean(vl, shapes, steps, attention=True, **kw)
        want = eager_attentions(eager_vl, extended(shapes.inputs, clean.tokens[:-1].tolist()), read, **mask)
        torch.testing.assert_close(clean.readout.attention[0], want, atol=1e-5, rtol=0)
    blocked = _clean(vl, shapes, steps, attention=True, base=BlockKeys((start + 1,))).readout.attention
    assert float(blocked[..., start + 1].abs().max()) == 0.0


def test_value_norms_equal_the_projected_values(vl, shapes):
    clean = _clean(vl, shapes, 2, attention=True)
    norms = value_norms(vl, clean.inputs.values)
    layer, heads = 2, vl.num_heads
    v = clean.inputs.values[layer][0]  # (kv_head, seq, d)
    v = v.repeat_interleave(heads // v.shape[0], dim=0)
    w = vl.decoder.layers[layer].self_attn.o_proj.weight.detach().unflatten(1, (heads, -1))  # (hidden, head, d)
    direct = torch.stack([(v[h] @ w[:, h].T).norm(dim=-1) for h in range(heads)])
    torch.testing.assert_close(norms[layer], direct, atol=1e-5, rtol=1e-5)


def test_plan_refuses_attention_over_several_packed_rows():
    with pytest.raises(ValueError, match="one packed row"):
        edges = torch.ones(4, 4, dtype=torch.bool)
        PassPlan.build(edges, [BlockKeys(())] * 2, 1, 4, [3], starts=[1, 2], attention=True)


# ---- the Dataset ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(vl):
    return vlmask.sweep(vl, PROMPT, [SHAPES], mask="vision", num_tokens=2, progress=False)


def test_sweep_variables_and_their_meaning(swept):
    ds = swept
    assert ds["attention"].dims == ("step", "token", "layer", "head")
    assert ds["attention_seq"].dims == ("step", "seq", "layer", "head")
    assert ds["agreement_spearman"].dims == ("step", "layer", "attention_source", "effect")
    assert ds["agreement_top_k"].dims == ("step", "layer", "attention_source", "effect", "k")
    assert ds["agreement_spearman_all_layers"].dims == ("step", "attention_source", "effect")
    assert ds["attention_sink"].dims == ("step", "token", "layer", "effect")
    assert ds["k"].values.tolist() == [1, 5, 10]
    for name in ("attention", "attention_norm", "agreement_spearman", "attention_sink", "attention_norm_seq"):
        assert ds[name].attrs["description"]
    # step 0 attends to the prompt only: every head's row sums to 1 over seq
    np.testing.assert_allclose(ds["attention_seq"].sel(step=0).sum("seq"), 1.0, atol=1e-5)
    members = [int(m) for m in ds["token_members"].values]
    np.testing.assert_allclose(ds["attention"].values, ds["attention_seq"].isel(seq=members).values, atol=1e-7)
    mass = ds["attention"].mean("head")
    for step in (0, 1):
        for layer in (0, 3):
            for source, unit in (("attention", "attention"), ("attention_norm", "attention_norm")):
                m = ds[unit].mean("head").sel(step=step, layer=layer).values
                e = ds["kl"].sel(step=step).values
                got = float(ds["agreement_spearman"].sel(step=step, layer=layer, attention_source=source, effect="kl"))
                assert got == pytest.approx(scipy.stats.spearmanr(m, e).statistic, abs=1e-9)
    overall = mass.mean("layer").sel(step=0).values
    e = ds["logprob_drop"].sel(step=0).values
    got = ds["agreement_top_k_all_layers"].sel(step=0, attention_source="attention", effect="logprob_drop", k=5)
    assert float(got) == pytest.approx(_top_k_by_hand(overall, e, 5))


def test_unit_sums_over_members(vl):
    ds = vlmask.sweep(vl, PROMPT, [SHAPES], mask="vision", mask_unit="row", progress=False)
    row = ds.isel(token=1)
    members = [int(p) for p in str(row["token_members"].item()).split(",")]
    assert len(members) == 4
    np.testing.assert_allclose(
        row["attention_norm"].values, ds["attention_norm_seq"].isel(seq=members).sum("seq").values, rtol=1e-6
    )


def test_both_backends_give_the_same_attention(vl, swept):
    hooks = vlmask.sweep(vl, PROMPT, [SHAPES], mask="vision", num_tokens=2, progress=False, backend="hooks")
    for name in ("attention", "attention_norm", "agreement_spearman", "attention_sink"):
        xr.testing.assert_equal(hooks[name], swept[name])


def test_attention_off_switch_and_the_result_file(vl, swept, tmp_path):
    off = vlmask.sweep(vl, PROMPT, [SHAPES], mask="vision", num_tokens=2, progress=False, attention=False)
    assert not [name for name in off.data_vars if "attention" in name or "agreement" in name]
    xr.testing.assert_identical(off["kl"], swept["kl"])  # the knockouts do not depend on the readout
    path = vlmask.save_results(swept, tmp_path / "r.nc")
    xr.testing.assert_identical(vlmask.open_results(path), swept)


def test_attention_of_an_intervention_sweep_is_on_seq_only(vl):
    ds = vlmask.sweep(vl, PROMPT, [SHAPES], over=[BlockKeys((4,)), BlockKeys((5,))], progress=False)
    assert "attention_seq" in ds and "attention" not in ds and "agreement_spearman" not in ds


def test_spec_flag_is_checked():
    assert vlmask.SweepSpec("hi").attention is True
    with pytest.raises(vlmask.VlmaskError, match="attention must be true or false, got 'no'"):
        vlmask.SweepSpec("hi", attention="no")


# ---- the views --------------------------------------------------------------------------------

CLICK = """(function () {
  const overlay = () => document.querySelector("canvas.overlay");
  const look = () => [overlay().toDataURL(), overlay().dataset.map,
    [...document.querySelectorAll("#strip span.masked")].map((s) => s.style.background).join("|")];
  const before = look();
  document.querySelector('#map-toggle button[data-map="attention"]').click();
  const after = look();
  Object.assign(document.body.dataset, { mapBefore: before[1], mapAfter: after[1],
    overlayChanged: String(before[0] !== after[0]), stripChanged: String(before[2] !== after[2]) });
})();"""


def _with_click(report, out):
    """``report`` with a script that clicks the attention toggle once the page has rendered (its hash allowed)."""
    text = report.read_text(encoding="utf-8")
    digest = "'sha256-" + base64.b64encode(hashlib.sha256(CLICK.encode()).digest()).decode() + "'"
    text = text.replace("script-src ", f"script-src {digest} ", 1).replace(
        "</body>", f"<script>{CLICK}</script></body>"
    )
    out.write_text(text, encoding="utf-8")
    return out


@needs_chromium
def test_report_toggle_switches_the_image_and_strip_to_attention(swept, tmp_path):
    report = vlmask.write_report(swept, tmp_path / "run.html")
    page = open_page(_with_click(report, tmp_path / "clicked.html"), "layer=3")
    assert page.body["data-status"] == "ok" and page.console == [], page.console
    assert (page.body["data-map-before"], page.body["data-map-after"]) == ("knockout", "attention")
    assert page.body["data-overlay-changed"] == "true" and page.body["data-strip-changed"] == "true"
    chart = page.one("canvas", id="agreement-chart")
    want = float(swept["agreement_spearman"].sel(step=0, effect="kl").sum())
    assert chart["data-effect"] == "kl" and float(chart["data-sum"]) == pytest.approx(want, abs=1e-3)
    assert page.one("button", data_map="attention")["class"] == "on"
    screenshot(report, ARTIFACTS / "report-attention.png", fragment="map=attention&layer=3")


def test_heatmap_views_of_attention(swept):
    mean = heatmap(swept, "attention", layer=3)
    cell = swept["attention"].sel(step=0, layer=3).mean("head")
    first = int(swept["token"][1])  # r0 c1
    assert mean.isel(panel=0, row=0, col=1).item() == pytest.approx(float(cell.sel(token=first)))
    top = heatmap(swept, "attention:norm:max", layer=0)
    want = swept["attention_norm"].sel(step=0, layer=0, token=first).max("head")
    assert top.isel(panel=0, row=0, col=1).item() == pytest.approx(float(want))
    assert mean.attrs["layer"] == "3" and heatmap(swept, "attention").attrs["layer"] == "3"  # default: the last layer
    with pytest.raises(vlmask.VlmaskError, match="is not known"):
        heatmap(swept, "attention:sum")


def test_heatmap_of_attention_without_it_says_so(vl):
    off = vlmask.sweep(vl, PROMPT, [SHAPES], mask="vision", progress=False, attention=False)
    with pytest.raises(vlmask.VlmaskError, match="swept with attention off"):
        heatmap(off, "attention")


def test_cli_heatmap_draws_attention_beside_knockout(swept, tmp_path):
    path = vlmask.save_results(swept, tmp_path / "run.nc")
    assert main(["heatmap", str(path), "--metric", "attention:norm", "--layer", "2"]) == 0
    with Image.open(tmp_path / "run.png") as png:
        assert png.size[0] > png.size[1]  # two maps side by side
    text = agreement_text(swept, 2, 0, "attention_norm")
    rho = float(swept["agreement_spearman"].sel(step=0, layer=2, attention_source="attention_norm", effect="kl"))
    assert f"Spearman {rho:+.2f}" in text


def test_cli_no_attention(tmp_path):
    args = ["run", "--prompt", PROMPT, "--image", SHAPES, "--mask", "vision", "--output-dir", str(tmp_path)]
    assert main([*args, "--no-attention", "--no-progress"]) == 0
    assert "attention" not in vlmask.open_results(tmp_path / "run.nc")


def test_compare_carries_the_attention(vl, swept):
    text = vlmask.sweep(vl, PROMPT, mask="text", num_tokens=2, progress=False)
    image = vlmask.sweep(vl, PROMPT, [SHAPES], mask="all", num_tokens=2, progress=False)
    both = vlmask.compare(image, text)
    assert both["attention_a"].dims == ("step", "token", "layer", "head")
    xr.testing.assert_equal(both["attention_diff"], both["attention_a"] - both["attention_b"])
    first_a, first_b = int(both["token_a"][0]), int(both["token_b"][0])
    want = image["attention_norm"].sel(token=first_a).values - text["attention_norm"].sel(token=first_b).values
    np.testing.assert_allclose(both["attention_norm_diff"].isel(token=0).values, want, rtol=1e-6)
    np.testing.assert_array_equal(both["agreement_spearman_b"].values, text["agreement_spearman"].values)
    data = compare_data(both)
    assert {"attention", "attention:norm"} <= set(data["metrics"])
