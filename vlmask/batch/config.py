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
are relative to the configuration file. Every problem is reported at once, each with the
line it is on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from interventions import from_dict
from vlmask.engine.masks import VISION_ATTENTION
from vlmask.engine.packing import parse_size
from vlmask.errors import VlmaskError
from vlmask.inputs.media import read_image
from vlmask.inputs.prompt import CHAT_TEMPLATE_MODES
from vlmask.inputs.selection import parse_indices
from vlmask.inputs.units import parse_unit
from vlmask.inputs.video import video_hash
from vlmask.model.load import DTYPES
from vlmask.results.dataset import SCHEMA_VERSION

MODEL_KEYS = ("model", "dtype", "device", "attn_implementation")
SWEEP_KEYS = (
    "prompt",
    "image",
    "images",
    "video",
    "videos",
    "video_fps",
    "num_tokens",
    "mask",
    "mask_unit",
    "layers",
    "base",
    "chat_template",
    "vision_attention",
    "batch_size",
    "max_memory",
)
ITEM_KEYS = ("name", *SWEEP_KEYS, *MODEL_KEYS)
TOP_KEYS = ("items", "defaults", "output_dir")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
WORDS = ("text", "prompt", "vision", "all")


@dataclass(frozen=True)
class Item:
    """One validated sweep of a batch: ``sweep`` holds :func:`vlmask.sweep` keyword arguments
    (``prompt`` and ``images`` included), ``model`` the :func:`vlmask.load_model` ones, and
    ``config_hash`` what identifies its result (settings and input file contents)."""

    index: int
    name: str
    line: int
    sweep: dict[str, Any]
    model: tuple[tuple[str, Any], ...]
    settings: dict[str, Any]
    config_hash: str


@dataclass(frozen=True)
class Config:
    """A validated batch configuration."""

    path: Path
    items: list[Item]
    output_dir: Path | None


