"""Batch configuration: a YAML list of sweeps, validated as a whole before any model loads.

::

    output_dir: results            # optional, relative to this file (--output-dir wins)
    defaults:                      # optional: every item starts from these
      num_tokens: 2
    items:
      - name: circle               # the result is OUTPUT_DIR/circle.nc
        image: ../examples/shapes.png
        prompt: what color is the circle ?
        mask: vision

A bare list of items is accepted too. Paths (images, video directories, a model directory)
are relative to the configuration file. ``items_from: data.jsonl`` (or ``.csv``, or a list of
such files, relative to this file) adds one item per row of the data file, after ``items``
(see :mod:`vlmask.batch.rows`); ``template:`` holds settings every row starts from (a row's
own values win, and the template's win over ``defaults``); paths in a row are relative to its
data file. Every problem is reported at once, each with the file and line it is on.
A file is read as plain data: tags that would make objects (``!!python/...``)
are refused, and so is a file over :data:`MAX_BYTES` or one whose aliases expand to more
than :data:`MAX_VALUES` values (a "billion laughs"), before any of it is used.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmask.batch.rows import FORMATS, read_rows
from vlmask.errors import VlmaskError
from vlmask.inputs.video import video_hash
from vlmask.model.names import DTYPE_NAMES, MASK_FORMATS, check_device
from vlmask.results.dataset import SCHEMA_VERSION
from vlmask.spec import SweepSpec

MODEL_KEYS = ("model", "dtype", "device", "attn_implementation")
ALIASES = {f.metadata["one"]: f.name for f in dataclasses.fields(SweepSpec) if "one" in f.metadata}
"""A singular key that takes one path: ``image: a.png`` is ``images: [a.png]``."""
SWEEP_KEYS = tuple(k for f in dataclasses.fields(SweepSpec) for k in (f.metadata.get("one"), f.name) if k)
ITEM_KEYS = ("name", *SWEEP_KEYS, *MODEL_KEYS)
TOP_KEYS = ("items", "items_from", "template", "defaults", "output_dir")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_BYTES = 2**20
"""The largest batch file read (1 MiB)."""
MAX_VALUES = 100_000
"""The most values (scalars, lists, mappings) a batch file may hold once its aliases are expanded."""
PLAIN_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag is not None)
"""The YAML tags of plain data (text, numbers, booleans, null, lists, mappings, dates)."""


@dataclass(frozen=True)
class Item:
    """One validated sweep of a batch: its :class:`~vlmask.spec.SweepSpec`, the :func:`vlmask.load_model`
    options in ``model``, and ``config_hash``, what identifies its result (settings and input file contents).
    ``line`` is where it starts in its file: the configuration, or the data ``file`` of its row."""

    index: int
    name: str
    line: int
    spec: SweepSpec
    model: tuple[tuple[str, Any], ...]
    settings: dict[str, Any]
    config_hash: str
    file: str = ""


@dataclass(frozen=True)
class Config:
    """A validated batch configuration."""

    path: Path
    items: list[Item]
    output_dir: Path | None


class _Problems:
    """Problems found so far, each with its file (the configuration, or a data file) and line (1-based)."""

    def __init__(self, path: Path) -> None:
        self.path, self.found = path, []

    def add(self, node: yaml.Node | None, message: str) -> None:
        if node is None:
            self.add_at(str(self.path), 1, message)
        else:
            self.add_at(node.start_mark.name, node.start_mark.line + 1, message)

    def add_at(self, file: str, line: int, message: str) -> None:
        self.found.append((file, line, message))

    def raise_if_any(self) -> None:
        if self.found:
            order = sorted(self.found, key=lambda f: (f[0] != str(self.path), f[0], f[1]))  # the configuration first
            lines = [f"  {file}:{line}: {message}" for file, line, message in order]
            count = len(self.found)
            raise VlmaskError(f"{self.path} has {count} problem{'s' * (count != 1)}:\n" + "\n".join(lines))


def _pairs(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's entries by key: ``(key node, value node)``."""
    return {str(k.value): (k, v) for k, v in node.value}


