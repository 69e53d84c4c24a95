"""Models placed by a device map (accelerate): results equal the single-device run; placement errors are one line."""

from __future__ import annotations

import json

import pytest
import xarray as xr

import vlmask
from vlmask.cli import main
from vlmask.model.devices import device_map_of, max_memory_of

QUESTION = "what color is the circle ?"
IMAGE = "examples/shapes.png"


def _split(layers: int) -> dict[str, str]:
    """Half the decoder layers on the CPU, the others offloaded to disk (their weights loaded as each one runs)."""
    out = {
        "model.visual": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "model.language_model.norm": "disk",
        "lm_head": "cpu",  # tied to the input embeddings
    }
    return out | {f"model.language_model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)}


@pytest.fixture(scope="module")
def single():
    return vlmask.load_model()


def test_disk_offloaded_layers_give_the_single_device_results(single, tmp_path):
    spread = vlmask.load_model(device_map=_split(single.num_layers), offload_folder=tmp_path / "offload")
    assert {p.device.type for p in spread.hf.parameters()} == {"cpu", "meta"}  # some weights really are on disk
    assert spread.device.type == "cpu" and [d.type for d in spread.layer_devices] == ["cpu"] * single.num_layers
    kwargs = dict(mask="vision", num_tokens=2, progress=False)
    a, b = vlmask.sweep(single, QUESTION, [IMAGE], **kwargs), vlmask.sweep(spread, QUESTION, [IMAGE], **kwargs)
    assert float(a["kl"].max()) > 1  # the knockouts do something
    for name in ("kl", "logprob_drop", "residual", "heads", "attention", "attention_norm", "attention_seq"):
        xr.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0)
    xr.testing.assert_equal(a["masked_token_id"], b["masked_token_id"])
    assert json.loads(b.attrs["device"])["model.language_model.norm"] == "disk"  # the placement is recorded


def test_triage_on_disk_offloaded_layers_gives_the_single_device_estimates(single, tmp_path):
    """The autograd forward runs through accelerate's offload hooks (weights loaded as each layer runs) and leaves
    the weights as it found them; estimates, the confirmed units and their exact values are the single device's."""
    spread = vlmask.load_model(device_map=_split(single.num_layers), offload_folder=tmp_path / "offload")
    kwargs = dict(mask="vision", triage=3, progress=False)
    a, b = vlmask.sweep(single, QUESTION, [IMAGE], **kwargs), vlmask.sweep(spread, QUESTION, [IMAGE], **kwargs)
    xr.testing.assert_allclose(a["estimate_kl"], b["estimate_kl"], atol=1e-9, rtol=1e-6)
    xr.testing.assert_equal(a["confirmed"], b["confirmed"])
    xr.testing.assert_allclose(a["kl"], b["kl"], atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in spread.hf.parameters())  # as loaded


def test_cli_takes_a_device_map_file(tmp_path, single, capsys):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(_split(single.num_layers)))
    args = ["run", "--image", IMAGE, "--prompt", QUESTION, "--mask", "vision", "--num-tokens", "1", "--no-progress"]
    out = ["--output-dir", str(tmp_path / "out")]
    assert main([*args, *out, "--output", "map", "--device-map", str(mapping)]) == 0
    assert main([*args, *out, "--output", "one"]) == 0
    a, b = vlmask.open_results(tmp_path / "out" / "one.nc"), vlmask.open_results(tmp_path / "out" / "map.nc")
    xr.testing.assert_allclose(a["kl"], b["kl"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"device_map": "everywhere"}, ["'everywhere'", "auto, balanced", ".json"]),
        ({"device_map": "auto", "device": "cuda"}, ["either device", "not both"]),
        ({"max_memory": "0=1GiB"}, ["give device_map too"]),
        ({"device_map": "auto", "max_memory": "lots"}, ["'lots'", "DEVICE=AMOUNT"]),
    ],
)
def test_placement_mistakes_are_one_clear_line(kwargs, words):
    with pytest.raises(vlmask.VlmaskError) as err:
        vlmask.load_model(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_device_map_files_and_memory_caps_are_parsed(tmp_path):
    good, bad = tmp_path / "m.json", tmp_path / "bad.json"
    good.write_text('{"model": "cpu", "lm_head": 0}')
    bad.write_text("[1, 2]")
    assert device_map_of(str(good)) == {"model": "cpu", "lm_head": 0}
    with pytest.raises(vlmask.VlmaskError, match="one object of module name -> device"):
        device_map_of(str(bad))
    assert max_memory_of("0=20GiB, 1=20GiB, cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
