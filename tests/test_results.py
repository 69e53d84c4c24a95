"""The labeled Dataset, its netCDF round trip, and the long-form tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import vlmask
from interventions import BlockKeys
from vlmask import VlmaskError
from vlmask.inputs.grid import Grid
from vlmask.results import schema
from vlmask.results.io import long_table, write_tables
from vlmask.results.schema import ATTR, recorded_media, vision_grids, vision_ranges
from vlmask.viz.compare import compare, write_compare
from vlmask.viz.heatmap import heatmap
from vlmask.viz.plot import plot_heatmap
from vlmask.viz.report import write_report


@pytest.fixture(scope="module")
def result(tiny, images):
    return vlmask.sweep(tiny, "what is in this image ?", [images["square"]], mask="all", num_tokens=2, progress=False)


def test_dataset_is_labeled(result, tiny):
    assert result["residual"].dims == ("step", "token", "layer", "metric")
    assert result["heads"].dims == ("step", "token", "layer", "head", "metric")
    assert result.sizes["head"] == tiny.num_heads and result.sizes["layer"] == tiny.num_layers
    assert list(result["metric"].values) == ["l2", "cosine", "rel_l2"]
    vision = result.where(result["token_kind"] == "vision", drop=True)
    assert vision.sizes["token"] == 16 and set(vision["token_image"].values) == {0}
    assert result.sel(token=3)["token_text"].item() == "<|image_pad|>"
    assert result["step_position"].values.tolist() == [result.sizes["seq"] - 1, result.sizes["seq"]]
    for key, value in result.attrs.items():
        assert isinstance(value, (str, int, float, np.integer, np.floating)), key
    assert result.vlmask.interventions()[1].isel(token=0).item() == BlockKeys((0,))
    [image] = recorded_media(result).images
    assert image.sha256 == hashlib.sha256(Path(image.path).read_bytes()).hexdigest()
    assert result.attrs[ATTR.vision_attention] == "native"


def test_netcdf_round_trip_is_identical(result, tmp_path):
    path = vlmask.save_results(result, tmp_path / "r.nc")
    xr.testing.assert_identical(vlmask.open_results(path), result)
    with pytest.raises(VlmaskError, match="already exists"):
        vlmask.save_results(result, path)
    vlmask.save_results(result, path, overwrite=True)


def test_failed_write_leaves_nothing(result, tmp_path, monkeypatch):
    def boom(self, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(KeyboardInterrupt):
        vlmask.save_results(result, tmp_path / "r.nc")
    assert list(tmp_path.iterdir()) == []


def test_long_tables_have_one_row_per_value(result, tmp_path):
    expected = sum(
        result[name].size for name in ("residual", "heads", "kl", "logprob_drop", "prob_change_pct", "top_changed")
    )
    table = long_table(result)
    assert len(table) == expected
    csv_path, json_path = write_tables(result, tmp_path / "r", ["nc", "csv", "json"])
    assert len(pd.read_csv(csv_path)) == expected
    assert len(json.loads(json_path.read_text())) == expected
    heads = table[table["variable"] == "heads"]
    assert heads["head"].notna().all() and table[table["variable"] == "logits"]["layer"].isna().all()
    row = table[
        (table["variable"] == "residual")
        & (table["token"] == 5)
        & (table["layer"] == 1)
        & (table["metric"] == "l2")
        & (table["step"] == 1)
    ]
    assert float(row["value"].iloc[0]) == pytest.approx(
        float(result["residual"].sel(step=1, token=5, layer=1, metric="l2"))
    )


def test_open_results_errors(tmp_path):
    with pytest.raises(VlmaskError, match="does not exist"):
        vlmask.open_results(tmp_path / "none.nc")
    bad = tmp_path / "bad.nc"
    bad.write_text("nope")
    with pytest.raises(VlmaskError, match="is not a vlmask netCDF result"):
        vlmask.open_results(bad)


def test_written_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from vlmask.results.io import atomic_write

    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ---- the schema: names declared once, typed readers, the accessor -------------------------------


def test_the_dataset_uses_the_declared_names(result):
    knockout = (schema.STEP, schema.TOKEN)
    assert result[schema.RESIDUAL].dims == (*knockout, schema.LAYER, schema.METRIC)
    assert result[schema.HEADS].dims == (*knockout, schema.LAYER, schema.HEAD, schema.METRIC)
    assert set(schema.METRIC_VARIABLES) <= set(result.data_vars)
    assert list(result[schema.METRIC].values) == [schema.L2, schema.COSINE, schema.REL_L2]
    assert set(result.attrs) == set(schema.ATTRIBUTES)
    assert all(getattr(ATTR, name) == name for name in schema.ATTRIBUTES)
    assert result.attrs[ATTR.schema_version] == schema.SCHEMA_VERSION
    for name, text in schema.DESCRIPTIONS.items():
        assert result[name].attrs["description"] == text
    seq = {schema.SEQ_ID, schema.SEQ_TEXT, schema.SEQ_KIND, schema.SEQ_IMAGE, schema.SEQ_VIDEO, schema.SEQ_T}
    assert seq | {schema.SEQ_ROW, schema.SEQ_COL, schema.TOKEN_MEMBERS, schema.STEP_TOKEN} <= set(result.coords)


def test_readers_give_typed_values(result, images):
    ranges = vision_ranges(result)
    assert ranges == [(3, 19)] and all(isinstance(v, int) for pair in ranges for v in pair)
    assert (result[schema.SEQ_KIND].values[3:19] == schema.VISION).all()
    assert vision_grids(result) == [Grid("image", 0, 1, 4, 4)]
    media = recorded_media(result)
    assert [f.path for f in media.images] == [str(images["square"])] and media.videos == ()
    assert media.frames_per_group == result.attrs[ATTR.video_frames_per_group]
    assert schema.knockout_dims(result) == (schema.TOKEN,)


@pytest.mark.parametrize(
    ("attr", "value", "message"),
    [
        ("vision_ranges", None, "it has no 'vision_ranges' attribute"),
        ("vision_ranges", "[[3, 19]", "attribute 'vision_ranges' is not valid JSON"),
        ("vision_ranges", "[[3, 19, 5]]", "expected a list of \\[start, end\\] pairs"),
        ("vision_grids", '[{"source": "image"}]', "expected a list of \\{source, index, t, rows, cols\\}"),
        ("image_files", None, "it has no 'image_files' attribute"),
        ("image_sha256", '["x", "y"]', "expected a list of 1 SHA-256 digests"),
        ("interventions", '{"type": 1}', "expected a list of intervention dicts"),
        ("interventions", "[]", "records 0 interventions, but its knockout dims are"),
    ],
)
def test_malformed_attributes_say_this_is_not_a_vlmask_result(result, attr, value, message):
    broken = result.copy()
    if value is None:
        del broken.attrs[attr]
    else:
        broken.attrs[attr] = value
    readers = {
        "vision_ranges": vision_ranges,
        "vision_grids": vision_grids,
        "image_files": recorded_media,
        "image_sha256": recorded_media,
        "interventions": schema.interventions_of,
    }
    with pytest.raises(VlmaskError, match=message):
        readers[attr](broken)


def test_malformed_attributes_reach_the_cli_as_one_line(result, tmp_path, capsys):
    from vlmask.cli import main

    broken = result.copy()
    broken.attrs[ATTR.vision_grids] = "not json"
    path = vlmask.save_results(broken, tmp_path / "broken.nc")
    assert main(["heatmap", str(path), "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "is not a vlmask result: attribute 'vision_grids' is not valid JSON" in err and err.count("\n") == 1


def test_each_accessor_method_is_its_free_function(result, tiny, images, tmp_path):
    image = vlmask.sweep(tiny, "what is in this image ?", [images["square"]], mask="vision", progress=False)
    text = vlmask.sweep(tiny, "what is in this image ?", mask="text", progress=False)
    xr.testing.assert_identical(image.vlmask.heatmap("kl"), heatmap(image, "kl"))
    xr.testing.assert_identical(image.vlmask.heatmap("residual:l2", 1), heatmap(image, "residual:l2", 1))
    pd.testing.assert_frame_equal(result.vlmask.table(), long_table(result))
    base, knockouts = result.vlmask.interventions()
    want_base, want = schema.interventions_of(result)
    assert base == want_base is None and knockouts.values.tolist() == want.values.tolist()
    xr.testing.assert_identical(result.vlmask.compare(text), compare(result, text))
    pages = {
        "plot": (image.vlmask.plot(tmp_path / "a.png"), plot_heatmap(image, tmp_path / "b.png")),
        "report": (result.vlmask.report(tmp_path / "a.html"), write_report(result, tmp_path / "b.html")),
        "compare": (
            result.vlmask.write_compare(text, tmp_path / "ca.html"),
            write_compare(result, text, tmp_path / "cb.html"),
        ),
    }
    for name, (mine, theirs) in pages.items():
        assert mine.read_bytes() == theirs.read_bytes(), name
    assert vlmask.interventions_of is schema.interventions_of and vlmask.heatmap is heatmap  # thin aliases


def test_public_surface_is_small_and_the_accessor_is_registered():
    import subprocess
    import sys

    assert len(vlmask.__all__) <= 14 and all(hasattr(vlmask, name) for name in vlmask.__all__)
    code = "import vlmask, xarray as xr; print(hasattr(xr.Dataset(), 'vlmask'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_temporaries_of_killed_writers_are_cleaned_and_live_ones_kept(tmp_path):
    """A writer killed mid-write (kill -9, a lost Dask worker) leaves a partial hidden temporary: the next write
    of that result removes it if its process (on this host) is gone; a live writer's is left alone."""
    import os
    import subprocess

    from vlmask.results import io

    gone = subprocess.Popen(["true"])
    gone.wait()
    names = {
        "dead": f".run.nc.{io._HOST}-{gone.pid}.abcdefgh.tmp",
        "alive": f".run.nc.{io._HOST}-{os.getpid()}.abcdefg1.tmp",
        "elsewhere": f".run.nc.otherhost-{gone.pid}.abcdefg2.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("partial netCDF")
    io.atomic_write(tmp_path / "run.nc", lambda t: t.write_text("x"))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"run.nc", names["alive"], names["elsewhere"]}
