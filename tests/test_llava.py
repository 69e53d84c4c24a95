"""LLaVA-1.5 and LLaVA-NeXT: each vision token on the panel and cell its feature comes from, each panel
drawn on its region of the original image, and the CLI, heatmap, report, compare and batch on saved checkpoints.

The checks are independent of vlmask's layout code: which feature fills which position is read from
the model's own forward (``get_image_features``) against the vision tower run on each tile by hand,
and which region of the original image a cell covers is read from the pixels the processor produced
from a picture whose colour encodes the position.
"""

from __future__ import annotations

import base64
import io
import re
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import vlmask
from tests.conftest import PROMPTS
from tests.families import save_tiny
from vlmask.builtin import words_of
from vlmask.cli import main
from vlmask.inputs.prompt import build_prompt
from vlmask.inputs.units import group_units
from vlmask.viz.plot import panel_pictures
from vlmask.viz.report import picture_panels

PROMPT = "what color is the circle ?"
PATCH = 14


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {name: save_tiny(name, root / name, words_of(PROMPTS)) for name in ("llava", "llava_next")}


@pytest.fixture(scope="module")
def models(dirs):
    return {name: vlmask.load_model(path) for name, path in dirs.items()}


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """Pictures whose red is the column and green the row (as fractions of the picture), blue 255 everywhere.

    The processor pads with black, so blue tells picture from padding.
    """
    root = tmp_path_factory.mktemp("gradients")
    out = {}
    for name, (width, height) in {"square": (128, 128), "wide": (200, 60), "tall": (60, 200)}.items():
        ys, xs = np.mgrid[0:height, 0:width]
        pixels = np.stack([(xs + 0.5) / width * 255, (ys + 0.5) / height * 255, np.full(xs.shape, 255.0)], -1)
        Image.fromarray(np.rint(pixels).astype(np.uint8)).save(root / f"{name}.png")
        out[name] = root / f"{name}.png"
    return out


def _tiles(pixel_values, image):
    """``(tiles, 3, side, side)`` of image ``image`` (LLaVA-1.5's pixel values have one tile per image)."""
    return pixel_values[image] if pixel_values.ndim == 5 else pixel_values[image : image + 1]


@pytest.mark.parametrize(
    ("name", "pictures"), [("llava", ["wide", "square"]), ("llava_next", ["square", "wide", "tall"])]
)
def test_each_vision_token_holds_the_feature_of_its_panel_cell(models, gradients, name, pictures):
    """The model's own scattered features, position by position, = the tower on the labeled tile's cell."""
    vl = models[name]
    built = build_prompt(vl.processor, PROMPT, [gradients[p] for p in pictures])
    hf, t = vl.hf, built.tokens
    features = torch.cat(vl.family.encode_vision(hf, built.inputs)["image"].pooler_output)
    positions = [p for p, i in enumerate(t.ids) if i == vl.processor.image_token_id]
    assert len(positions) == len(features)
    per_image = {}
    with torch.no_grad():
        for image, grid in enumerate(built.grids):
            tiles = _tiles(built.inputs["pixel_values"], image)[: grid.t]
            hidden = hf.model.vision_tower(tiles, output_hidden_states=True).hidden_states
            per_image[image] = hf.model.multi_modal_projector(hidden[hf.config.vision_feature_layer][:, 1:])
    newlines = 0
    for k, pos in enumerate(positions):
        if t.kind[pos] == "special":  # LLaVA-NeXT's image newline
            newlines += 1
            assert (t.image_index[pos], t.row[pos], t.col[pos]) == (-1, -1, -1)
            torch.testing.assert_close(features[k], hf.model.image_newline, atol=0, rtol=0)
            continue
        assert t.kind[pos] == "vision"
        grid = built.grids[t.image_index[pos]]
        want = per_image[t.image_index[pos]][t.t[pos], t.row[pos] * grid.cols + t.col[pos]]
        torch.testing.assert_close(features[k], want, atol=1e-5, rtol=1e-5)
    if name == "llava":
        assert newlines == 0 and [g.t for g in built.grids] == [1, 1]
    else:  # square: 2x2 tiles of 4x4 whole; wide and tall: two tiles, the padding rows / columns cut
        assert [(g.t, g.rows, g.cols) for g in built.grids] == [(5, 4, 4), (3, 4, 4), (3, 4, 4)]
        assert newlines == 8 + 2 + 8


def _decoded(tile, row, col):
    """(x, y) fractions a patch's pixels encode, and whether it is all picture (no padding)."""
    patch = tile[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] * 0.5 + 0.5
    return float(patch[0].mean()), float(patch[1].mean()), bool((patch[2] > 0.9).all())


@pytest.mark.parametrize(
    ("name", "pictures"), [("llava", ["wide", "tall"]), ("llava_next", ["square", "wide", "tall"])]
)
def test_each_panel_extent_is_the_region_of_the_original_image_its_pixels_come_from(models, gradients, name, pictures):
    vl = models[name]
    built = build_prompt(vl.processor, PROMPT, [gradients[p] for p in pictures])
    t, checked = built.tokens, 0
    for pos, kind in enumerate(t.kind):
        if kind != "vision":
            continue
        grid = built.grids[t.image_index[pos]]
        top, left, height, width = grid.extent(t.t[pos])
        tile = _tiles(built.inputs["pixel_values"], t.image_index[pos])[t.t[pos]]
        x, y, whole = _decoded(tile, t.row[pos], t.col[pos])
        if not whole:  # a cell the processor partly padded: its centre is not the picture's
            continue
        checked += 1
        assert x == pytest.approx(left + (t.col[pos] + 0.5) / grid.cols * width, abs=0.02), pos
        assert y == pytest.approx(top + (t.row[pos] + 0.5) / grid.rows * height, abs=0.02), pos
    assert checked >= 0.9 * t.kind.count("vision")
    if name == "llava":  # the centre square of each picture (shortest edge resized, centre-cropped)
        extents = np.array([g.extents[0] for g in built.grids])
        np.testing.assert_allclose(extents, [[0.0, 0.35, 1.0, 0.3], [0.35, 0.0, 0.3, 1.0]], atol=0.01)


