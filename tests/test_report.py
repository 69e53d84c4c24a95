"""The HTML report and the comparison: data, alignment, CLI, and the pages in real headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import vlmask
from tests.browser import needs_chromium, open_page, screenshot
from vlmask import VlmaskError
from vlmask.cli import main
from vlmask.results.schema import json_attr, vision_ranges
from vlmask.viz.page import encode
from vlmask.viz.report import picture_panels, report_data

QUESTION = "what is in this image ?"
PROMPT = f'{QUESTION} <img src=x onerror="document.body.dataset.pwned=1"> </script><script>document.title=1</script>'
TOKEN_INJECT = '<img src=x onerror="document.body.dataset.pwned=2">'
ATTR_INJECT = '<b id="bold">x</b></script><script>document.body.dataset.pwned=3</script>'
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def with_image(tiny, images):
    return vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=2, progress=False)


@pytest.fixture(scope="module")
def text_only(tiny):
    return vlmask.sweep(tiny, PROMPT, mask="text", num_tokens=2, progress=False)


@pytest.fixture(scope="module")
def injected(with_image):
    """The result with markup in a prompt token's text (strip, heatmap labels, table) and in an attribute."""
    ds = with_image.copy()
    pos = list(ds["seq_text"].values).index("what")
    seq_text, token_text = ds["seq_text"].values.copy(), ds["token_text"].values.copy()
    seq_text[pos] = token_text[list(ds["token"].values).index(pos)] = TOKEN_INJECT
    ds = ds.assign_coords(seq_text=("seq", seq_text), token_text=("token", token_text))
    ds.attrs["note"] = ATTR_INJECT
    return ds


@pytest.fixture(scope="module")
def pages(injected, with_image, text_only, tmp_path_factory):
    """``vlmask report`` and ``vlmask compare`` run on saved results."""
    root = tmp_path_factory.mktemp("pages")
    for name, ds in (("injected", injected), ("image", with_image), ("text", text_only)):
        vlmask.save_results(ds, root / f"{name}.nc")
    assert main(["report", str(root / "injected.nc")]) == 0
    assert main(["compare", str(root / "image.nc"), str(root / "text.nc"), "-o", str(root / "compare.html")]) == 0
    return {"report": root / "injected.html", "compare": root / "compare.html", "root": root}


def _data(page: str) -> dict:
    start = page.index('<script type="application/json" id="vlmask-data">')
    text = page[page.index(">", start) + 1 : page.index("</script>", start)]
    assert "<" not in text and ">" not in text and "&" not in text
    return json.loads(text)


def synthetic(tokens: int = 1000, layers: int = 36, heads: int = 16, grid: tuple[int, int] = (30, 30)) -> xr.Dataset:
    """A large result without a model: one 30x30 image among text tokens, every token masked, random values."""
    rng = np.random.default_rng(0)
    rows, cols = grid
    vision = np.zeros(tokens, bool)
    vision[2 : 2 + rows * cols] = True
    cell = np.full((2, tokens), -1)
    cell[:, vision] = np.divmod(np.arange(rows * cols), cols)
    kind = np.where(vision, "vision", "text").astype(object)
    text = np.array([f"w{i}" if not v else "<|image_pad|>" for i, v in enumerate(vision)], dtype=object)
    logits = {
        m: (("step", "token"), rng.standard_normal((1, tokens), dtype=np.float32)) for m in ("kl", "logprob_drop")
    }
    return xr.Dataset(
        {
            "residual": (("step", "token", "layer", "metric"), rng.random((1, tokens, layers, 3), dtype=np.float32)),
            "heads": (
                ("step", "token", "layer", "head", "metric"),
                rng.random((1, tokens, layers, heads, 3), dtype=np.float32),
            ),
            **logits,
            "prob_change_pct": (("step", "token"), rng.standard_normal((1, tokens), dtype=np.float32) * 50),
            "top_changed": (("step", "token"), rng.random((1, tokens)) > 0.5),
            "masked_token_id": (("token", "step"), np.zeros((tokens, 1), dtype=np.int64)),
            "masked_continuation": ("token", np.array(["x"] * tokens, dtype=object)),
        },
        coords={
            "step": [0],
            "step_token": ("step", np.array(["x"], dtype=object)),
            "step_token_id": ("step", [0]),
            "token": np.arange(tokens),
            "token_text": ("token", text),
            "token_kind": ("token", kind),
            "token_members": ("token", np.array([str(i) for i in range(tokens)], dtype=object)),
            "layer": np.arange(layers),
            "head": np.arange(heads),
            "metric": ["l2", "cosine", "rel_l2"],
            "seq": np.arange(tokens),
            "seq_text": ("seq", text),
            "seq_kind": ("seq", kind),
            "seq_image": ("seq", np.where(vision, 0, -1)),
            "seq_video": ("seq", np.full(tokens, -1)),
            "seq_t": ("seq", np.where(vision, 0, -1)),
            "seq_row": ("seq", cell[0]),
            "seq_col": ("seq", cell[1]),
        },
        attrs={
            "prompt": "a large synthetic result",
            "model": "synthetic",
            "clean_continuation": "x",
            "vision_grids": json.dumps([{"source": "image", "index": 0, "t": 1, "rows": rows, "cols": cols}]),
            "image_files": json.dumps(["missing.png"]),
            "image_sha256": json.dumps(["0" * 64]),
        },
    )