class _Problems:
    """Problems found so far, each with its line (1-based)."""

    def __init__(self, path: Path) -> None:
        self.path, self.found = path, []

    def add(self, node: yaml.Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.found.append((line, message))

    def raise_if_any(self) -> None:
        if self.found:
            lines = [f"  {self.path}:{line}: {message}" for line, message in sorted(self.found, key=lambda f: f[0])]
            count = len(self.found)
            raise VlmaskError(f"{self.path} has {count} problem{'s' * (count != 1)}:\n" + "\n".join(lines))


def _pairs(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's entries by key: ``(key node, value node)``."""
    return {str(k.value): (k, v) for k, v in node.value}


def _check(key: str, value: Any, base_dir: Path, item: dict[str, Any]) -> Any:
    """The value of ``key`` as the sweep wants it; raises :class:`VlmaskError` on a bad one."""
    if key in ("prompt", "model", "device"):
        if not isinstance(value, str) or not value.strip():
            raise VlmaskError(f"{key} must be non-empty text, got {value!r}")
        if key == "model" and (base_dir / value).exists():
            return str((base_dir / value).resolve())
        if key == "model" and value.startswith(("/", "./", "../", "~")):
            raise VlmaskError(f"model directory '{base_dir / value}' does not exist")
        return value
    if key in ("image", "images", "video", "videos"):
        paths = [value] if key in ("image", "video") else value
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise VlmaskError(f"{key} must be {'a path' if key in ('image', 'video') else 'a list of paths'}")
        resolved = [str(base_dir / p) for p in paths]
        for path in resolved:  # each must exist and be readable
            if key.startswith("image"):
                read_image(path)
            else:
                video_hash(path)
        return resolved
    if key in ("num_tokens", "batch_size"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VlmaskError(f"{key} must be a whole number >= 1, got {value!r}")
        return value
    if key == "video_fps":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise VlmaskError(f"video_fps must be a positive number, got {value!r}")
        return float(value)
    if key == "mask":
        if isinstance(value, list):
            return [int(p) for p in parse_indices(",".join(map(str, value)), 10**9)]
        if not isinstance(value, str):
            raise VlmaskError(
                f"mask must be text, prompt, vision, all, positions like '18:24,30' or a list, got {value!r}"
            )
        if value.strip() not in WORDS:
            try:
                parse_indices(value, 10**9)
            except VlmaskError as err:
                raise VlmaskError(
                    f"mask {value!r} is not understood ({err}): use text, prompt, vision, all or positions"
                ) from None
        if value.strip() == "vision" and not any(k in item for k in ("image", "images", "video", "videos")):
            raise VlmaskError("mask vision needs an image or a video, but the item has none")
        return value
    if key == "layers":
        text = ",".join(map(str, value)) if isinstance(value, list) else value
        if not isinstance(text, str):
            raise VlmaskError(f"layers must be like '0:4,7' or a list of layers, got {value!r}")
        return parse_indices(text, 10**9, "layer")
    if key == "mask_unit":
        parse_unit(value)
        return value
    if key == "base":
        from_dict(value)
        return value
    if key == "max_memory":
        return parse_size(str(value))
    choices = {
        "chat_template": CHAT_TEMPLATE_MODES,
        "vision_attention": VISION_ATTENTION,
        "dtype": tuple(sorted(DTYPES)),
        "attn_implementation": ("sdpa", "eager"),
    }[key]
    if value not in choices:
        raise VlmaskError(f"{key} {value!r} is not known: expected one of {', '.join(choices)}")
    return value


def _hash(settings: dict[str, Any]) -> str:
    """SHA-256 of an item's settings (name aside) and of its input files' contents."""
    files = {}
    for key in ("images", "videos"):
        for path in settings.get(key, ()):
            files[path] = video_hash(path) if key == "videos" else hashlib.sha256(Path(path).read_bytes()).hexdigest()
    content = {k: v for k, v in settings.items() if k not in ("name", "images", "videos")}
    content["files"] = {key: [files[p] for p in settings.get(key, ())] for key in ("images", "videos")}
    content["schema_version"] = SCHEMA_VERSION
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _value(key: str, node: yaml.Node) -> Any:
    """The Python value of ``node``; ``mask`` and ``layers`` keep their text (YAML 1.1 reads ``3:1`` as 181)."""
    if key in ("mask", "layers") and isinstance(node, yaml.ScalarNode) and not node.style:
        return node.value
    return yaml.safe_load(yaml.serialize(node))


def _item(index: int, node: yaml.Node, defaults: dict, problems: _Problems, base_dir: Path) -> Item | None:
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
    for key in ("name", "prompt"):
        if key not in raw:
            problems.add(node, f"{label}: missing {key!r}")
    for one, many in (("image", "images"), ("video", "videos")):
        if one in raw and many in raw:
            problems.add(entries[many][0], f"{label}: give {one} or {many}, not both")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key == "name" and not (isinstance(value, str) and NAME.fullmatch(value)):
                raise VlmaskError(f"name {value!r} must be a file name: letters, digits, '.', '_', '-'")
            checked = value if key == "name" else _check(key, value, base_dir, raw)
            settings[{"image": "images", "video": "videos"}.get(key, key)] = checked
        except VlmaskError as err:
            problems.add(entries[key][1], f"{label}: {err}")
    if len(problems.found) > before:
        return None
    return Item(
        index=index,
        name=settings["name"],
        line=node.start_mark.line + 1,
        sweep={k: v for k, v in settings.items() if k not in ("name", *MODEL_KEYS)},
        model=tuple((k, settings.get(k)) for k in MODEL_KEYS),
        settings=settings,
        config_hash=_hash(settings),
    )


def _defaults(node: yaml.Node, problems: _Problems) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The ``defaults:`` entries every item starts from (``name`` and unknown keys refused)."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, "defaults must be a mapping of item settings")
        return {}
    entries = _pairs(node)
    known = (*SWEEP_KEYS, *MODEL_KEYS)
    for key, (key_node, _) in entries.items():
        if key not in known:
            problems.add(key_node, f"defaults: {key!r} cannot be a default: expected some of {', '.join(known)}")
    return {k: v for k, v in entries.items() if k in known}


def _duplicates(items: yaml.SequenceNode, problems: _Problems) -> None:
    """Refuse a name used by two items (their results would overwrite each other)."""
    seen: dict[str, int] = {}
    for node in items.value:
        name = _pairs(node).get("name", (None, None))[1] if isinstance(node, yaml.MappingNode) else None
        if isinstance(name, yaml.ScalarNode):
            if name.value in seen:
                problems.add(name, f"name {name.value!r} is already used by the item on line {seen[name.value]}")
            seen.setdefault(name.value, node.start_mark.line + 1)


def read_config(path: str | Path) -> Config:
    """Parse and validate a batch configuration; every problem is reported at once, with its line.

    Example:
        >>> read_config("missing.yaml")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: batch configuration 'missing.yaml' does not exist
    """
    path = Path(path)
    if not path.is_file():
        raise VlmaskError(f"batch configuration '{path}' does not exist")
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as err:
        raise VlmaskError(f"'{path}' is not valid YAML: {' '.join(str(err).split())}") from None
    problems = _Problems(path)
    items_node, defaults, output_dir = root, {}, None
    if isinstance(root, yaml.MappingNode):
        top = _pairs(root)
        for key, (key_node, _) in top.items():
            if key not in TOP_KEYS:
                problems.add(key_node, f"unknown top-level key {key!r}: expected some of {', '.join(TOP_KEYS)}")
        items_node = top.get("items", (None, None))[1]
        defaults = _defaults(top["defaults"][1], problems) if "defaults" in top else {}
        if "output_dir" in top:
            output_dir = path.parent / str(top["output_dir"][1].value)
    if not isinstance(items_node, yaml.SequenceNode) or not items_node.value:
        problems.add(items_node or root, "the configuration needs a non-empty list of items (under 'items:')")
        problems.raise_if_any()
    items = [_item(i, node, defaults, problems, path.parent) for i, node in enumerate(items_node.value)]
    _duplicates(items_node, problems)
    problems.raise_if_any()
    return Config(path, [item for item in items if item is not None], output_dir)
