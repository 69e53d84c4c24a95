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
from vlmask import VlmaskError
from vlmask.results.io import long_table, write_tables


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
    assert json.loads(result.attrs["interventions"])[0] == {"type": "BlockKeys", "positions": [0], "layers": None}
    assert (
        json.loads(result.attrs["image_sha256"])[0]
        == hashlib.sha256(Path(json.loads(result.attrs["image_files"])[0]).read_bytes()).hexdigest()
    )
    assert result.attrs["vision_attention"] == "native"


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
