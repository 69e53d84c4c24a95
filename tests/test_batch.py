"""``vlmask batch``: items from YAML, resumable, sharded, failures isolated, one lazy combined view."""

from __future__ import annotations

import textwrap

import dask.array
import numpy as np
import pytest

import vlmask
import vlmask.batch.run as batch_module
from vlmask import VlmaskError
from vlmask.batch.config import read_config
from vlmask.batch.run import shard_items
from vlmask.cli import main


def _write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def config(tmp_path, tiny_dir, images):
    return _write(
        tmp_path / "batch.yaml",
        f"""
        output_dir: results
        defaults:
          model: {tiny_dir}
          num_tokens: 1
        items:
          - name: square
            image: {images["square"]}
            prompt: what is in this image ?
            mask: vision
            mask_unit: row
          - name: words
            prompt: describe the picture
          - name: two
            images: [{images["square"]}, {images["other"]}]
            prompt: what color is the circle ?
            num_tokens: 2
            mask: 0:3,25
        """,
    )


def test_items_run_and_a_rerun_skips_them(config, tmp_path, capsys, monkeypatch):
    assert main(["batch", str(config), "--no-progress"]) == 0
    out_dir = tmp_path / "results"
    assert sorted(p.name for p in out_dir.iterdir()) == ["square.nc", "two.nc", "words.nc"]
    square = vlmask.open_results(out_dir / "square.nc")
    assert square.attrs["batch_name"] == "square" and len(square.attrs["batch_config_hash"]) == 64
    assert square.attrs["mask_unit"] == "row" and set(square["token_kind"].values) == {"vision"}
    assert vlmask.open_results(out_dir / "two.nc").sizes["step"] == 2
    assert "3 items, 3 done" in capsys.readouterr().out

    def no_sweep(*args, **kwargs):
        raise AssertionError("an up-to-date item was run again")

    monkeypatch.setattr(batch_module, "sweep", no_sweep)
    assert main(["batch", str(config)]) == 0
    assert "0 done, 3 up to date" in capsys.readouterr().out
    monkeypatch.undo()
    config.write_text(config.read_text().replace("describe the picture", "describe the circle"))
    assert main(["batch", str(config), "--no-progress"]) == 0
    assert "1 done, 2 up to date" in capsys.readouterr().out
    assert vlmask.open_results(out_dir / "words.nc").attrs["prompt"] == "describe the circle"


def test_each_distinct_model_is_loaded_once(config, tmp_path, monkeypatch):
    config.write_text(
        config.read_text().replace(
            "    prompt: describe the picture", "    prompt: describe the picture\n    attn_implementation: eager"
        )
    )
    loads = []

    def load(model, **options):
        loads.append((model, options))
        return vlmask.load_model(model, **options)

    # the command line's loader is looked up when run_batch runs, so patching the module takes effect
    monkeypatch.setattr(batch_module, "load_model", load)
    assert main(["batch", str(config), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(options.get("attn_implementation", "sdpa") for _, options in loads) == ["eager", "sdpa"]
    assert vlmask.open_results(tmp_path / "out" / "words.nc").attrs["attn_implementation"] == "eager"
    loads.clear()
    outcomes = vlmask.run_batch(config, tmp_path / "again", load=load)  # or passed in
    assert [o.status for o in outcomes] == ["done", "done", "done"] and len(loads) == 2


def test_a_failing_item_does_not_stop_the_others(config, tmp_path, capsys):
    text = config.read_text().replace(
        "    prompt: describe the picture", "    prompt: describe the picture\n    layers: 0,7"
    )
    config.write_text(text)
    assert main(["batch", str(config), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "failed  words (line 11): layers: layer 7 is out of range: the model has 3 decoder layers" in captured.err
    assert "3 items, 2 done" in captured.out and "1 failed" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["square.nc", "two.nc"]


def test_shards_partition_the_items_and_the_combined_view_spans_them(config, tmp_path):
    items = read_config(config).items
    for n in (1, 2, 3, 5):
        shards = [shard_items(items, (i, n)) for i in range(n)]
        names = [item.name for shard in shards for item in shard]
        assert sorted(names) == sorted(item.name for item in items) and len(names) == len(set(names))
    assert [i.name for i in shard_items(items, (1, 2))] == ["words"]
    out = tmp_path / "sharded"
    for shard in ("1/2", "0/2"):
        assert main(["batch", str(config), "--shard", shard, "--output-dir", str(out), "--no-progress"]) == 0
    with vlmask.open_batch(out) as combined:  # closed before its files are opened again
        assert isinstance(combined["residual"].data, dask.array.Array), "the combined view should be lazy"
        assert combined["prompt"].values.tolist() == ["square", "two", "words"]
        assert combined["residual"].dims == ("prompt", "step", "token", "layer", "metric")
        assert combined["prompt_text"].sel(prompt="words").item() == "describe the picture"
        for name in ("square", "two", "words"):
            alone = vlmask.open_results(out / f"{name}.nc")
            got = combined["kl"].sel(prompt=name).dropna("token", how="all").dropna("step", how="all").load()
            np.testing.assert_array_equal(got.values, alone["kl"].values)
            assert got["token"].values.tolist() == alone["token"].values.tolist()
            texts = combined["token_text"].sel(prompt=name, token=alone["token"]).values.tolist()
            assert texts == alone["token_text"].values.tolist()
    with vlmask.open_batch([out / "words.nc", out / "two.nc"]) as files:
        assert files["prompt"].values.tolist() == ["words", "two"]
    with pytest.raises(VlmaskError, match="no batch results"):
        vlmask.open_batch(config)  # its items' files, in its output_dir: none written there
    assert main(["batch", str(config), "--shard", "1/2", "--no-progress"]) == 0
    with vlmask.open_batch(config) as from_config:
        assert from_config["prompt"].values.tolist() == ["words"]


def test_config_problems_are_reported_together_with_lines_before_any_model_loads(tmp_path, images, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded although the configuration is invalid")

    monkeypatch.setattr(batch_module, "load_model", no_load)
    bad = _write(
        tmp_path / "bad.yaml",
        f"""
        defaults:
          colour: red
        items:
          - name: a
            image: {tmp_path / "missing.png"}
            prompt: what is in this image ?
          - name: b
            prompt: describe the picture
            mask: vision
            maks_unit: row
          - name: a
            image: {images["square"]}
            prompt: test
            mask: 5:2
            dtype: float8
          - prompt: no name
        """,
    )
    with pytest.raises(VlmaskError) as info:
        vlmask.run_batch(bad, tmp_path / "out", load=no_load)
    message = str(info.value)
    expected = [
        "bad.yaml:2: defaults: 'colour' cannot be a default",
        "bad.yaml:5: item 'a': image file",
        "bad.yaml:9: item 'b': mask vision needs an image or a video",
        "bad.yaml:10: item 'b': unknown key 'maks_unit'",
        "bad.yaml:11: name 'a' is already used by the item on line 4",
        "bad.yaml:14: item 'a': mask '5:2' is not understood",
        "bad.yaml:15: item 'a': dtype 'float8' is not known: expected one of bfloat16, float16, float32",
        "bad.yaml:16: item 3: missing 'name'",
    ]
    for line in expected:
        assert line in message
    assert message.startswith(f"{bad} has {len(expected)} problems")
    assert main(["batch", str(bad)]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(VlmaskError, match=r"^shard '2/2' is not understood"):
        batch_module.parse_shard("2/2")