def _model_option(key: str, value: Any, base_dir: Path) -> Any:
    """Model key ``key``'s value as :func:`vlmask.load_model` wants it; raises :class:`VlmaskError` on a bad one."""
    if key in ("model", "device"):
        if not isinstance(value, str) or not value.strip():
            raise VlmaskError(f"{key} must be non-empty text, got {value!r}")
        if key == "device":
            return check_device(value)
        if key == "model" and (base_dir / value).exists():
            return str((base_dir / value).resolve())
        if key == "model" and value.startswith(("/", "./", "../", "~")):
            raise VlmaskError(f"model directory '{base_dir / value}' does not exist")
        return value
    choices = {"dtype": tuple(sorted(DTYPE_NAMES)), "attn_implementation": tuple(MASK_FORMATS)}[key]
    if value not in choices:
        raise VlmaskError(f"{key} {value!r} is not known: expected one of {', '.join(choices)}")
    return value


def _resolve(value: Any, base_dir: Path) -> Any:
    """Paths relative to the configuration file (anything else is left for the spec to refuse)."""
    if isinstance(value, str):
        return [str(base_dir / value)]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return [str(base_dir / p) for p in value]
    return value


@functools.lru_cache(maxsize=4096)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file's bytes, read once per version of the file (rows sharing an image read it once)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _file_hash(path: str | Path) -> str:
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def _hash(spec: SweepSpec, model: dict[str, Any]) -> str:
    """SHA-256 of an item's spec (paths aside), its input files' contents, its model options and the schema."""
    content = {k: v for k, v in spec.to_dict().items() if k not in ("images", "videos")}
    content["files"] = {
        "images": [_file_hash(p) for p in spec.images],
        "videos": [video_hash(p) for p in spec.videos],
    }
    content.update(model)
    content["schema_version"] = SCHEMA_VERSION
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


FILES = ("image", "images", "video", "videos")
CHOICES = {f.name: f.metadata.get("choices", ()) for f in dataclasses.fields(SweepSpec)}


def _value(key: str, node: yaml.Node) -> Any:
    """The Python value of ``node``; a plain scalar with a ``:``, or one of the option's choices, stays text.

    YAML 1.1 reads ``3:1`` as 181 and ``off`` as False.
    """
    if (
        isinstance(node, yaml.ScalarNode)
        and not node.style
        and (":" in node.value or node.value in CHOICES.get(key, ()))
    ):
        return node.value
    return yaml.constructor.SafeConstructor().construct_document(node)


def _folder(entry: tuple[yaml.Node, yaml.Node]) -> Path:
    """The folder of the file a setting is written in: what its paths are relative to."""
    return Path(entry[1].start_mark.name).parent


def _spec(raw: dict[str, Any], entries: dict, label: str, node: yaml.Node, problems: _Problems):
    """The item's :class:`SweepSpec`, or None with each problem recorded at the line of its key."""
    values = {ALIASES.get(k, k): _resolve(v, _folder(entries[k])) if k in FILES else v for k, v in raw.items()}
    values = {k: v for k, v in values.items() if k in SWEEP_KEYS}
    found = SweepSpec.problems(values, read_files=True)
    for option, message in found:
        key = next((k for k in (option, *(a for a, o in ALIASES.items() if o == option)) if k in entries), None)
        problems.add(entries[key][1] if key else node, f"{label}: {message}")
    return None if found else SweepSpec(**values)