# ---- without a browser ----------------------------------------------------------------------------


def test_page_is_self_contained_and_data_cannot_close_its_script(pages, injected):
    page = pages["report"].read_text()
    assert page.lower().count("<script") == 3 and page.lower().count("</script") == 3  # boot, data, main
    assert "default-src 'none'" in page and "http://" not in page and "https://" not in page
    data = _data(page)
    assert data["prompt"] == PROMPT and ["note", ATTR_INJECT] in data["attrs"]
    assert TOKEN_INJECT in data["seq"]["text"] and len(data["seq"]["text"]) == injected.sizes["seq"]
    assert encode({"s": "\u2028</script>&"}) == '{"s":"\\u2028\\u003c/script\\u003e\\u0026"}'


def test_report_data_is_rounded_and_laid_out_row_major(injected):
    data = report_data(injected)
    text = encode(data["values"]["residual"])
    mantissas = [n.split("e")[0].replace(".", "").lstrip("-0") for n in text.strip("[]").split(",")]
    assert max(len(m) for m in mantissas) == 4  # 4 significant digits
    residual = json.loads(text)
    steps, tokens, layers = (injected.sizes[d] for d in ("step", "token", "layer"))
    assert len(residual) == steps * tokens * layers * 3
    want = injected["residual"].transpose("step", "token", "layer", "metric").values.ravel()
    np.testing.assert_allclose(residual, want, rtol=5e-4)
    heads = json.loads(encode(data["values"]["heads"]))
    assert len(heads) == steps * tokens * layers * injected.sizes["head"] * 3
    assert data["units"]["changed"][0] == [
        int(a) != int(b)
        for a, b in zip(injected["masked_token_id"].values[0], injected["step_token_id"].values, strict=True)
    ]


def test_report_says_when_the_continuation_is_an_answer(injected):
    assert report_data(injected)["continuation_label"] == "clean continuation"
    answered = injected.assign_attrs(measured_token="answer")
    assert report_data(answered)["continuation_label"] == "clean continuation (the answer's tokens, then greedy)"


def test_pictures_are_embedded_only_when_the_hash_matches(with_image, images):
    [panel] = picture_panels(with_image)
    assert (panel["rows"], panel["cols"], panel["note"]) == (4, 4, "")
    assert base64.b64decode(panel["src"].removeprefix("data:image/png;base64,")) == images["square"].read_bytes()
    changed = with_image.copy()
    changed.attrs["image_sha256"] = json.dumps(["0" * 64])
    [panel] = picture_panels(changed)
    assert panel["src"] is None and "has changed since the sweep" in panel["note"]
    changed.attrs["image_files"] = changed.attrs["image_files_absolute"] = json.dumps(["/no/such/picture.png"])
    assert "is not readable here" in picture_panels(changed)[0]["note"]


def test_video_frame_groups_show_their_first_frame(tiny, images, tmp_path):
    frames = [images["square"], images["other"], images["other"], images["square"]]
    for i, frame in enumerate(frames):
        (tmp_path / f"{i:02d}.png").write_bytes(frame.read_bytes())
    ds = vlmask.sweep(tiny, QUESTION, videos=[tmp_path], mask="vision", mask_unit="image", progress=False)
    shown = picture_panels(ds)
    assert [(p["source"], p["t"], p["note"]) for p in shown] == [("video", 0, ""), ("video", 1, "")]
    assert [base64.b64decode(p["src"].split(",")[1]) for p in shown] == [frames[0].read_bytes(), frames[2].read_bytes()]


