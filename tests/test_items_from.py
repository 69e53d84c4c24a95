"""Batch items from data files (``items_from: data.jsonl`` / ``.csv`` with a ``template``), and the answer option."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
import xarray as xr

import vlmask
import vlmask.batch.rows as rows_module
import vlmask.batch.run as batch_module
from tests.reference import extended, reference_run
from vlmask import VlmaskError
from vlmask.batch.config import read_config
from vlmask.batch.run import run_batch
from vlmask.cli import main
from vlmask.inputs.prompt import build_prompt

ITEMS = [
    {
        "name": "circle",
        "image": "img/square.png",
        "prompt": "what color is the circle ?",
        "mask": "vision",
        "mask_unit": "row",
    },
    {"name": "words", "prompt": "describe the picture", "num_tokens": 2, "layers": "0:2", "answer": "red circle"},
    {"name": "two", "image": ["img/square.png", "img/other.png"], "prompt": "test", "mask": "0:3"},
]
CSV = """\
name,prompt,image,image2,mask,mask_unit,num_tokens,layers,answer
circle,what color is the circle ?,img/square.png,,vision,row,,,
words,describe the picture,,,,,2,0:2,red circle
two,test,img/square.png,img/other.png,0:3,,,,
"""
HEAD = "output_dir: {out}\ndefaults:\n  num_tokens: 1\n"


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def folder(tmp_path, images):
    (tmp_path / "img").mkdir()
    for name in ("square", "other"):
        shutil.copy(images[name], tmp_path / "img" / f"{name}.png")
    return tmp_path


def _yaml_items() -> str:
    return "items:\n" + "".join(f"  - {json.dumps(item)}\n" for item in ITEMS)


def _results(out_dir):
    """Every result of a folder, by name, without what names the configuration that made it."""
    found = {}
    for path in sorted(out_dir.glob("*.nc")):
        with xr.open_dataset(path, engine="netcdf4") as ds:
            found[path.stem] = ds.load()
        del found[path.stem].attrs["batch_config"]
    return found


def test_jsonl_and_csv_give_the_results_of_the_same_items_written_in_yaml(folder):
    _write(folder / "hand.yaml", HEAD.format(out="by_hand") + _yaml_items())
    (folder / "q.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / "q.csv").write_text(CSV)
    _write(folder / "jsonl.yaml", HEAD.format(out="by_jsonl") + "items_from: q.jsonl\n")
    _write(folder / "csv.yaml", HEAD.format(out="by_csv") + "items_from: q.csv\n")
    configs = {name: read_config(folder / f"{name}.yaml") for name in ("hand", "jsonl", "csv")}
    hashes = {name: [(i.name, i.config_hash) for i in cfg.items] for name, cfg in configs.items()}
    assert hashes["hand"] == hashes["jsonl"] == hashes["csv"]
    assert [i.file for i in configs["csv"].items] == [str(folder / "q.csv")] * 3
    assert [i.line for i in configs["csv"].items] == [2, 3, 4] and [i.line for i in configs["jsonl"].items] == [1, 2, 3]
    for name in configs:
        assert [o.status for o in run_batch(folder / f"{name}.yaml")] == ["done"] * 3
    by_hand = _results(folder / "by_hand")
    assert sorted(by_hand) == ["circle", "two", "words"]
    for name in ("jsonl", "csv"):
        made = _results(folder / f"by_{name}")
        assert sorted(made) == sorted(by_hand)
        for item in by_hand:
            xr.testing.assert_identical(made[item], by_hand[item])
    assert by_hand["words"].attrs["measured_token"] == "answer" and by_hand["words"].attrs["answer"] == "red circle"
    assert by_hand["circle"].attrs["measured_token"] == "greedy" and by_hand["circle"].attrs["answer"] == ""


def test_rows_start_from_the_template_and_win_over_it(folder):
    (folder / "data").mkdir()
    shutil.copy(folder / "img" / "square.png", folder / "data" / "pic.png")
    (folder / "data" / "q.jsonl").write_text(
        '{"prompt": "test"}\n{"prompt": "hi", "num_tokens": 3, "image": "pic.png"}\n{"prompt": "hi", "layers": null}\n'
    )
    cfg = _write(
        folder / "b.yaml",
        """\
        defaults: {num_tokens: 2, layers: "0:1", mask_unit: row}
        template: {num_tokens: 1, attention: false}
        items_from: data/q.jsonl
        items:
          - {name: hand, prompt: test}
        """,
    )
    items = read_config(cfg).items
    assert [i.name for i in items] == ["hand", "q-1", "q-2", "q-3"]
    assert [i.index for i in items] == [0, 1, 2, 3]
    assert [i.spec.num_tokens for i in items] == [2, 1, 3, 1]  # defaults < template < row
    assert [i.spec.attention for i in items] == [True, False, False, False]  # the template is for rows only
    assert [i.spec.layers for i in items] == ["0:1", "0:1", "0:1", None]
    assert items[2].spec.images == (str(folder / "data" / "pic.png"),)  # relative to the data file
    assert items[0].file == "" and items[1].file == str(folder / "data" / "q.jsonl")


def test_every_bad_row_is_told_with_its_file_and_line_before_any_model_loads(folder):
    (folder / "bad.jsonl").write_bytes(
        b'{"prompt": "hi", "colour": 1}\n'
        b'{"image": "img/square.png"}\n'
        b'{"prompt": "hi", "num_tokens": "two"}\n'
        b'{"prompt": "hi", "image": "img/nope.png"}\n'
        b'{"name": "b", "prompt": "x"}\n'
        b'{"name": "b", "prompt": "y"}\n'
        b'{"prompt": \n'
        b"[1, 2]\n"
        b'{"prompt": "caf\xe9"}\n'
        b'{"prompt": "hi", "num_tokens": NaN}\n'
        b'{"prompt": "a", "prompt": "b"}\n'
        b'{"prompt": "fine"}\n'
    )
    (folder / "bad.csv").write_text(
        'name,prompt,image,colour\nc1,hi,img/square.png,\nc2,hi,,red\nc3,only\nc4,"hi",img/square.png,,extra\n'
        'c5,hi,img/square.png,\n"c6,unterminated\n'
    )
    cfg = _write(folder / "b.yaml", "items_from: [bad.jsonl, bad.csv]\nitems:\n  - {name: c1, prompt: hi}\n")
    with pytest.raises(VlmaskError) as caught:
        run_batch(cfg, folder / "out", load=lambda *a, **k: pytest.fail("a model loaded"))
    message = str(caught.value)
    jsonl, csv = folder / "bad.jsonl", folder / "bad.csv"
    expected = [
        f"{jsonl}:1: item 'bad-1': unknown key 'colour'",
        f"{jsonl}:2: item 'bad-2': the prompt is missing",
        f"{jsonl}:3: item 'bad-3': num_tokens must be a whole number, got 'two'",
        f"{jsonl}:4: item 'bad-4': image file '{folder / 'img' / 'nope.png'}' does not exist",
        f"{jsonl}:6: name 'b' is already used by the item on line 5",
        f"{jsonl}:7: not valid JSON: Expecting value",
        f"{jsonl}:8: a row must be a JSON object",
        f"{jsonl}:9: not UTF-8 text: byte 0xe9 at column 16",
        f"{jsonl}:10: not valid JSON: NaN is not a JSON number",
        f"{jsonl}:11: not valid JSON: key 'prompt' appears twice",
        f"{csv}:1: the column 'colour' is not an item key",  # told once, at the header
        f"{csv}:2: name 'c1' is already used by the item on {cfg}:3",
        f"{csv}:4: the row has 2 fields, the header 4",
        f"{csv}:5: the row has 5 fields, the header 4",
        f"{csv}:7: not valid CSV: unexpected end of data",
    ]
    for text in expected:
        assert text in message, text
    assert f"{jsonl}:12" not in message and f"{csv}:6" not in message  # the good rows
    assert message.startswith(f"{cfg} has ")


def test_a_header_column_no_item_takes_is_told_once(folder):
    (folder / "q.csv").write_text("prompt,colour\nhi,\nhi,red\ntest,blue\n")
    cfg = _write(folder / "b.yaml", "items_from: q.csv\n")
    with pytest.raises(VlmaskError, match="1 problem") as caught:
        read_config(cfg)
    assert f"{folder / 'q.csv'}:1: the column 'colour' is not an item key" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "content", "told"),
    [
        ("empty.jsonl", b"", ":1: the file holds no rows"),
        ("blank.jsonl", b"\n  \n", ":1: the file holds no rows"),
        ("empty.csv", b"", ":1: the file is empty: a csv's first line names its columns"),
        ("header.csv", b"prompt,image\n", ":1: the file holds no rows"),
        ("latin1.csv", b"prompt\ncaf\xe9\n", ":2: not UTF-8 text: byte 0xe9 at column 4"),
        ("utf16.jsonl", '{"prompt": "hi"}\n'.encode("utf-16"), ":1: not UTF-8 text: byte 0xff at column 1"),
        ("tag.csv", b"prompt,num_tokens\nhi,!!python/object:os.system x\n", ":2: column 'num_tokens': tag '!!python"),
        ("alias.csv", b'prompt,layers\nhi,"[&a 1, *a]"\n', ":2: column 'layers': aliases (*name) are not taken"),
        ("paths.csv", b"prompt,images\nhi,a.png\n", ":1: column 'images': in a csv give each path its own column"),
        ("twice.csv", b"prompt,prompt\nhi,ho\n", ":1: column 'prompt' is named twice in the header"),
        ("deep.jsonl", b'{"prompt": "hi", "layers": ' + b"[" * 40 + b"]" * 40 + b"}\n", ":1: the row nests lists"),
        ("deep.csv", b'prompt,layers\nhi,"' + b"[" * 40 + b"]" * 40 + b'"\n', ":2: column 'layers': the value nests"),
        ("deeper.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", ":1: not valid JSON"),
        ("deeper.csv", b"prompt,layers\nhi," + b"[" * 100_000 + b"\n", ":2: column 'layers': "),
    ],
)
def test_hostile_data_files_are_refused_with_file_and_line(folder, name, content, told):
    (folder / name).write_bytes(content)
    cfg = _write(folder / "b.yaml", f"items_from: {name}\n")
    with pytest.raises(VlmaskError) as caught:
        read_config(cfg)
    assert f"{folder / name}{told}" in str(caught.value)


def test_a_byte_order_mark_is_skipped(folder):
    (folder / "q.csv").write_bytes(b"\xef\xbb\xbfprompt,num_tokens\nhi,2\n")
    (folder / "q.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "hi", "num_tokens": 2}\n')
    for name in ("q.csv", "q.jsonl"):
        (item,) = read_config(_write(folder / "b.yaml", f"items_from: {name}\n")).items
        assert (item.name, item.spec.prompt, item.spec.num_tokens) == ("q-2" if name == "q.csv" else "q-1", "hi", 2)


def test_a_huge_file_is_streamed_and_cut_off(folder, monkeypatch):
    monkeypatch.setattr(rows_module, "MAX_ROWS", 3)
    monkeypatch.setattr(rows_module, "MAX_LINE", 64)
    lines = ['{"prompt": "hi"}', '{"prompt": "' + "x" * 100 + '"}', *['{"prompt": "hi"}'] * 4, "not json"]
    (folder / "q.jsonl").write_text("\n".join(lines) + "\n")
    opened = []
    real_open = type(folder).open

    def spy(self, *args, **kwargs):
        stream = real_open(self, *args, **kwargs)
        if self.name == "q.jsonl":
            opened.append(stream)
        return stream

    monkeypatch.setattr(type(folder), "open", spy)
    with pytest.raises(VlmaskError) as caught:
        read_config(_write(folder / "b.yaml", "items_from: q.jsonl\n"))
    message = str(caught.value)
    assert f"{folder / 'q.jsonl'}:2: the line is longer than 64 bytes" in message
    assert f"{folder / 'q.jsonl'}:5: the file holds more than 3 rows: split it" in message
    assert ":7:" not in message  # reading stopped at the row too many: line 7 is not JSON
    assert opened and all(stream.closed for stream in opened)


def test_resume_reruns_only_the_changed_row(folder, monkeypatch):
    rows = [{"prompt": "test"}, {"prompt": "hi"}, {"prompt": "describe the picture", "answer": "red"}]
    data = folder / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _write(folder / "b.yaml", "output_dir: out\nitems_from: q.jsonl\n")
    assert [o.status for o in run_batch(cfg)] == ["done"] * 3
    ran = []
    real = batch_module.sweep
    monkeypatch.setattr(batch_module, "sweep", lambda vl, spec, **kw: ran.append(spec.prompt) or real(vl, spec, **kw))
    assert [o.status for o in run_batch(cfg)] == ["skipped"] * 3 and ran == []
    rows[1]["prompt"] = "what is in this image ?"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [o.status for o in run_batch(cfg)] == ["skipped", "done", "skipped"]
    assert ran == ["what is in this image ?"]
    assert vlmask.open_results(folder / "out" / "q-2.nc").attrs["prompt"] == "what is in this image ?"


def test_a_failed_row_is_told_at_its_data_file_line(folder, capsys):
    (folder / "q.csv").write_text("prompt,layers\ntest,\nhi,7\n")  # the built-in model has 4 layers
    cfg = _write(folder / "b.yaml", "output_dir: out\nitems_from: q.csv\n")
    assert main(["batch", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"failed  q-3 ({folder / 'q.csv'}:3): " in err and "layer 7 is out of range" in err


# ---- the answer: the measured token is the answer's, not the greedy one ------------------------------------------


QUESTION = "what color is the circle ?"
ANSWER_ATTRS = ("measured_token", "answer", "answer_token_ids")


def test_the_greedy_answer_gives_the_greedy_results(tiny, images):
    files = [images["square"]]
    greedy = vlmask.sweep(tiny, QUESTION, files, mask="all", num_tokens=3, progress=False)
    answer = greedy.attrs["clean_continuation"]
    forced = vlmask.sweep(tiny, QUESTION, files, mask="all", num_tokens=3, progress=False, answer=answer)
    assert forced.attrs["measured_token"] == "answer" and greedy.attrs["measured_token"] == "greedy"
    assert json.loads(forced.attrs["answer_token_ids"]) == greedy["step_token_id"].values.tolist()
    for ds in (forced, greedy):
        for name in ANSWER_ATTRS:
            del ds.attrs[name]
    xr.testing.assert_identical(forced, greedy)


def test_another_answer_is_measured_as_a_direct_forward_pass_computes_it(tiny, images):
    files = [images["square"]]
    built = build_prompt(tiny.processor, QUESTION, [str(f) for f in files])
    greedy = vlmask.sweep(tiny, QUESTION, files, mask="all", num_tokens=2, progress=False)
    first = int(greedy["step_token_id"][0])
    words = [
        w for w in ("circle", "picture", "test", "color") if tiny.processor.tokenizer.convert_tokens_to_ids(w) != first
    ]
    answer = " ".join(words[:2])
    answer_ids = tiny.processor.tokenizer.convert_tokens_to_ids(words[:2])
    ds = vlmask.sweep(tiny, QUESTION, files, mask="all", num_tokens=2, progress=False, answer=answer)
    assert ds["step_token_id"].values.tolist() == answer_ids and json.loads(ds.attrs["answer_token_ids"]) == answer_ids
    assert ds.attrs["clean_continuation"] == answer and ds.attrs["answer"] == answer
    forced = extended(built.inputs, answer_ids[:1])  # teacher-forced on the answer
    n = len(built.tokens)
    clean = reference_run(tiny, forced, set())
    for p in [0, n // 2, n - 2]:
        masked = reference_run(tiny, forced, {p})
        for step in range(2):
            row, token = ds.sel(token=p, step=step), answer_ids[step]
            lc, lm = (torch.log_softmax(x[2][n - 1 + step].double(), -1) for x in (clean, masked))
            assert float(row["logprob_drop"]) == pytest.approx(float(lc[token] - lm[token]), abs=1e-5)
            assert float(row["prob_change_pct"]) == pytest.approx(
                float(torch.expm1(lm[token] - lc[token]) * 100), abs=1e-3
            )
            assert float(row["kl"]) == pytest.approx(float((lc.exp() * (lc - lm)).sum()), abs=1e-5)
            assert bool(row["top_changed"]) == (int(lm.argmax()) != int(lc.argmax()))
            assert float(ds["clean_top_logprob"][step]) == pytest.approx(float(lc[token]), abs=1e-5)
    # step 0 reads the prompt alone: what does not depend on the continuation is the greedy run's
    for name in ("kl", "top_changed", "residual"):
        labels = ["step_token", "step_token_id"]  # the clean tokens differ: the answer's, the greedy one
        xr.testing.assert_allclose(ds[name].sel(step=0).drop_vars(labels), greedy[name].sel(step=0).drop_vars(labels))
    # the knockouts' own continuations are free-running greedy ones, whatever the clean continuation
    assert ds["masked_token_id"].values.tolist() == greedy["masked_token_id"].values.tolist()


def test_an_answer_must_be_text(tiny):
    with pytest.raises(VlmaskError, match="the answer is empty: give it some text"):
        vlmask.sweep(tiny, QUESTION, progress=False, answer=" ")
    assert vlmask.SweepSpec("hi", answer="red").to_dict()["answer"] == "red"
    with pytest.raises(VlmaskError, match="answer must be text, got 3"):
        vlmask.SweepSpec("hi", answer=3)


def test_run_takes_an_answer(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["run", "--prompt", QUESTION, "--answer", "red", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert "clean continuation (the answer's tokens, then greedy): 'red'" in capsys.readouterr().out
    ds = vlmask.open_results(out / "run.nc")
    assert ds.attrs["measured_token"] == "answer" and ds["step_token"].values.tolist() == ["red"]