def _item(index: int, node: yaml.Node, defaults: dict, problems: _Problems) -> Item | None:
    """The item at ``node``, or None (with its problems recorded) if it has any."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, f"item {index} must be a mapping of settings (name, prompt, image, ...)")
        return None
    before = len(problems.found)
    entries = {**defaults, **_pairs(node)}
    name_node = entries.get("name", (None, None))[1]
    label = f"item {name_node.value!r}" if isinstance(name_node, yaml.ScalarNode) else f"item {index}"
    for key, (key_node, _) in entries.items():
        if key not in ITEM_KEYS:
            problems.add(key_node, f"{label}: unknown key {key!r}: expected some of {', '.join(ITEM_KEYS)}")
    raw = {k: _value(k, v) for k, (_, v) in entries.items() if k in ITEM_KEYS}
    name = raw.get("name")
    if "name" not in raw:
        problems.add(node, f"{label}: missing 'name'")
    elif not (isinstance(name, str) and NAME.fullmatch(name)):
        problems.add(entries["name"][1], f"{label}: name {name!r} must be a file name: letters, digits, '.', '_', '-'")
    for one, many in ALIASES.items():
        if one in raw and many in raw:
            problems.add(entries[many][0], f"{label}: give {one} or {many}, not both")
            raw.pop(one)
    model = {}
    for key in (k for k in MODEL_KEYS if k in raw):
        try:
            model[key] = _model_option(key, raw[key], _folder(entries[key]))
        except VlmaskError as err:
            problems.add(entries[key][1], f"{label}: {err}")
    spec = _spec(raw, entries, label, node, problems)
    if len(problems.found) > before or spec is None:
        return None
    return Item(
        index=index,
        name=name,
        line=node.start_mark.line + 1,
        spec=spec,
        model=tuple((k, model.get(k)) for k in MODEL_KEYS),
        settings={"name": name, **spec.to_dict(), **model},
        config_hash=_hash(spec, model),
        file="" if node.start_mark.name == str(problems.path) else node.start_mark.name,
    )


def _defaults(node: yaml.Node, problems: _Problems, what: str = "defaults") -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The ``defaults:`` (or ``template:``) entries items start from (``name`` and unknown keys refused)."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, f"{what} must be a mapping of item settings")
        return {}
    entries = _pairs(node)
    known = (*SWEEP_KEYS, *MODEL_KEYS)
    for key, (key_node, _) in entries.items():
        if key not in known:
            role = "a default" if what == "defaults" else "in the template"
            problems.add(key_node, f"{what}: {key!r} cannot be {role}: expected some of {', '.join(known)}")
    return {k: v for k, v in entries.items() if k in known}


def _duplicates(items: list[yaml.Node], problems: _Problems) -> None:
    """Refuse a name used by two items (their results would overwrite each other)."""
    seen: dict[str, yaml.Mark] = {}
    for node in items:
        name = _pairs(node).get("name", (None, None))[1] if isinstance(node, yaml.MappingNode) else None
        if isinstance(name, yaml.ScalarNode):
            if name.value in seen:
                first = seen[name.value]
                where = (
                    f"line {first.line + 1}" if first.name == name.start_mark.name else f"{first.name}:{first.line + 1}"
                )
                problems.add(name, f"name {name.value!r} is already used by the item on {where}")
            seen.setdefault(name.value, node.start_mark)


def _data_files(node: yaml.Node, problems: _Problems) -> list[Path]:
    """The data files ``items_from`` names (one path or a list), relative to the configuration file."""
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not nodes:
        problems.add(node, f"items_from is an empty list: name a data file ({', '.join(FORMATS)}) or more")
    files = []
    for part in nodes:
        if not isinstance(part, yaml.ScalarNode) or not part.value.strip() or part.tag != "tag:yaml.org,2002:str":
            problems.add(part, f"items_from must name a data file ({', '.join(FORMATS)}) or a list of them")
            continue
        path = problems.path.parent / part.value
        if path.suffix.lower() not in FORMATS:
            problems.add(part, f"data file '{path}' is not {' or '.join(FORMATS)}: name a file of one of these kinds")
        elif not path.is_file():
            problems.add(part, f"data file '{path}' does not exist")
        else:
            files.append(path)
    return files


def _rows(top: dict, defaults: dict, problems: _Problems) -> tuple[list[yaml.Node], dict]:
    """The item nodes of every row of ``items_from``'s files, and what each row starts from (template over defaults)."""
    template = _defaults(top["template"][1], problems, "template") if "template" in top else {}
    if "items_from" not in top:
        if "template" in top:
            problems.add(top["template"][0], "template applies to the rows of items_from, and there is no items_from")
        return [], defaults
    rows = []
    for path in _data_files(top["items_from"][1], problems):
        found, bad = read_rows(path, ITEM_KEYS)
        rows += found
        for line, message in bad:
            problems.add_at(str(path), line, message)
    return rows, {**defaults, **template}


