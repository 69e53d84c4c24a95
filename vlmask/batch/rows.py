"""Batch items from a data file: one JSON object per line (``.jsonl``), or a CSV table under a header (``.csv``).

Each row becomes one item, checked exactly as an item written in the YAML file is: it is
turned into the YAML node of that item, marked with the data file and the row's line, so
every problem is told as ``data.csv:7: ...``.

- jsonl: one object per line, any item key (``image`` a path or a list of paths);
  blank lines are skipped. csv: the first line names the columns (any item key);
  ``image``, ``image2``, ``image3``, ... give several images (``video``, ``video2``, ...
  several videos); an empty cell is no value (the template's, or the default, applies).
  The text columns (``name``, ``prompt``, ``answer``, the paths, ``model``) are read as
  they are; any other cell as a YAML value, as it would be in the batch file (``2``,
  ``true``, ``0:4,7``, ``[0, 2]``, ``{k: 3}``).
- A row without a name is named after the file and its line: ``data-7`` for line 7 of
  ``data.csv``.
- Lines are counted from 1; in a csv the header is line 1, and a row is at the line it starts on.
- The file is read as a stream, one line at a time: a line over :data:`MAX_LINE` bytes and
  the rows past :data:`MAX_ROWS` are refused, so a huge file is not loaded for nothing. A
  UTF-8 byte-order mark is skipped; bytes that are not UTF-8 are a problem of their line.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import csv
import io
import json
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

MAX_ROWS = 100_000
"""The most rows a data file may hold."""
MAX_LINE = 2**20
"""The longest line of a data file read, in bytes (1 MiB)."""
MAX_DEPTH = 16
"""The deepest lists and mappings nest in a row's value."""
FORMATS = (".jsonl", ".csv")
TEXT_COLUMNS = frozenset({"name", "prompt", "answer", "image", "video", "model"})
"""The csv columns read as plain text, not as YAML values (with the numbered image and video columns)."""
NUMBERED = re.compile(r"(image|video)([2-9]|[1-9][0-9]+)")
STR, MAP, SEQ = "tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
PLAIN_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag is not None)

Problems = list[tuple[int, str]]
"""Problems of a data file, each as ``(line, message)``."""


def _lines(path: Path, problems: Problems) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of ``path`` that is UTF-8 and not too long, read one at a time."""
    with path.open("rb") as stream:
        number = 0
        while raw := stream.readline(MAX_LINE + 1):
            number += 1
            if len(raw) > MAX_LINE:
                problems.append((number, f"the line is longer than {MAX_LINE} bytes (1 MiB): refused"))
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = stream.readline(MAX_LINE + 1)
                continue
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append((number, f"not UTF-8 text: byte {raw[err.start]:#04x} at column {err.start + 1}"))


def _mark(path: Path, line: int) -> yaml.Mark:
    return yaml.Mark(str(path), 0, line - 1, 0, None, None)


def _node(value: Any, mark: yaml.Mark) -> yaml.Node:
    """The YAML node of a JSON value (as the YAML file would hold it), every part of it at ``mark``."""
    node = yaml.SafeDumper(io.StringIO()).represent_data(value)
    stack = [node]
    while stack:
        part = stack.pop()
        part.start_mark = part.end_mark = mark
        if isinstance(part, yaml.MappingNode):
            stack.extend(n for pair in part.value for n in pair)
        elif isinstance(part, yaml.SequenceNode):
            stack.extend(part.value)
    return node


def _default_name(path: Path, line: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip("._-") or "row"
    return f"{stem}-{line}"


def _row(path: Path, line: int, pairs: list[tuple[str, yaml.Node]]) -> yaml.MappingNode:
    """The item node of one row: its ``(key, value node)`` pairs, named after the file and line if unnamed."""
    mark = _mark(path, line)
    if all(key != "name" for key, _ in pairs):
        pairs = [("name", yaml.ScalarNode(STR, _default_name(path, line), mark, mark)), *pairs]
    value = [(yaml.ScalarNode(STR, key, mark, mark), node) for key, node in pairs]
    return yaml.MappingNode(MAP, value, mark, mark)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) < len(pairs):
        twice = next(key for key, count in collections.Counter(k for k, _ in pairs).items() if count > 1)
        raise ValueError(f"key {twice!r} appears twice")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (0: a plain value)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        part, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(part, (dict, list)) and depth <= MAX_DEPTH:
            stack.extend((v, depth + 1) for v in (part.values() if isinstance(part, dict) else part))
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _jsonl(path: Path, keys: tuple[str, ...], problems: Problems) -> Iterator[yaml.MappingNode]:
    """The rows of a jsonl file (``keys`` are checked with the rest of each item)."""
    for line, text in _lines(path, problems):
        if not text.strip():
            continue
        try:
            value = json.loads(text, object_pairs_hook=_object, parse_constant=_refuse_constant)
        except json.JSONDecodeError as err:
            problems.append((line, f"not valid JSON: {err.msg} (column {err.pos + 1})"))
            continue
        except (ValueError, RecursionError) as err:
            problems.append(
                (line, f"not valid JSON: {'it nests too deeply' if isinstance(err, RecursionError) else err}")
            )
            continue
        if not isinstance(value, dict):
            got = reprlib.repr(value)
            problems.append((line, f'a row must be a JSON object of item settings ({{"prompt": ...}}), got {got}'))
            continue
        if _depth(value) > MAX_DEPTH:
            problems.append((line, f"the row nests lists and objects more than {MAX_DEPTH} deep: refused"))
            continue
        mark = _mark(path, line)
        yield _row(path, line, [(str(k), _node(v, mark)) for k, v in value.items()])


class _Taken:
    """The lines of a file, fed to :mod:`csv`, remembering the numbers of those the last row took."""

    def __init__(self, lines: Iterator[tuple[int, str]]) -> None:
        self.lines, self.taken = lines, []

    def __iter__(self) -> _Taken:
        return self

    def __next__(self) -> str:
        number, text = next(self.lines)
        self.taken.append(number)
        return text


def _cell(path: Path, line: int, column: str, text: str) -> yaml.Node:
    """A csv cell's node: text as it is in a text column, else the YAML value it writes (plain data only)."""
    mark = _mark(path, line)
    if column in TEXT_COLUMNS or NUMBERED.fullmatch(column):
        return yaml.ScalarNode(STR, text, mark, mark, style='"')
    try:
        node = yaml.compose(text)
    except RecursionError:
        raise ValueError(f"column {column!r}: the value nests too deeply") from None
    except yaml.YAMLError as err:
        why = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ValueError(f"column {column!r}: {text!r} is not a YAML value ({why})") from None
    if node is None:  # a comment only
        return yaml.ScalarNode(STR, text, mark, mark, style='"')
    seen, stack = set(), [(node, 0)]
    while stack:
        part, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"column {column!r}: the value nests more than {MAX_DEPTH} deep: refused")
        if id(part) in seen:
            raise ValueError(f"column {column!r}: aliases (*name) are not taken in a cell: write the value out")
        seen.add(id(part))
        if part.tag not in PLAIN_TAGS:
            shown = part.tag.replace("tag:yaml.org,2002:", "!!")
            raise ValueError(
                f"column {column!r}: tag {shown!r} is not allowed: a cell holds plain values (text, numbers)"
            )
        part.start_mark = part.end_mark = mark
        if isinstance(part, yaml.MappingNode):
            stack.extend((n, depth + 1) for pair in part.value for n in pair)
        elif isinstance(part, yaml.SequenceNode):
            stack.extend((n, depth + 1) for n in part.value)
    return node