def test_compare_aligns_text_tokens_across_the_image(with_image, text_only):
    both = with_image.vlmask.compare(text_only)
    images = with_image.sizes["seq"] - text_only.sizes["seq"]  # the image's tokens and its start/end markers
    assert images == 18
    assert set(both["token_kind"].values) == {"text"} and both.sizes["token"] == text_only.sizes["token"]
    assert (both["token_text"].values == both["token_text_b"].values).all()
    after = both["token_a"].values > vision_ranges(with_image)[0][0]  # "user" comes before
    assert after.sum() == both.sizes["token"] - 1
    np.testing.assert_array_equal((both["token_a"] - both["token_b"]).values, np.where(after, images, 0))
    np.testing.assert_array_equal(both["kl_a"].values, with_image["kl"].sel(token=both["token_a"].values).values)
    np.testing.assert_array_equal(both["kl_b"].values, text_only["kl"].sel(token=both["token_b"].values).values)
    np.testing.assert_allclose(both["kl_diff"], both["kl_a"] - both["kl_b"])
    final = with_image["residual"].isel(layer=-1).sel(token=both["token_a"].values, metric="cosine").values
    np.testing.assert_array_equal(both["residual_a"].sel(metric="cosine").values, final)
    unmatched = {str(with_image["seq_kind"].values[pos]) for pos, _ in json_attr(both, "unmatched_a")}
    assert json_attr(both, "unmatched_b") == [] and unmatched == {"vision", "special"}
    assert both.attrs["prompt_a"] == both.attrs["prompt_b"] == PROMPT


def test_compare_with_nothing_in_common_names_both_sides(with_image, text_only):
    vision = with_image.isel(token=(with_image["token_kind"] == "vision").values)
    with pytest.raises(VlmaskError, match=r"no masked token of A \(16: '<\|image_pad\|>'"):
        vision.vlmask.compare(text_only)


def test_report_cli_default_path_overwrite_and_bad_output(pages, capsys):
    nc = pages["root"] / "injected.nc"
    assert pages["report"].exists()
    assert main(["report", str(nc)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(nc), "-o", str(pages["root"] / "r.txt")]) == 2
    assert "must end in .html" in capsys.readouterr().err
    assert main(["report", str(nc), "--overwrite"]) == 0
    assert main(["report", str(pages["root"] / "missing.nc")]) == 2