def _check_nodes(root: yaml.Node, problems: _Problems) -> None:
    """Record each tag that is not plain data, and refuse aliases that expand past :data:`MAX_VALUES`."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_VALUES + 1  # while counting: a node that holds itself counts as too many
        if node.tag not in PLAIN_TAGS:
            shown = node.tag.replace("tag:yaml.org,2002:", "!!")
            problems.add(node, f"tag {shown!r} is not allowed: a batch file holds plain values (text, numbers, lists)")
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        total = 1
        if isinstance(node, yaml.CollectionNode):
            for child in children:
                total += size(child)
                if total > MAX_VALUES:
                    break
        sizes[id(node)] = total
        return total

    if size(root) > MAX_VALUES:
        problems.add(
            None, f"the file holds more than {MAX_VALUES} values once its aliases (*name) are expanded: refused"
        )


def _compose(path: Path) -> yaml.Node | None:
    """The file's YAML node tree (aliases shared, nothing constructed), its syntax errors told at their line."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise VlmaskError(f"batch configuration '{path}' is {size} bytes: at most {MAX_BYTES} (1 MiB) are read")
    try:
        with path.open(encoding="utf-8") as stream:
            return yaml.compose(stream)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        why = " ".join(f"{err.context or ''} {err.problem}".split())
        raise VlmaskError(f"{where}: not valid YAML: {why}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        why = "it nests too deeply" if isinstance(err, RecursionError) else " ".join(str(err).split())
        raise VlmaskError(f"'{path}' is not valid YAML: {why}") from None


def read_config(path: str | Path) -> Config:
    """Parse and validate a batch configuration; every problem is reported at once, with its file and line.

    Example:
        >>> read_config("missing.yaml")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: batch configuration 'missing.yaml' does not exist
    """
    path = Path(path)
    if not path.is_file():
        raise VlmaskError(f"batch configuration '{path}' does not exist")
    root = _compose(path)
    problems = _Problems(path)
    if root is not None:
        _check_nodes(root, problems)
        problems.raise_if_any()
    items_node, top, output_dir = root, {}, None
    if isinstance(root, yaml.MappingNode):
        top = _pairs(root)
        for key, (key_node, _) in top.items():
            if key not in TOP_KEYS:
                problems.add(key_node, f"unknown top-level key {key!r}: expected some of {', '.join(TOP_KEYS)}")
        items_node = top.get("items", (None, None))[1]
        if "output_dir" in top:
            output_dir = path.parent / str(top["output_dir"][1].value)
    defaults = _defaults(top["defaults"][1], problems) if "defaults" in top else {}
    rows, row_defaults = _rows(top, defaults, problems)
    written = items_node.value if isinstance(items_node, yaml.SequenceNode) else []
    not_a_list = items_node is not None and not isinstance(items_node, yaml.SequenceNode)
    if not_a_list or not (written or rows or "items_from" in top):
        problems.add(items_node or root, "the configuration needs a non-empty list of items (under 'items:')")
        problems.raise_if_any()
    items = [_item(i, node, defaults, problems) for i, node in enumerate(written)]
    items += [_item(len(written) + i, node, row_defaults, problems) for i, node in enumerate(rows)]
    _duplicates([*written, *rows], problems)
    problems.raise_if_any()
    return Config(path, [item for item in items if item is not None], output_dir)
