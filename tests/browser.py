"""Open a page in real headless Chromium (Debian's ``chromium``) and read back its DOM, log or a screenshot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium (.ci/run installs it)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=10000",
    "--enable-logging=stderr",
    "--v=0",
)


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Tags(HTMLParser):
    """Every start tag with its attributes and its own text (``_text``), in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        entry = (tag, {**dict(attrs), "_text": ""})
        self.tags.append(entry)
        if tag not in VOID:
            self.open.append(entry)

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self.open:
            self.open[-1][1]["_text"] += data


@dataclass(frozen=True)
class Page:
    """What Chromium left: the serialised DOM after the scripts ran, and its log (console messages included)."""

    dom: str
    log: str

    @property
    def tags(self) -> list[tuple[str, dict[str, str | None]]]:
        parser = _Tags()
        parser.feed(self.dom)
        return parser.tags

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        """Elements ``tag`` with ``attrs`` (``data_x`` is ``data-x``, ``class_`` is ``class``; ``_text`` their text)."""
        want = {k if k == "_text" else k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in want.items())]

    def one(self, tag: str, **attrs: str) -> dict[str, str | None]:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]

    @property
    def body(self) -> dict[str, str | None]:
        return self.one("body")

    @property
    def console(self) -> list[str]:
        """Console messages and uncaught errors Chromium logged for the page."""
        return [line for line in self.log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _run(url: str, extra: list[str]) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="vlmask-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )


def open_page(path: Path, fragment: str = "") -> Page:
    """Load ``path`` (``file://``, plus ``#fragment``), let its scripts run, and dump the DOM."""
    out = _run(path.resolve().as_uri() + (f"#{fragment}" if fragment else ""), ["--dump-dom"])
    assert out.returncode == 0, out.stderr[-2000:]
    return Page(out.stdout, out.stderr)


def screenshot(path: Path, png: Path, fragment: str = "", size: tuple[int, int] = (1300, 2400)) -> Path:
    """Save a PNG of the page as a person would see it (for humans; tests only check that it exists)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    flags = [f"--screenshot={png.resolve()}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars"]
    out = _run(path.resolve().as_uri() + (f"#{fragment}" if fragment else ""), flags)
    assert out.returncode == 0 and png.exists(), out.stderr[-2000:]
    return png
