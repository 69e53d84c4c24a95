"""``vlmask run`` end to end on a tiny checkpoint, and its handling of bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vlmask
from vlmask.cli import main


def test_run_end_to_end_in_a_subprocess(tiny_dir, images, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmask.cli",
            "run",
            "--model",
            str(tiny_dir),
            "--image",
            str(images["square"]),
            "--prompt",
            "what is in this image ?",
            "--num-tokens",
            "2",
            "--output",
            "e2e",
            "--output-dir",
            str(tmp_path),
            "--format",
            "csv,json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "vision tokens: positions 3-18 (16 tokens, image 0)" in out.stdout
    assert "masked units by KL" in out.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"e2e.nc", "e2e.csv", "e2e.json"}
    ds = vlmask.open_results(tmp_path / "e2e.nc")
    assert ds.sizes["step"] == 2 and set(ds["token_kind"].values) == {"text"}


def test_text_only_and_explicit_positions(tiny_dir, tmp_path, capsys):
    code = main(
        [
            "run",
            "--model",
            str(tiny_dir),
            "--prompt",
            "test",
            "--mask",
            "0:2,3",
            "--output",
            "t",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
            "--layers",
            "0:2",
        ]
    )
    assert code == 0
    assert "vision tokens: none" in capsys.readouterr().out
    ds = vlmask.open_results(tmp_path / "t.nc")
    assert ds["token"].values.tolist() == [0, 1, 3] and ds.attrs["layers"] == "[0, 1]"


def _bad(tiny_dir, tmp_path, *extra, prompt="test"):
    return [
        "run",
        "--model",
        str(tiny_dir),
        "--prompt",
        prompt,
        "--output",
        "bad",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-image", "does not exist"),
        ("not-an-image", "is not an image"),
        ("empty-prompt", "prompt is empty"),
        ("vision-without-image", "--mask: mask vision needs an image or a video"),
        ("out-of-range", "key position 99 is out of range"),
        ("unknown-model", "is not a local directory"),
        ("bad-layer", "layer 7 is out of range"),
        ("bad-format", "--format 'xml' is not known"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, case, message):
    text = tmp_path / "text.png"
    text.write_text("hello")
    args = {
        "missing-image": _bad(tiny_dir, tmp_path, "--image", str(tmp_path / "missing.png")),
        "not-an-image": _bad(tiny_dir, tmp_path, "--image", str(text)),
        "empty-prompt": _bad(tiny_dir, tmp_path, prompt=" "),
        "vision-without-image": _bad(tiny_dir, tmp_path, "--mask", "vision"),
        "out-of-range": _bad(tiny_dir, tmp_path, "--mask", "99"),
        "unknown-model": [*_bad(tiny_dir, tmp_path), "--model", str(tmp_path / "no-such-model")],
        "bad-layer": _bad(tiny_dir, tmp_path, "--layers", "7"),
        "bad-format": _bad(tiny_dir, tmp_path, "--format", "xml"),
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.nc").exists()


def test_existing_output_is_refused_unless_overwrite(tiny_dir, tmp_path, capsys):
    (tmp_path / "bad.nc").write_text("keep me")
    assert main(_bad(tiny_dir, tmp_path)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "bad.nc").read_text() == "keep me"
    assert main([*_bad(tiny_dir, tmp_path), "--overwrite"]) == 0
    assert vlmask.open_results(tmp_path / "bad.nc").attrs["prompt"] == "test"


def test_interrupted_run_leaves_no_file(tiny_dir, tmp_path, monkeypatch, capsys):
    from vlmask.engine.backend import Backend

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Backend, "run_decoder", interrupted)  # mid-sweep
    assert main(_bad(tiny_dir, tmp_path)) == 130
    assert list(tmp_path.iterdir()) == []
