"""Heatmaps of vision-token knockouts: the array, the painted overlay, the PNG, and bad inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

import vlmask
from vlmask import VlmaskError
from vlmask.cli import main
from vlmask.viz.heatmap import cell_colors, paint

PROMPT = "what is in this image ?"
BASE = (30, 120, 220)  # a flat blue picture: neither the colour map nor text anti-aliasing produce its blends
HOT = (1, 2)  # the target cell (row, column) on the 4x4 grid of a 128x128 image
ALPHA = 0.6


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    path = tmp_path_factory.mktemp("flat") / "flat.png"
    Image.new("RGB", (128, 128), BASE).save(path)
    return path


@pytest.fixture(scope="module")
def hot(tiny, flat, images):
    """A real sweep over the flat image and a second image, with logprob_drop 1 on one cell and 0 elsewhere."""
    ds = vlmask.sweep(tiny, PROMPT, [flat, images["wide"]], mask="vision", num_tokens=2, progress=False)
    target = (ds["token_image"] == 0) & (ds["token_row"] == HOT[0]) & (ds["token_col"] == HOT[1])
    ds["logprob_drop"] = ds["logprob_drop"].where(target, 0.0).where(~target, 1.0)
    return ds


def test_heatmap_has_the_grid_shape_and_the_hot_cell(hot):
    heat = hot.vlmask.heatmap()
    assert heat.dims == ("panel", "row", "col") and heat.shape == (2, 4, 6)  # 4x4 and 3x6, padded to 4x6
    assert heat["panel_source"].values.tolist() == ["image", "image"]
    assert heat["panel_rows"].values.tolist() == [4, 3] and heat["panel_cols"].values.tolist() == [4, 6]
    assert np.isnan(heat.sel(panel=0, col=[4, 5])).all() and np.isnan(heat.sel(panel=1, row=3)).all()
    assert np.isfinite(heat.sel(panel=0, col=slice(0, 3))).all() and np.isfinite(heat.sel(panel=1, row=[0, 1, 2])).all()
    flat = heat.sel(panel=0).fillna(-1).values
    assert np.unravel_index(flat.argmax(), flat.shape) == HOT and flat.max() == 1.0
    assert heat.attrs["layer"] == "final output" and heat.attrs["step"] == 0


def test_layer_metrics(hot):
    residual = hot.vlmask.heatmap("residual:l2", layer=1, step=1)
    want = hot["residual"].sel(step=1, layer=1, metric="l2")
    pos = int(hot["token"][0])
    r, c = int(hot["token_row"].sel(token=pos)), int(hot["token_col"].sel(token=pos))
    assert float(residual.sel(panel=0, row=r, col=c)) == pytest.approx(float(want.sel(token=pos)))
    assert hot.vlmask.heatmap("residual:cosine").attrs["layer"] == str(hot.sizes["layer"] - 1)  # default: last
    mean = hot.vlmask.heatmap("heads:l2", layer=0)
    top = hot.vlmask.heatmap("heads:l2:max", layer="0")
    assert (top.fillna(0) >= mean.fillna(0) - 1e-7).all() and (top.fillna(0) > mean.fillna(0)).any()


def test_units_paint_every_member_cell(tiny, flat):
    ds = vlmask.sweep(tiny, PROMPT, [flat], mask="vision", mask_unit="row", progress=False)
    heat = ds.vlmask.heatmap("kl").sel(panel=0)
    for row in range(4):
        value = float(ds["kl"].sel(step=0).where(ds["token_row"] == row, drop=True).item())
        assert np.allclose(heat.sel(row=row).values, value)


def test_paint_maps_cells_proportionally():
    heat = np.zeros((2, 3))
    heat[1, 2] = 1.0
    colors = cell_colors(heat, colormaps["inferno"](heat), ALPHA)
    painted = paint(np.full((50, 90, 3), BASE, np.uint8), colors).astype(int)
    strength = np.abs(painted - np.array(BASE)).sum(-1)
    hot = strength == strength.max()
    ys, xs = np.nonzero(hot)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 49, 60, 89)
    assert paint(np.zeros((4, 4, 3), np.uint8), cell_colors(np.full((1, 1), np.nan), np.ones((1, 1, 4)), 1)).max() == 0


def _blend(value: float) -> np.ndarray:
    rgb = np.array(colormaps["inferno"](value)[:3]) * 255
    return np.rint((1 - ALPHA) * np.array(BASE) + ALPHA * rgb)


def test_png_puts_the_hottest_overlay_over_the_target_cell(hot, tmp_path):
    path = hot.vlmask.plot(tmp_path / "hot.png", alpha=ALPHA)
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert png.shape[0] > 200 and png.shape[1] > 400
    near = {name: np.abs(png - _blend(v)).max(-1) <= 3 for name, v in (("hot", 1.0), ("cold", 0.0))}
    ys, xs = np.nonzero(near["cold"] | near["hot"])  # both panels
    hy, hx = np.nonzero(near["hot"])
    assert len(hy) > 100
    panel = xs < xs.min() + (hx.max() - xs.min()) + 5  # the first panel: left of the hot cell's right edge
    top, bottom, left = ys[panel].min(), ys[panel].max(), xs[panel].min()
    size = bottom - top + 1
    assert (hy.mean() - top) / size == pytest.approx((HOT[0] + 0.5) / 4, abs=0.03)
    assert (hx.mean() - left) / size == pytest.approx((HOT[1] + 0.5) / 4, abs=0.03)
    assert len(hy) == pytest.approx(size * size / 16, rel=0.15)


def test_cli_heatmap_writes_a_png(hot, tmp_path, capsys):
    vlmask.save_results(hot, tmp_path / "hot.nc")
    assert main(["heatmap", str(tmp_path / "hot.nc"), "--metric", "kl", "--step", "1"]) == 0
    assert (tmp_path / "hot.png").stat().st_size > 5000
    assert "wrote" in capsys.readouterr().out
    assert main(["heatmap", str(tmp_path / "hot.nc")]) == 2  # exists
    assert main(["heatmap", str(tmp_path / "hot.nc"), "--overwrite", "--metric", "residual:rel_l2"]) == 0


def _cases(tiny, images, tmp_path):
    moved = tmp_path / "moved.png"
    shutil.copy(images["square"], moved)
    changed = tmp_path / "changed.png"
    shutil.copy(images["square"], changed)
    text_only = vlmask.sweep(tiny, "test", mask="text", progress=False)
    image_text = vlmask.sweep(tiny, "test", [images["square"]], mask="text", progress=False)
    with_moved = vlmask.sweep(tiny, "test", [moved], mask="vision", progress=False)
    with_changed = vlmask.sweep(tiny, "test", [changed], mask="vision", progress=False)
    moved.unlink()
    Image.new("RGB", (128, 128), "red").save(changed)
    old = with_changed.copy()
    old.attrs = {k: v for k, v in old.attrs.items() if k != "vision_grids"}
    return {
        "text-only": (text_only, [], "no masked vision tokens"),
        "text-masked": (image_text, [], "no masked vision tokens"),
        "missing-image": (with_moved, [], "does not exist"),
        "changed-image": (with_changed, [], "has changed since the sweep"),
        "old-result": (old, [], "has no vision-token grid"),
        "bad-metric": (with_changed, ["--metric", "residual"], "metric 'residual' is not known"),
        "layer-on-logits": (with_changed, ["--layer", "1"], "measured on the final output"),
        "bad-layer": (with_changed, ["--metric", "residual:l2", "--layer", "9"], "layer 9 is out of range"),
        "bad-step": (with_changed, ["--step", "3"], "step 3 is out of range"),
    }


def test_bad_inputs_are_one_line_and_exit_2(tiny, images, tmp_path, capsys):
    for case, (ds, extra, message) in _cases(tiny, images, tmp_path).items():
        nc = vlmask.save_results(ds, tmp_path / f"{case}.nc")
        out = tmp_path / f"{case}.png"
        assert main(["heatmap", str(nc), "-o", str(out), *extra]) == 2, case
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (case, err)
        assert not out.exists(), case
    with pytest.raises(VlmaskError, match=r"must end in \.png"):
        ds.vlmask.plot(tmp_path / "x.jpg")


def test_cli_run_with_video_and_units_then_heatmap(tiny_dir, images, tmp_path, capsys):
    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(4):
        Image.new("RGB", (128, 96), (60 * i, 100, 200)).save(clip / f"{i:02d}.png")
    args = ["run", "--model", str(tiny_dir), "--prompt", "test", "--image", str(images["wide"]), "--video", str(clip)]
    args += ["--mask", "vision", "--mask-unit", "row", "--output", "v", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(18 tokens, image 0)" in out and "(12 tokens, video 0 frame group 1)" in out
    ds = vlmask.open_results(tmp_path / "v.nc")
    assert ds.attrs["mask_unit"] == "row" and ds.sizes["token"] == 3 + 3 + 3  # rows of the image and two groups
    assert main(["heatmap", str(tmp_path / "v.nc"), "--metric", "heads:cosine:max", "--layer", "final"]) == 0
    heat = ds.vlmask.heatmap()
    assert heat.sizes["panel"] == 3 and heat["panel_t"].values.tolist() == [0, 0, 1]
    assert Image.open(tmp_path / "v.png").size[0] > 3 * 200