def _header(header: list[str], keys: tuple[str, ...], problems: Problems) -> list[str | None]:
    """The column names; each problem of them is told at line 1, and such a column is left out of every row."""
    names: list[str | None] = []
    for i, name in enumerate(header):
        if not name.strip():
            problems.append((1, f"column {i + 1} of the header has no name"))
        elif header.index(name) != i:
            problems.append((1, f"column {name!r} is named twice in the header"))
        elif name in ("images", "videos"):
            one = name[:-1]
            problems.append((1, f"column {name!r}: in a csv give each path its own column: {one}, {one}2, ..."))
        elif name not in keys and not NUMBERED.fullmatch(name):
            problems.append((1, f"the column {name!r} is not an item key: expected some of {', '.join(keys)}"))
        else:
            names.append(name)
            continue
        names.append(None)
    return names


def _csv_pairs(path: Path, line: int, header: list[str | None], cells: list[str]) -> list[tuple[str, yaml.Node]]:
    """The row's ``(key, node)`` pairs: numbered image and video columns gathered into lists, empty cells left out."""
    pairs: dict[str, list[yaml.Node]] = {}
    for column, text in zip(header, cells, strict=True):
        if text == "" or column is None:
            continue
        numbered = NUMBERED.fullmatch(column)
        key = numbered.group(1) if numbered else column
        pairs.setdefault(key, []).append(_cell(path, line, column, text))
    mark = _mark(path, line)
    return [(k, v[0] if len(v) == 1 else yaml.SequenceNode(SEQ, v, mark, mark)) for k, v in pairs.items()]


def _csv(path: Path, keys: tuple[str, ...], problems: Problems) -> Iterator[yaml.MappingNode]:
    lines = _Taken(_lines(path, problems))
    reader = csv.reader(lines, strict=True)
    header = None
    while True:
        lines.taken = []
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.append((lines.taken[0] if lines.taken else 1, f"not valid CSV: {err}"))
            continue
        line = lines.taken[0]
        if not cells:
            continue
        if header is None:
            header = _header(cells, keys, problems)
        elif len(cells) != len(header):
            problems.append((line, f"the row has {len(cells)} fields, the header {len(header)}"))
        else:
            try:
                yield _row(path, line, _csv_pairs(path, line, header, cells))
            except ValueError as err:
                problems.append((line, str(err)))
    if header is None:
        problems.append((1, "the file is empty: a csv's first line names its columns (prompt, image, ...)"))


def read_rows(path: Path, keys: tuple[str, ...]) -> tuple[list[yaml.MappingNode], Problems]:
    """The item nodes of data file ``path`` (``.jsonl`` or ``.csv``), and the problems of its rows.

    ``keys`` are the item keys, which a csv's header may name.

    Example:
        >>> _ = (tmp / "q.jsonl").write_text('{"prompt": "hi"}\\n\\n{"prompt": "test", "num_tokens": 2}\\n')
        >>> rows, problems = read_rows(tmp / "q.jsonl", ("name", "prompt", "num_tokens"))
        >>> [(row.start_mark.line + 1, row.value[0][1].value) for row in rows], problems
        ([(1, 'q-1'), (3, 'q-3')], [])
    """
    problems: Problems = []
    rows = []
    read = _csv if path.suffix.lower() == ".csv" else _jsonl
    with contextlib.closing(read(path, keys, problems)) as found:
        for row in found:
            if len(rows) == MAX_ROWS:
                problems.append((row.start_mark.line + 1, f"the file holds more than {MAX_ROWS} rows: split it"))
                break
            rows.append(row)
    if not rows and not problems:
        problems.append((1, "the file holds no rows"))
    return rows, problems
