"""``SweepSpec``: one declaration of the sweep options, read by ``sweep()``, the CLI and the YAML batch alike."""

from __future__ import annotations

import ast
import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

import vlmask
import vlmask.cli as cli
from interventions import AblateHeads, BlockKeys
from vlmask import SweepSpec, VlmaskError
from vlmask.batch.config import SWEEP_KEYS, read_config
from vlmask.spec import Windows

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f.name for f in dataclasses.fields(SweepSpec)]

# A non-default value per option: (Python value, CLI arguments, YAML text); None: not on the command line.
EXAMPLES = {
    "prompt": ("what is red ?", ["--prompt", "what is red ?"], "prompt: what is red ?"),
    "images": (["{square}"], ["--image", "{square}"], "image: {square}"),
    "videos": (["{clip}"], ["--video", "{clip}"], "videos: [{clip}]"),
    "video_fps": (4.0, ["--video-fps", "4"], "video_fps: 4"),
    "num_tokens": (3, ["--num-tokens", "3"], "num_tokens: 3"),
    "mask": ("0:3,5", ["--mask", "0:3,5"], "mask: 0:3,5"),
    "mask_unit": ("region:2", ["--mask-unit", "region:2"], "mask_unit: region:2"),
    "over": None,  # a list of interventions: Python and YAML only (the CLI prints a token ranking)
    "base": (
        AblateHeads(layer=1, heads=(2,)),
        ["--base", '{"type": "AblateHeads", "layer": 1, "heads": [2]}'],
        "base: {type: AblateHeads, layer: 1, heads: [2]}",
    ),
    "layers": ("3:", ["--layers", "3:"], 'layers: "3:"'),
    "chat_template": ("off", ["--chat-template", "off"], "chat_template: off"),
    "vision_attention": ("bidirectional", ["--vision-attention", "bidirectional"], "vision_attention: bidirectional"),
    "batch_size": (8, ["--batch-size", "8"], "batch_size: 8"),
    "max_memory": ("1MiB", ["--max-memory", "1MiB"], "max_memory: 1MiB"),
}


