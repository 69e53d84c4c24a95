"""Vision-token coordinates (image/video, frame group, row, column) and mask units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

import vlmask
from tests.reference import reference_run
from vlmask import VlmaskError
from vlmask.inputs.grid import vision_coordinates
from vlmask.inputs.prompt import build_prompt
from vlmask.inputs.units import group_units, parse_unit
from vlmask.inputs.video import video_hash

PROMPT = "describe the picture"
CELL = 32  # pixels per merged token: 16-pixel patches, 2x2 merge


def _coloured(path: Path, rows: int, cols: int, blue: int) -> Path:
    """An image whose merged cell (r, c) is the flat colour (20 + 40 r, 20 + 40 c, blue)."""
    pixels = np.zeros((rows * CELL, cols * CELL, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            pixels[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = (20 + 40 * r, 20 + 40 * c, blue)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    root = tmp_path_factory.mktemp("coloured")
    video = root / "clip"
    video.mkdir()
    for frame in range(4):  # two frame groups of two frames; the group is coded in blue
        _coloured(video / f"{frame:03d}.png", rows=3, cols=4, blue=60 + 80 * (frame // 2))
    return {
        "wide": _coloured(root / "wide.png", rows=3, cols=6, blue=0),  # 192x96
        "square": _coloured(root / "square.png", rows=4, cols=4, blue=250),  # 128x128
        "video": video,
    }


def _decode(patches: torch.Tensor) -> tuple[int, int, int]:
    """Row, column and blue of a merged token's four patches (channel-major, normalised with mean = std = 0.5)."""
    rgb = (patches.reshape(len(patches), 3, -1).mean((0, 2)) * 0.5 + 0.5) * 255
    return round((float(rgb[0]) - 20) / 40), round((float(rgb[1]) - 20) / 40), round(float(rgb[2]))


