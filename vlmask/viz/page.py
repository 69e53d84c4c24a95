"""Self-contained HTML pages: data embedded as escaped JSON, scripts inline, nothing fetched.

Every string from a result (tokens, prompt, attributes) travels inside one
``<script type="application/json">`` block, with ``<``, ``>``, ``&`` and U+2028/U+2029
written as ``\\u003c``-style escapes, so no value can close the block or start markup; the
page's scripts put it on screen with ``textContent`` only. A Content-Security-Policy
allows just the page's own scripts (by hash) and ``data:`` images: no network at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vlmask.errors import VlmaskError
from vlmask.results.io import atomic_write, refuse_existing

ASSETS = resources.files("vlmask.viz") / "templates"
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class Numbers:
    """A numeric array embedded as a flat JSON list rounded to ``digits`` significant digits (NaN as null).

    Example:
        >>> encode({"x": Numbers([0.123456, float("nan"), 12345.6])})
        '{"x":[0.1235,null,1.235e+04]}'
    """

    def __init__(self, values: Any, digits: int = 4) -> None:
        self.values = np.asarray(values, dtype=np.float64).ravel()
        self.digits = digits

    def json(self) -> str:
        spec = f".{self.digits}g"
        return "[" + ",".join(format(x, spec) if math.isfinite(x) else "null" for x in self.values.tolist()) + "]"


def encode(data: Any) -> str:
    """Compact JSON for ``data`` (dicts, lists, strings, numbers, :class:`Numbers`), safe inside a ``<script>``.

    Example:
        >>> encode({"prompt": "</script><b>"})
        '{"prompt":"\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e"}'
    """
    text = _encode(data)
    for char, escape in _ESCAPES.items():
        text = text.replace(char, escape)
    return text


def _encode(data: Any) -> str:
    if isinstance(data, Numbers):
        return data.json()
    if isinstance(data, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{_encode(v)}" for k, v in data.items()) + "}"
    if isinstance(data, (list, tuple)):
        return "[" + ",".join(_encode(v) for v in data) + "]"
    if isinstance(data, np.generic):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return "null"
    return json.dumps(data, ensure_ascii=False)


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _sha(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


def page(script: str, data: dict[str, Any], title: str) -> str:
    """The HTML text of a page: ``templates/page.html`` with the style, ``common.js`` + ``script`` and ``data``.

    Example:
        >>> "vlmask-data" in page("report.js", {"kind": "report"}, "vlmask report")
        True
    """
    boot = _asset("boot.js")
    main = _asset("common.js") + "\n" + _asset(script)
    policy = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src {_sha(boot)} {_sha(main)}; base-uri 'none'; form-action 'none'"
    )
    html = _asset("page.html")
    for marker, value in (
        ("@POLICY@", policy),
        ("@TITLE@", title),
        ("/*@STYLE@*/", _asset("style.css")),
        ("/*@BOOT@*/", boot),
        ("/*@SCRIPT@*/", main),
    ):
        html = html.replace(marker, value, 1)
    before, marker, after = html.partition("@DATA@")  # last: data is never searched for markers
    return before + encode(data) + after


def write_page(html: str, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``html`` to ``path`` (``.html``) atomically; refuses to replace a file unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise VlmaskError(f"report output '{path}' must end in .html")
    refuse_existing(path, overwrite)
    return atomic_write(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