@pytest.fixture
def paths(images, tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(2):
        (clip / f"{i}.png").write_bytes(Path(images["square"]).read_bytes())
    return {"square": str(images["square"]), "clip": str(clip)}


def _fill(value, paths):
    if isinstance(value, str):
        return value.replace("{square}", paths["square"]).replace("{clip}", paths["clip"])
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    return value


def test_every_option_is_a_flag_and_an_item_key_with_its_default(tmp_path):
    cli_names = [f.name for f in dataclasses.fields(SweepSpec) if f.metadata["cli"]]
    assert sorted(cli.FLAGS) == sorted(cli_names) and set(NAMES) <= set(SWEEP_KEYS)
    assert cli._spec(cli._parser().parse_args(["run", "--prompt", "hi"])) == SweepSpec("hi")
    config = tmp_path / "batch.yaml"
    config.write_text("items:\n  - {name: a, prompt: hi}\n")
    assert read_config(config).items[0].spec == SweepSpec("hi")
    assert set(EXAMPLES) <= set(NAMES)  # rows below: a value of each option through both


def test_round_trip_through_a_json_ready_dict():
    spec = SweepSpec(
        "what color is the circle ?",
        images=["examples/shapes.png"],
        num_tokens=2,
        mask=[5, 3, 5],
        mask_unit="row",
        base=AblateHeads(layer=1, heads=(2,)),
        layers=Windows(k=3, centres=(1,)),
        batch_size=4,
        max_memory="1GiB",
    )
    data = spec.to_dict()
    assert list(data) == NAMES  # every key, always, in declaration order
    assert json.loads(json.dumps(data)) == data
    assert data["mask"] == [3, 5] and data["layers"] == {"k": 3, "centres": [1]} and data["max_memory"] == 2**30
    assert SweepSpec.from_dict(data) == spec
    over = SweepSpec("hi", over=[BlockKeys((1,)), {"type": "BlockKeys", "positions": [2]}], layers="0,2")
    assert over.over == (BlockKeys((1,)), BlockKeys((2,)))
    assert SweepSpec.from_dict(json.loads(json.dumps(over.to_dict()))) == over


def test_from_dict_refuses_unknown_keys_and_lists_the_known_ones():
    with pytest.raises(VlmaskError) as info:
        SweepSpec.from_dict({"prompt": "hi", "num_token": 2})
    assert str(info.value) == f"unknown sweep option 'num_token': expected some of {', '.join(NAMES)}"


def test_every_option_reaches_the_cli(paths):
    given = {name: _fill(row[0], paths) for name, row in EXAMPLES.items() if row is not None}
    args = [arg for row in EXAMPLES.values() if row is not None for arg in _fill(row[1], paths)]
    assert cli._spec(cli._parser().parse_args(["run", *args])) == SweepSpec(**given)


def test_every_option_reaches_the_yaml_batch(paths, tmp_path):
    rows = {name: row for name, row in EXAMPLES.items() if row is not None}
    lines = [_fill(row[2], paths) for row in rows.values()]
    config = tmp_path / "batch.yaml"
    config.write_text("items:\n  - name: a\n" + "".join(f"    {line}\n" for line in lines))
    expected = SweepSpec(**{name: _fill(row[0], paths) for name, row in rows.items()})
    assert read_config(config).items[0].spec == expected
    over = tmp_path / "over.yaml"
    over.write_text("items:\n  - name: b\n    prompt: hi\n    over: [{type: BlockKeys, positions: [1]}]\n")
    assert read_config(over).items[0].spec.over == (BlockKeys((1,)),)


BAD = [
    ("prompt", " ", "the prompt is empty: give it some text"),
    ("images", 3, "images must be a path or a list of paths, got 3"),
    ("video_fps", 0, "video fps must be a positive number of frames per second, got 0"),
    ("num_tokens", 0, "num_tokens must be at least 1, got 0"),
    ("num_tokens", 1.5, "num_tokens must be a whole number, got 1.5"),
    ("mask", "5:2", "mask '5:2' is not understood (range '5:2' is empty"),
    ("mask", [], "mask positions are an empty list: name at least one position"),
    ("mask_unit", "patch", "mask unit 'patch' is not known: expected token, row, column, region:K, image"),
    ("over", [], "over must be a non-empty list of interventions"),
    ("base", {"type": "Nope"}, "Nope"),
    ("base", type("Duck", (), {"to_dict": lambda self: {}})(), "is not an intervention"),
    ("layers", "a:b", "layers 'a:b' are not understood at 'a:b'"),
    ("chat_template", "maybe", "chat template 'maybe' is not known: expected one of auto, on, off"),
    ("vision_attention", "full", "vision attention 'full' is not known: expected one of native, bidirectional"),
    ("batch_size", 0, "batch_size must be at least 1, got 0"),
    ("max_memory", "lots", "memory size 'lots' is not understood"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_each_bad_value_gives_one_neutral_message(name, value, message):
    values = {"prompt": "hi", name: value}
    problems = SweepSpec.problems(values)
    assert [option for option, _ in problems] == [name]
    assert message in problems[0][1] and "--" not in problems[0][1]
    with pytest.raises(VlmaskError) as info:
        SweepSpec(**values)
    assert str(info.value) == problems[0][1]


def test_options_that_need_each_other_are_checked_together():
    assert SweepSpec.problems({"prompt": "hi", "mask": "vision"}) == [
        ("mask", "mask vision needs an image or a video, but none was given")
    ]
    [(option, message)] = SweepSpec.problems({"prompt": "hi", "mask": "text", "over": [BlockKeys((1,))]})
    assert option == "over" and "not both" in message


def test_sweep_takes_a_spec_or_a_prompt_with_options(tiny):
    spec = SweepSpec("what color is the circle ?", num_tokens=2, mask="prompt")
    by_spec = vlmask.sweep(tiny, spec, progress=False)
    by_name = vlmask.sweep(tiny, "what color is the circle ?", num_tokens=2, mask="prompt", progress=False)
    assert by_spec.identical(by_name)
    with pytest.raises(VlmaskError, match="not both"):
        vlmask.sweep(tiny, spec, num_tokens=3)
    with pytest.raises(VlmaskError, match=r"^num_tokens must be at least 1, got 0$"):
        vlmask.sweep(tiny, "hi", num_tokens=0)


def test_the_cli_names_the_flag_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded although an option is bad")

    monkeypatch.setattr("vlmask.model.load.load_model", no_load)  # the CLI imports it when a run starts
    frames = tmp_path / "frames"  # a video directory whose frames differ in size: read before any model loads
    frames.mkdir()
    for name, size in (("0.png", (32, 32)), ("1.png", (48, 32))):
        Image.new("RGB", size).save(frames / name)
    base = ["run", "--prompt", "hi", "--output-dir", str(tmp_path), "--no-progress"]
    cases = {
        ("--num-tokens", "0"): "vlmask: error: --num-tokens: num_tokens must be at least 1, got 0",
        ("--mask-unit", "patch"): "vlmask: error: --mask-unit: mask unit 'patch' is not known",
        ("--image", str(tmp_path / "no.png")): f"vlmask: error: --image: image file '{tmp_path / 'no.png'}' does not",
        ("--base", "{oops"): "vlmask: error: --base: '{oops' is not JSON",
        ("--max-memory", "lots"): "vlmask: error: --max-memory: memory size 'lots' is not understood",
        ("--video", str(frames)): "vlmask: error: --video: video frames must share one size: '0.png' is 32x32",
    }
    for args, expected in cases.items():
        assert cli.main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert cli.main(["batch", "x.yaml", "--shard", "2/2"]) == 2
    assert capsys.readouterr().err.startswith("vlmask: error: --shard: shard '2/2' is not understood")


def test_the_batch_names_the_item_and_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            items:
              - name: a
                prompt: hi
                num_tokens: 0
                mask_unit: patch
              - name: b
                image: missing.png
                prompt: hi
                mask: [4, x]
            """
        ).lstrip()
    )
    with pytest.raises(VlmaskError) as info:
        read_config(bad)
    message = str(info.value)
    assert f"{bad}:4: item 'a': num_tokens must be at least 1, got 0" in message
    assert f"{bad}:5: item 'a': mask unit 'patch' is not known" in message
    assert f"{bad}:7: item 'b': image file '{tmp_path / 'missing.png'}' does not exist" in message
    assert f"{bad}:9: item 'b': mask positions must be non-negative integers, got 'x'" in message  # and the file too
    assert message.startswith(f"{bad} has 4 problems")


def _literals(node: ast.AST) -> str:
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_library_messages_name_no_flags():
    """Only the command line speaks of flags: each ``VlmaskError(...)`` elsewhere is neutral."""
    found = []
    for path in [*(ROOT / "vlmask").rglob("*.py"), *(ROOT / "interventions").rglob("*.py")]:
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "VlmaskError":
                text = _literals(node)
                if " --" in f" {text}" or text.startswith("-"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not found, "\n".join(found)


def test_problems_found_with_the_model_name_their_flag_too(tiny_dir, tmp_path, capsys):
    """What needs the model or the result (positions, layers, metrics) raises neutral messages; the CLI adds flags."""
    run = ["run", "--model", str(tiny_dir), "--prompt", "what color is the circle ?", "--no-progress"]
    run += ["--output-dir", str(tmp_path)]
    cases = [
        ([*run, "--mask", "500"], "vlmask: error: --mask: key position 500 is out of range: the prompt has"),
        ([*run, "--layers", "7"], "vlmask: error: --layers: layer 7 is out of range: the model has 3 decoder layers"),
    ]
    for args, expected in cases:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert cli.main([*run, "--mask", "1", "--output", "r"]) == 0
    capsys.readouterr()
    result = str(tmp_path / "r.nc")
    for args, expected in [
        (["heatmap", result, "--metric", "residual:l2", "--layer", "9"], "vlmask: error: --layer: layer 9 is out of"),
        (["heatmap", result, "--layer", "1"], "vlmask: error: --layer: metric 'logprob_drop' is measured on the final"),
        (["heatmap", result, "--metric", "nope"], "vlmask: error: --metric: metric 'nope' is not known"),
        (["heatmap", result, "--step", "4"], "vlmask: error: --step: step 4 is out of range"),
    ]:
        assert cli.main(args) == 2
        assert capsys.readouterr().err.startswith(expected)
    with pytest.raises(VlmaskError, match=r"^key position 500 is out of range") as info:  # neutral in Python
        vlmask.sweep(vlmask.load_model(tiny_dir), "what color is the circle ?", mask=[500], progress=False)
    assert info.value.option == "mask"