@pytest.mark.parametrize(
    ("images", "videos"),
    [([(1, 6, 12)], []), ([(1, 4, 4), (1, 2, 8)], []), ([], [(3, 4, 6)]), ([(1, 6, 4)], [(2, 2, 2), (1, 4, 2)])],
)
def test_synthetic_grids_map_every_vision_position(images, videos):
    img, vid, txt = 7, 8, 1
    ids, expect = [txt], [(-1, -1, -1, -1, -1)]
    for i, (_, h, w) in enumerate(images):
        rr, cc = np.indices((h // 2, w // 2))
        ids += [img] * rr.size + [txt]
        expect += [(i, -1, 0, int(r), int(c)) for r, c in zip(rr.ravel(), cc.ravel(), strict=True)]
        expect += [(-1, -1, -1, -1, -1)]
    for v, (t, h, w) in enumerate(videos):
        for group in range(t):
            rr, cc = np.indices((h // 2, w // 2))
            ids += [txt] + [vid] * rr.size
            expect += [(-1, -1, -1, -1, -1)]
            expect += [(-1, v, group, int(r), int(c)) for r, c in zip(rr.ravel(), cc.ravel(), strict=True)]
    got = vision_coordinates(ids, img, vid, images or None, videos or None, merge=2)
    assert list(zip(got.image, got.video, got.t, got.row, got.col, strict=True)) == expect


def test_token_count_mismatch_is_an_error():
    with pytest.raises(VlmaskError, match="more image tokens"):
        vision_coordinates([7] * 5, 7, 8, [(1, 4, 4)])
    with pytest.raises(VlmaskError, match="fewer video tokens"):
        vision_coordinates([8] * 3, 7, 8, None, [(1, 4, 4)])


def test_coordinates_match_the_pixels_each_token_encodes(tiny, coloured):
    """Independent check: each vision token's patches carry the colour painted on its cell."""
    built = build_prompt(tiny.processor, PROMPT, [coloured["wide"], coloured["square"]], videos=[coloured["video"]])
    t = built.tokens
    assert built.inputs["image_grid_thw"].tolist() == [[1, 6, 12], [1, 8, 8]]
    assert built.inputs["video_grid_thw"].tolist() == [[2, 6, 8]]
    seen = {"image": 0, "video": 0}
    blues = {0: 0, 1: 250}
    for pos, kind in enumerate(t.kind):
        if kind != "vision":
            assert (t.image_index[pos], t.video_index[pos], t.t[pos], t.row[pos], t.col[pos]) == (-1,) * 5
            continue
        source = "image" if t.image_index[pos] >= 0 else "video"
        pixels = built.inputs["pixel_values" if source == "image" else "pixel_values_videos"]
        k = seen[source]
        seen[source] += 1
        row, col, blue = _decode(pixels[4 * k : 4 * k + 4])
        assert (t.row[pos], t.col[pos]) == (row, col), f"position {pos}"
        if source == "image":
            assert blue == blues[t.image_index[pos]]
        else:
            assert t.video_index[pos] == 0 and blue == 60 + 80 * t.t[pos]
    assert seen == {"image": 18 + 16, "video": 2 * 12}
    rows = {i: max(r for r, im in zip(t.row, t.image_index, strict=True) if im == i) + 1 for i in (0, 1)}
    cols = {i: max(c for c, im in zip(t.col, t.image_index, strict=True) if im == i) + 1 for i in (0, 1)}
    assert (rows, cols) == ({0: 3, 1: 4}, {0: 6, 1: 4})  # 192x96 -> 3 rows x 6 columns


def _vision(built, image=0):
    return [p for p, i in enumerate(built.tokens.image_index) if i == image]


def test_units_have_the_right_members(tiny, coloured):
    built = build_prompt(tiny.processor, PROMPT, [coloured["wide"], coloured["square"]])
    wide, square = _vision(built, 0), _vision(built, 1)
    grid = np.array(wide).reshape(3, 6)
    everything = list(range(len(built.tokens)))
    units = {u: group_units(everything, built.tokens, u) for u in ("token", "row", "column", "region:2", "image")}
    assert len(units["token"]) == len(everything)
    vision = {u: [g for g in groups if g[0] in wide] for u, groups in units.items()}
    assert vision["row"] == [tuple(r) for r in grid]
    assert vision["column"] == [tuple(c) for c in grid.T]
    expected_regions = [tuple(sorted(grid[r : r + 2, c : c + 2].ravel())) for r in (0, 2) for c in (0, 2, 4)]
    assert vision["region:2"] == sorted(expected_regions)
    assert vision["image"] == [tuple(wide)]
    assert tuple(square) in units["image"]
    for name, groups in units.items():  # text and special tokens stay single; every position once
        assert sorted(p for g in groups for p in g) == everything, name
        assert all(len(g) == 1 for g in groups if built.tokens.kind[g[0]] != "vision")
    # only the masked positions are members
    assert group_units(wide[2:8], built.tokens, "row") == [tuple(wide[2:6]), tuple(wide[6:8])]


@pytest.mark.parametrize("spec", ["region", "region:0", "region:x", "patch", "row:2"])
def test_bad_mask_unit(spec):
    with pytest.raises(VlmaskError, match=r"^mask unit"):
        parse_unit(spec)


def _kl(clean, masked):
    pc, pm = torch.softmax(clean.double(), -1), torch.softmax(masked.double(), -1)
    return float((pc * (pc.log() - pm.log())).sum())


@pytest.fixture(scope="module")
def regions(tiny, coloured):
    return vlmask.sweep(tiny, PROMPT, [coloured["wide"]], mask="vision", mask_unit="region:2", progress=False)


def test_region_knockout_equals_blocking_its_positions_explicitly(tiny, coloured, regions):
    built = build_prompt(tiny.processor, PROMPT, [coloured["wide"]])
    assert regions.attrs["mask_unit"] == "region:2" and regions.sizes["token"] == 6
    unit = regions.isel(token=4)  # rows 2, columns 2-3: a 1x2 block at the bottom edge
    members = [int(p) for p in unit["token_members"].item().split(",")]
    assert unit["token_size"].item() == len(members) == 2
    assert (unit["token_row"].item(), unit["token_col"].item()) == (2, 2)
    assert (unit["token_rows"].item(), unit["token_cols"].item()) == (1, 2)
    assert unit["token"].item() == members[0]
    explicit = vlmask.sweep(tiny, PROMPT, [coloured["wide"]], mask=members, mask_unit="image", progress=False)
    assert explicit.sizes["token"] == 1
    assert float(explicit["kl"].sel(step=0).item()) == pytest.approx(float(unit["kl"].sel(step=0)), abs=1e-6)
    clean = reference_run(tiny, built.inputs, set())[2][-1]
    masked = reference_run(tiny, built.inputs, set(members))[2][-1]
    assert float(unit["kl"].sel(step=0)) == pytest.approx(_kl(clean, masked), abs=1e-5)
    single = vlmask.sweep(tiny, PROMPT, [coloured["wide"]], mask=members, progress=False)
    assert single.sizes["token"] == 2  # the default unit blocks each token on its own


def test_unit_coordinates_and_round_trip(regions, tmp_path):
    assert (regions["token_rows"].values * regions["token_cols"].values >= regions["token_size"].values).all()
    assert set(regions["token_text"].values) == {"<|image_pad|> x4", "<|image_pad|> x2"}
    for name in ("seq_video", "seq_t", "seq_row", "seq_col", "token_video", "token_t", "token_row", "token_col"):
        assert name in regions.coords, name
    assert (regions["token_video"].values == -1).all() and (regions["token_t"].values == 0).all()
    path = vlmask.save_results(regions, tmp_path / "r.nc")
    xr.testing.assert_identical(vlmask.open_results(path), regions)


def test_video_sweep_labels_frame_groups_and_matches_reference(tiny, coloured):
    images, videos = [coloured["square"]], [coloured["video"]]
    ds = vlmask.sweep(tiny, PROMPT, images, videos=videos, mask="vision", mask_unit="image", progress=False)
    assert ds.sizes["token"] == 3  # the image, and two frame groups
    assert ds["token_image"].values.tolist() == [0, -1, -1]
    assert ds["token_video"].values.tolist() == [-1, 0, 0] and ds["token_t"].values.tolist() == [0, 0, 1]
    assert ds["token_size"].values.tolist() == [16, 12, 12]
    assert json.loads(ds.attrs["video_files"]) == [str(coloured["video"])]
    assert json.loads(ds.attrs["video_sha256"]) == [video_hash(coloured["video"])]
    assert json.loads(ds.attrs["video_frames"]) == [["000.png", "001.png", "002.png", "003.png"]]
    assert (ds["seq_kind"].values[ds["seq_video"].values >= 0] == "vision").all()
    built = build_prompt(tiny.processor, PROMPT, images, videos=videos)
    clean = reference_run(tiny, built.inputs, set())[2][-1]
    for token in ds["token"].values:
        members = {int(p) for p in ds["token_members"].sel(token=token).item().split(",")}
        masked = reference_run(tiny, built.inputs, members)[2][-1]
        assert float(ds["kl"].sel(token=token, step=0)) == pytest.approx(_kl(clean, masked), abs=1e-5)


def test_video_errors(tmp_path, tiny):
    with pytest.raises(VlmaskError, match="does not exist"):
        build_prompt(tiny.processor, PROMPT, videos=[tmp_path / "none"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmaskError, match="has no frame images"):
        build_prompt(tiny.processor, PROMPT, videos=[tmp_path / "empty"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _coloured(mixed / "a.png", 2, 2, 0)
    _coloured(mixed / "b.png", 2, 3, 0)
    with pytest.raises(VlmaskError, match="must share one size"):
        build_prompt(tiny.processor, PROMPT, videos=[mixed])
