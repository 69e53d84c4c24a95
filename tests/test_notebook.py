"""``ds.vlmask.show()`` in a real notebook: executed by nbclient, exported by nbconvert, opened in Chromium."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vlmask
from tests.browser import needs_chromium, open_page
from vlmask.viz.report import report_html

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
nbconvert = pytest.importorskip("nbconvert")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 'what is "this" <img src=x onerror="document.body.dataset.pwned=1"> ?'


@pytest.fixture(scope="module")
def notebook(tiny, images, tmp_path_factory):
    """A notebook that opens a saved result and shows it, executed; and its HTML export."""
    root = tmp_path_factory.mktemp("notebook")
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], mask="all", num_tokens=1, progress=False)
    vlmask.save_results(ds, root / "result.nc")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(f"import vlmask\nds = vlmask.open_results({str(root / 'result.nc')!r})"),
        nbformat.v4.new_code_cell("ds.vlmask.show(height=700)"),
    ]
    # the kernel imports the vlmask under test (this checkout), installed or not
    env = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env]))
    try:
        nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}
        ).execute()
    finally:
        if env is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env
    body, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    (root / "notebook.html").write_text(body, encoding="utf-8")
    return {"nb": nb, "html": root / "notebook.html", "root": root, "ds": vlmask.open_results(root / "result.nc")}


def test_the_output_cell_is_the_report_in_a_sandboxed_iframe(notebook):
    (output,) = notebook["nb"].cells[1].outputs
    shown = output["data"]["text/html"]
    assert shown.startswith('<iframe sandbox="allow-scripts" title="vlmask report" srcdoc="')
    assert "allow-same-origin" not in shown and "<script" not in shown  # the page is an attribute value only
    srcdoc = shown.split('srcdoc="', 1)[1].split('" style=', 1)[0]
    import html

    assert html.unescape(srcdoc) == report_html(notebook["ds"])  # exactly the file report's page


@needs_chromium
def test_the_exported_notebook_shows_the_report_and_runs_no_injected_markup(notebook):
    page = open_page(notebook["html"])
    (frame,) = page.find("iframe")
    assert frame["sandbox"] == "allow-scripts"
    assert "data-pwned" not in page.dom and page.find("img", src="x") == []  # the prompt's markup stayed text
    inner = notebook["root"] / "inner.html"
    inner.write_text(frame["srcdoc"], encoding="utf-8")  # the iframe's document, as Chromium parsed the export
    report = open_page(inner)
    assert report.body["data-status"] == "ok" and "data-pwned" not in report.body, report.console
    ds = notebook["ds"]
    heat = report.one("canvas", id="heatmap")
    assert heat["data-cells"] == str(ds.sizes["token"] * ds.sizes["layer"])


@needs_chromium
def test_the_report_draws_inside_the_exported_notebook_page(notebook):
    """The report runs inside the notebook's iframe. An opaque-origin frame cannot be read from outside, so
    this copy of the export lets the test read it (``allow-same-origin``) and copies what it drew out."""
    exported = Path(notebook["html"]).read_text(encoding="utf-8")
    assert exported.count('sandbox="allow-scripts"') == 1
    readable = exported.replace('sandbox="allow-scripts"', 'sandbox="allow-scripts allow-same-origin"', 1)
    probe = (
        '<script>window.addEventListener("load", () => { const d = document.querySelector("iframe").contentDocument;'
        " document.body.dataset.inner = d.body.dataset.status;"
        ' document.body.dataset.cells = d.getElementById("heatmap").dataset.cells; });</script>'
    )
    copy = notebook["root"] / "readable.html"
    copy.write_text(readable.replace("</body>", probe + "</body>"), encoding="utf-8")
    page = open_page(copy)
    ds = notebook["ds"]
    assert page.body.get("data-inner") == "ok", page.console
    assert page.body["data-cells"] == str(ds.sizes["token"] * ds.sizes["layer"])
