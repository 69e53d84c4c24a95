"""Issue 18's cases about files, images and pages: input -> exit status, the one line, the files left.

Each row of ``CASES`` prepares its input in a fresh folder and runs the ``vlmask`` command on the
built-in model; the tests below it check what the table cannot: the pixels the model sees, the
picture the report embeds, the CF metadata, and the page in Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

import vlmask
from tests.browser import needs_chromium, open_page
from vlmask.builtin import make_processor
from vlmask.cli import main
from vlmask.inputs.media import MAX_PIXELS, ORIENTATION_TAG, read_image
from vlmask.inputs.prompt import build_prompt
from vlmask.results.cf import CF_METADATA
from vlmask.results.schema import recorded_media
from vlmask.viz.heatmap import heatmap
from vlmask.viz.plot import panel_pictures
from vlmask.viz.report import report_data

PROMPT = "what is in this image ?"
ROTATE_90_CW = 6  # EXIF Orientation 6: the stored pixels are shown turned 90 degrees clockwise


def upright_picture(size: tuple[int, int] = (64, 128)) -> Image.Image:
    """A tall picture no rotation or mirror maps to itself: red top-left quarter, blue bottom, green elsewhere."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[...] = (0, 200, 0)
    pixels[: h // 4, : w // 2] = (220, 0, 0)
    pixels[h // 2 :, :] = (0, 0, 220)
    return Image.fromarray(pixels)


def stored_sideways(path: Path, upright: Image.Image) -> Path:
    """Save ``upright`` as a camera would: pixels turned 90 degrees counter-clockwise, EXIF Orientation 6."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = ROTATE_90_CW
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), **_quality(path))
    return path


def _quality(path: Path) -> dict[str, int]:
    return {"quality": 95} if path.suffix == ".jpg" else {}


def bomb_png(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels: a few KB that decode to ``side**2`` pixels."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (96, 96), color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def run_args(image: Path | str, out: Path, *extra: str) -> list[str]:
    args = ["run", "--image", str(image), "--prompt", PROMPT, "--mask", "vision", "--num-tokens", "1"]
    return [*args, "--output", "r", "--output-dir", str(out), "--no-progress", *extra]


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep of the built-in model, run the CLI's way from its folder: project/img/pic.png, project/out/r.nc."""
    root = tmp_path_factory.mktemp("project")
    (root / "img").mkdir()
    upright_picture((128, 128)).save(root / "img" / "pic.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(run_args("img/pic.png", Path("out"))) == 0
    return root


# ---- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``prepare(folder, saved)`` makes the input in ``folder`` and gives the argv (run from ``folder``)."""

    name: str
    prepare: Callable[[Path, Path], list[str]]
    status: int
    words: tuple[str, ...]  # in stderr or the log (stderr is one line when status is 2)
    files: set[str]  # what the output folder ``folder/out`` holds afterwards
    absent: tuple[str, ...] = ()  # in neither


def _moved_together(folder: Path, saved: Path) -> list[str]:
    """A sweep run in one project folder, the folder then moved: found relative to the result, from anywhere."""
    first = folder / "first"
    (first / "img").mkdir(parents=True)
    upright_picture((128, 128)).save(first / "img" / "pic.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(first)
        assert main(run_args("img/pic.png", Path("runs"))) == 0
    shutil.move(first, folder / "moved")  # neither the absolute nor the recorded path exists now
    (folder / "out").mkdir()
    return ["heatmap", str(folder / "moved" / "runs" / "r.nc"), "-o", str(folder / "out" / "moved.png")]


def _result_moved_alone(folder: Path, saved: Path) -> list[str]:
    """Only the result moved, opened from elsewhere: the image is found at its absolute path."""
    (folder / "out").mkdir()
    shutil.copy(saved / "out" / "r.nc", folder / "out" / "r.nc")
    return ["report", str(folder / "out" / "r.nc"), "-o", str(folder / "out" / "r.html")]


def _tampered(command: str, name: str | None, value: str = "") -> Callable[[Path, Path], list[str]]:
    """The saved result with attribute ``name`` set to ``value`` (None: only its ``kl`` variable kept)."""

    def prepare(folder: Path, saved: Path) -> list[str]:
        ds = vlmask.open_results(saved / "out" / "r.nc")
        if name is None:
            ds = ds[["kl"]].assign_attrs(ds.attrs)
        else:
            ds.attrs[name] = value
        (folder / "in").mkdir()
        ds.to_netcdf(folder / "in" / "t.nc")
        return [command, str(folder / "in" / "t.nc"), "-o", str(folder / "out" / _output(command))]

    return prepare


def _output(command: str) -> str:
    return "t.png" if command == "heatmap" else "t.html"


def _other_tool(command: str) -> Callable[[Path, Path], list[str]]:
    def prepare(folder: Path, saved: Path) -> list[str]:
        (folder / "in").mkdir()
        xr.Dataset({"temperature": (("time",), [280.0, 281.5])}).to_netcdf(folder / "in" / "other.nc")
        return [command, str(folder / "in" / "other.nc"), "-o", str(folder / "out" / _output(command))]

    return prepare


CASES = [
    Case("2 exif-rotated-jpeg", lambda f, s: run_args(stored_sideways(f / "p.jpg", upright_picture()), f / "out"),
         0, (), {"r.nc"}),
    Case("9 20000x20000-png", lambda f, s: run_args(bomb_png(f / "bomb.png", 20000), f / "out"),
         2, ("too large", "400,000,000 pixels", f"{MAX_PIXELS:,}", "downscale"), set(),
         ("Traceback", "DecompressionBomb")),
    Case("9 11000x11000-png", lambda f, s: run_args(bomb_png(f / "big.png", 11000), f / "out"),
         2, ("too large", "121,000,000 pixels", f"{MAX_PIXELS:,}", "max_pixels"), set(),
         ("Traceback", "DecompressionBombWarning", "could be decompression bomb")),
    Case("9 animated-gif", lambda f, s: run_args(animated_gif(f / "anim.gif"), f / "out"),
         0, ("animated (3 frames)", "frame 0 only"), {"r.nc"}),
    Case("3 moved-with-its-image", _moved_together, 0, (), {"moved.png"}),
    Case("3 result-moved-alone", _result_moved_alone, 0, (), {"r.nc", "r.html"}),
    Case("10 image_files-not-json/heatmap", _tampered("heatmap", "image_files", "not json"), 2,
         ("not a vlmask result", "'image_files' is not valid JSON"), set(), ("Traceback", "JSONDecodeError")),
    Case("10 image_files-not-json/report", _tampered("report", "image_files", "not json"), 2,
         ("not a vlmask result", "'image_files' is not valid JSON"), set(), ("Traceback", "JSONDecodeError")),
    Case("10 only-kl/heatmap", _tampered("heatmap", None), 2,
         ("not a complete vlmask result", "no 'logprob_drop' variable"), set(), ("KeyError",)),
    Case("10 only-kl/report", _tampered("report", None), 2,
         ("not a complete vlmask result", "no 'residual' variable"), set(), ("KeyError",)),
    Case("10 other-tool/heatmap", _other_tool("heatmap"), 2, ("not a vlmask result", "temperature"), set(),
         ("window",)),
    Case("10 other-tool/report", _other_tool("report"), 2, ("not a vlmask result", "temperature"), set(),
         ("window",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, caplog) -> None:
    saved_copy = tmp_path / "saved"
    shutil.copytree(saved, saved_copy)  # cases may move its files
    argv = case.prepare(tmp_path, saved_copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # never the folder the sweep ran in
    status = main(argv)
    err = capsys.readouterr().err
    said = err + caplog.text  # under pytest, log lines (the CLI's stderr) reach caplog instead
    assert status == case.status, err
    for word in case.words:
        assert word in said, (word, said)
    for word in case.absent:
        assert word not in said, (word, said)
    if case.status == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("vlmask: error: "), err
    assert files_in(tmp_path / "out") == case.files
    assert files_in(elsewhere) == set()


# ---- what the table cannot see -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_the_model_sees_the_photo_upright(tmp_path: Path, suffix: str) -> None:
    upright = upright_picture()
    sideways = stored_sideways(tmp_path / f"sideways{suffix}", upright)
    straight = tmp_path / "straight.png"
    upright.save(straight)  # the same picture, stored upright, no EXIF
    assert Image.open(sideways).size == (128, 64)  # stored on its side
    read = read_image(sideways)
    assert read.orientation == ROTATE_90_CW and read.image.size == upright.size
    processor = make_processor(["what", "is", "in", "this", "image"])
    a, b = (build_prompt(processor, PROMPT, [p], chat_template="off").inputs for p in (sideways, straight))
    assert a["image_grid_thw"].tolist() == b["image_grid_thw"].tolist() == [[1, 8, 4]]  # tall: 8 rows x 4 cols
    difference = float((a["pixel_values"] - b["pixel_values"]).abs().mean())
    assert difference == 0.0 if suffix == ".png" else difference < 0.02  # JPEG: only its compression noise


def _embedded(ds: xr.Dataset) -> Image.Image:
    src = report_data(ds)["panels"][0]["src"]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_every_view_draws_the_upright_pixels(tmp_path: Path, suffix: str) -> None:
    upright = upright_picture()
    path = stored_sideways(tmp_path / f"photo{suffix}", upright)
    vl = vlmask.load_model()
    ds = vlmask.sweep(vl, PROMPT, [path], mask="vision", num_tokens=1, progress=False)
    assert json.loads(ds.attrs["image_orientation"]) == [ROTATE_90_CW]
    assert recorded_media(ds).images[0].orientation == ROTATE_90_CW
    embedded = _embedded(ds)
    assert embedded.size == upright.size and embedded.getexif().get(ORIENTATION_TAG, 1) == 1  # no rotation left
    drawn = panel_pictures(ds, heatmap(ds, "kl"))[0][0]  # the heatmap PNG's picture
    assert drawn.size == upright.size
    for picture in (embedded.convert("RGB"), drawn):
        pixels = np.asarray(picture).astype(int)
        assert pixels[4, 4].tolist() == pytest.approx([220, 0, 0], abs=12)  # red stays top-left
        assert pixels[120, 60].tolist() == pytest.approx([0, 0, 220], abs=12)  # blue stays at the bottom


def test_an_animation_embeds_its_first_frame(tmp_path: Path) -> None:
    ds = vlmask.sweep(vlmask.load_model(), PROMPT, [animated_gif(tmp_path / "a.gif")], num_tokens=1, progress=False)
    embedded = _embedded(ds)
    assert getattr(embedded, "n_frames", 1) == 1 and embedded.format == "PNG"
    assert np.asarray(embedded.convert("RGB"))[10, 10].tolist() == [200, 0, 0]


def test_paths_are_recorded_absolute_and_relative_to_the_result(saved: Path) -> None:
    ds = vlmask.open_results(saved / "out" / "r.nc")
    assert json.loads(ds.attrs["image_files"]) == ["img/pic.png"]  # as given
    assert json.loads(ds.attrs["image_files_absolute"]) == [str(saved / "img" / "pic.png")]
    assert json.loads(ds.attrs["image_files_relative"]) == ["../img/pic.png"]
    old = ds.copy()
    for name in ("image_files_absolute", "image_files_relative", "image_orientation"):
        del old.attrs[name]
    [f] = recorded_media(old).images  # an older result: the path as recorded, relative to where it ran
    assert (f.path, f.candidates(saved / "out" / "r.nc")) == ("img/pic.png", [Path("img/pic.png")])


def test_cf_metadata_covers_every_variable_and_coordinate(saved: Path) -> None:
    ds = vlmask.open_results(saved / "out" / "r.nc")
    assert ds.attrs["Conventions"].startswith("CF-") and ds.attrs["title"].startswith("vlmask")
    assert Path(ds.attrs["model_path"]) == Path(ds.attrs["model"]).resolve()  # the built-in model's folder
    missing = [name for name in ds.variables if name not in CF_METADATA]
    assert missing == []
    for name, var in ds.variables.items():
        long_name, units = CF_METADATA[name]
        assert var.attrs["long_name"] == long_name, name
        assert var.attrs.get("units") == units, name
        if units is None:
            assert var.dtype.kind != "f", name  # only text, flags and ids go without units


# ---- in Chromium ---------------------------------------------------------------------------------


@needs_chromium
def test_text_only_report_has_no_stray_null(tmp_path: Path) -> None:
    ds = vlmask.sweep(vlmask.load_model(), "what is in this image ?", num_tokens=1, progress=False)
    page = open_page(ds.vlmask.report(tmp_path / "t.html"))
    assert page.body["data-status"] == "ok" and page.console == []
    between = page.dom.split("<h2>Selected token</h2>")[1].split("<h2>Continuations</h2>")[0]
    assert "</section>null<section>" not in between and "</section><section>" in between


@needs_chromium
def test_a_large_report_is_readable_despite_an_outlier(tmp_path: Path) -> None:
    from tests.test_report import synthetic

    ds = synthetic(tokens=969, layers=4, heads=4, grid=(10, 10))
    ds["residual"][0, 5, 2, 0] = 1e4  # one outlier among values in [0, 1)
    ds.attrs["prompt"] = "describe " * 120  # 1080 characters
    path = ds.vlmask.report(tmp_path / "large.html")
    views = {scale: open_page(path, f"metric=residual:l2&scale={scale}") for scale in ("clip", "linear", "log")}
    for scale, page in views.items():
        assert page.body["data-status"] == "ok" and page.console == [], scale
        assert page.one("canvas", id="heatmap")["data-scale"] == scale
    default = open_page(path, "metric=residual:l2").one("canvas", id="heatmap")
    assert default["data-scale"] == "clip" and float(default["data-max"]) < 1.0  # the outlier does not set it
    assert float(views["linear"].one("canvas", id="heatmap")["data-max"]) == 1e4
    heat = views["clip"].one("canvas", id="heatmap")
    assert int(heat["data-cell-h"]) >= 12 and int(heat["data-label-w"]) > 0  # labelled rows that can be read
    assert int(heat["height"]) >= 969 * 12 and int(heat["width"]) >= 4 * 64  # the map grew with the result
    page = views["clip"]
    assert page.one("q", id="prompt")["_text"] == ds.attrs["prompt"]  # all of it, inside the collapsed box
    assert page.one("details", id="prompt-box") and len(page.one("q", id="prompt-start")["_text"]) < 300