def test_llava_next_units_heatmap_and_pictures(models, gradients):
    """Rows stay within a tile, ``image`` takes every panel; tiles are drawn on their region of the picture."""
    vl = models["llava_next"]
    built = build_prompt(vl.processor, PROMPT, [gradients["wide"]])
    t = built.tokens
    vision = [p for p, kind in enumerate(t.kind) if kind == "vision"]
    rows = group_units(vision, t, "row")
    assert all(len({(t.t[p], t.row[p]) for p in unit}) == 1 for unit in rows)
    assert len(rows) == 4 + 2 * 2  # the base image's four rows, two kept rows of each tile
    assert group_units(vision, t, "image") == [tuple(vision)]
    ds = vlmask.sweep(vl, PROMPT, [gradients["wide"]], mask="vision", num_tokens=1, progress=False)
    heat = ds.vlmask.heatmap("kl")
    assert heat.sizes["panel"] == 3 and heat["panel_t"].values.tolist() == [0, 1, 2]
    assert np.isfinite(heat.sel(panel=0)).all()
    for panel in (1, 2):  # feature rows 0 and 3 of the tiles are padding the model cut
        assert (
            np.isnan(heat.sel(panel=panel, row=[0, 3])).all() and np.isfinite(heat.sel(panel=panel, row=[1, 2])).all()
        )
    pictures = panel_pictures(ds, heat)
    assert [label for _, label in pictures] == [f"image 0: wide.png ({p})" for p in ("base image", "tile 1", "tile 2")]
    assert pictures[0][0].size == (200, 60)
    for panel in (1, 2):  # the picture drawn under a tile = what the model saw in that tile
        seen = built.inputs["pixel_values"][0, panel].permute(1, 2, 0).numpy() * 0.5 + 0.5
        drawn = np.asarray(pictures[panel][0].resize((56, 56), Image.BILINEAR), dtype=float) / 255
        assert np.abs(drawn - seen).mean() < 0.03, panel
    page = picture_panels(ds)  # the report shows the same regions
    assert [p["label"] for p in page] == [label for _, label in pictures]
    for entry, (picture, _) in zip(page, pictures, strict=True):
        shown = Image.open(io.BytesIO(base64.b64decode(entry["src"].partition(",")[2])))
        assert shown.size == picture.size


def test_cli_run_heatmap_report_compare_and_batch(dirs, gradients, images, tmp_path, capsys):
    out = tmp_path / "out"
    for name, path in dirs.items():
        args = ["run", "--model", str(path), "--prompt", PROMPT, "--image", str(images["square"]), "--mask", "vision"]
        assert main([*args, "--output", name, "--output-dir", str(out), "--no-progress"]) == 0
        assert main(["heatmap", str(out / f"{name}.nc")]) == 0
        assert Image.open(out / f"{name}.png").size[0] > 200
        assert main(["report", str(out / f"{name}.nc")]) == 0
    printed = capsys.readouterr().out
    assert "vision tokens: positions 2-17 (16 tokens, image 0)" in printed  # LLaVA-1.5's one 4x4 panel
    assert re.search(r"vision\s+0:4\s+3\s+3\s+'<image>'", printed)  # LLaVA-NeXT: tile 4, its last cell
    plain, next_ = (vlmask.open_results(out / f"{name}.nc") for name in dirs)
    assert plain.attrs["model_family"] == "LLaVA-1.5" and plain.sizes["token"] == 16
    assert next_.attrs["model_family"] == "LLaVA-NeXT" and next_.sizes["token"] == 16 + 4 * 16
    assert list(next_["seq_kind"].values).count("special") == 8  # a newline after each of the tiles' 8 rows
    assert set(next_["token_kind"].values) == {"vision"}
    assert re.search(r"image 0 tile [1-4] r\d c\d", printed)  # the ranking names a tile's units by their tile
    assert vlmask.summarize([next_], resamples=10).sizes["unit"] == 80  # tiles stay apart across prompts too
    assert main(["compare", str(out / "llava.nc"), str(out / "llava_next.nc"), "-o", str(tmp_path / "c.html")]) == 0
    config = tmp_path / "batch.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            output_dir: {tmp_path / "batch"}
            defaults:
              model: {dirs["llava_next"]}
              num_tokens: 1
            items:
              - name: tiles
                image: {gradients["wide"]}
                prompt: {PROMPT}
                mask: vision
                mask_unit: row
            """
        ).lstrip()
    )
    assert main(["batch", str(config), "--no-progress"]) == 0
    rows = vlmask.open_results(tmp_path / "batch" / "tiles.nc")
    assert rows.attrs["mask_unit"] == "row" and rows.sizes["token"] == 8