def test_run_with_report_writes_it_beside_the_result(tiny_dir, tmp_path):
    args = ["run", "--model", str(tiny_dir), "--prompt", "test", "--output", "r", "--output-dir", str(tmp_path)]
    assert main([*args, "--no-progress", "--report"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"r.nc", "r.html"}
    assert _data((tmp_path / "r.html").read_text())["prompt"] == "test"
    assert main([*args, "--no-progress", "--report"]) == 2  # both exist: refused before the sweep


def test_results_the_page_cannot_lay_out_are_refused(tmp_path):
    small = synthetic(tokens=6, layers=2, heads=2, grid=(2, 2))
    windows = small.assign(residual=small["residual"].expand_dims(window=2, axis=2))
    with pytest.raises(
        VlmaskError, match=r"residual has dims \(step, token, window, layer, metric\).*isel\(window=i\)"
    ):
        windows.vlmask.report(tmp_path / "w.html")
    with pytest.raises(VlmaskError, match="pick one window"):
        vlmask.compare(small, windows)
    assert not (tmp_path / "w.html").exists()


def test_large_result_is_compact_and_quick_to_write(tmp_path):
    ds = synthetic()
    start = time.perf_counter()
    path = ds.vlmask.report(tmp_path / "large.html")
    assert time.perf_counter() - start < 30
    size = path.stat().st_size
    numbers = ds["residual"].size + ds["heads"].size + 4 * ds["kl"].size
    assert size < 8 * numbers  # about 6-7 bytes a number: "0.1234,"


# ---- in Chromium ---------------------------------------------------------------------------------


@needs_chromium
def test_report_loads_without_errors_and_draws_every_cell(pages, injected):
    page = open_page(pages["report"])
    assert page.body["data-status"] == "ok", page.dom[-3000:]
    assert page.find("li") == [] and page.console == [], page.console
    tokens, layers = injected.sizes["token"], injected.sizes["layer"]
    heat = page.one("canvas", id="heatmap")
    assert [heat[f"data-{k}"] for k in ("rows", "cols", "cells")] == [str(tokens), str(layers), str(tokens * layers)]
    assert float(heat["data-sum"]) == pytest.approx(float(injected["residual"].sel(step=0, metric="l2").sum()), 1e-3)
    strip = [a for t, a in page.tags if t == "span" and "data-pos" in a]
    assert [int(a["data-pos"]) for a in strip] == injected["seq"].values.tolist()
    assert page.one("canvas", class_="overlay")["data-cells"] == "16"  # every vision cell masked
    assert page.one("img")["src"].startswith("data:image/png;base64,")
    first = int(injected["token"][0])
    heads = page.one("canvas", id="heads")
    want = float(injected["heads"].sel(step=0, token=first, metric="l2").sum())
    assert heads["data-token"] == str(first) and heads["data-cells"] == str(layers * injected.sizes["head"])
    assert float(heads["data-sum"]) == pytest.approx(want, 1e-3)
    screenshot(pages["report"], ARTIFACTS / "report.png", fragment=f"token={int(injected['token'][22])}")


@needs_chromium
@pytest.mark.parametrize(
    ("fragment", "cols", "values"),
    [
        ("metric=residual:cosine", "layer", lambda ds: ds["residual"].sel(step=0, metric="cosine")),
        ("metric=residual:rel_l2&step=1", "layer", lambda ds: ds["residual"].sel(step=1, metric="rel_l2")),
        ("metric=kl", 1, lambda ds: ds["kl"].sel(step=0)),
        ("metric=prob_change_pct&step=1", 1, lambda ds: ds["prob_change_pct"].sel(step=1)),
    ],
)
def test_selecting_a_metric_or_step_changes_the_cells(pages, injected, fragment, cols, values):
    page = open_page(pages["report"], fragment)
    assert page.body["data-status"] == "ok" and page.console == []
    heat = page.one("canvas", id="heatmap")
    cols = injected.sizes["layer"] if cols == "layer" else cols
    assert (heat["data-metric"], heat["data-cols"]) == (fragment.split("&")[0].split("=")[1], str(cols))
    assert heat["data-cells"] == str(injected.sizes["token"] * cols)
    assert float(heat["data-sum"]) == pytest.approx(float(values(injected).sum()), rel=1e-3, abs=1e-3)
    default = float(injected["residual"].sel(step=0, metric="l2").sum())
    assert float(heat["data-sum"]) != pytest.approx(default, 1e-3)


@needs_chromium
def test_markup_in_the_prompt_tokens_and_attributes_stays_text(pages, injected):
    page = open_page(pages["report"])
    assert page.body["data-status"] == "ok" and page.console == []
    assert "data-pwned" not in page.body and page.one("title")["_text"] == "vlmask report"
    assert not [a for t, a in page.tags if t == "img" and a.get("src") == "x"]
    assert page.find("b") == [] and page.dom.lower().count("<script") == 3  # no element was made from data
    assert page.one("q", id="prompt")["_text"] == PROMPT  # shown literally
    assert [a["_text"] for a in page.find("div", class_="value") if "bold" in a["_text"]] == [ATTR_INJECT]
    pos = list(injected["seq_text"].values).index(TOKEN_INJECT)
    assert page.one("span", data_pos=str(pos))["_text"] == TOKEN_INJECT
    assert f'<q id="prompt">{html.escape(PROMPT, quote=False)}</q>' in page.dom


@needs_chromium
def test_compare_page_loads_with_every_aligned_token(pages, with_image, text_only):
    page = open_page(pages["compare"], "metric=logprob_drop")
    assert page.body["data-status"] == "ok" and page.find("li") == [] and page.console == []
    both = vlmask.compare(with_image, text_only)
    grid = page.one("canvas", id="compare-map")
    assert [grid[f"data-{k}"] for k in ("rows", "cols", "metric")] == [str(both.sizes["token"]), "3", "logprob_drop"]
    want = sum(float(both[f"logprob_drop_{s}"].sel(step=0).sum()) for s in ("a", "b", "diff"))
    assert float(grid["data-sum"]) == pytest.approx(want, rel=1e-3, abs=1e-3)
    assert page.dom.count("<tr>") >= both.sizes["token"]
    screenshot(pages["compare"], ARTIFACTS / "compare.png", size=(1300, 1600))


@needs_chromium
def test_large_report_stays_responsive(tmp_path):
    ds = synthetic()
    path = vlmask.write_report(ds, tmp_path / "large.html")
    page = open_page(path, "metric=residual:cosine&token=500")
    assert page.body["data-status"] == "ok" and page.console == []
    heat = page.one("canvas", id="heatmap")
    assert heat["data-cells"] == str(1000 * 36)
    assert page.one("canvas", id="heads")["data-cells"] == str(36 * 16)
    assert int(page.body["data-script-ms"]) < 5000 and int(page.body["data-render-ms"]) < 2000
    assert "missing.png" in page.dom and "is not readable here" in page.dom  # a note, not an error
