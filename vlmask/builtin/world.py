"""The synthetic shapes world the built-in checkpoint was trained on, and how it asks the model.

A scene is a 128x128 white image cut into a 4x4 grid of 32x32 cells. Two to four
shapes sit in distinct cells; within a scene every shape has its own type and its own
colour, so each question has exactly one right answer. The model sees images with
16-pixel patches merged 2x2, so each 32x32 cell is exactly one vision token, and the
16 vision tokens run row-major: cell ``(row, col)`` is vision token ``4 * row + col``.

Three question templates, all six words long, answered with one word:

* ``"what color is the circle ?"`` -> ``"red"`` (the colour of the named shape)
* ``"what is the red shape ?"`` -> ``"circle"`` (the type of the shape with that colour)
* ``"how many shapes are there ?"`` -> ``"three"``

Because every prompt has the same length, a batch never needs padding, and the token
positions are the same for every scene (see :data:`VISION_START` and :data:`QUESTION_START`).
Training and the knockout ground truth live in :mod:`vlmask.builtin.shapes`.

Example:
    >>> import numpy as np
    >>> scene = sample_scene(np.random.default_rng(0))
    >>> scene.image.size, len(scene.question.split())
    ((128, 128), 6)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmask.builtin import DEFAULT_MODEL_PATH, make_processor, words_of

IMAGE_SIZE = 128
GRID = 4
CELL = IMAGE_SIZE // GRID  # 32 pixels: one merged vision token per cell

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (225, 55, 50),
    "green": (50, 175, 105),
    "blue": (55, 95, 180),
    "purple": (145, 45, 140),
}
"""The palette. Every colour has the same channel sum (330), so "how much ink is in this
patch" is a linear function of the pixels whatever the colour: shape outlines are as
easy to see as colours."""
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
QUESTION_KINDS = ("color", "shape", "count")
KIND_WEIGHTS = (0.55, 0.35, 0.10)
"""How often :func:`sample_scene` asks each kind of question."""

FUNCTION_WORDS = ("what", "is", "the")
"""Words of the colour and shape questions that carry no information about the answer."""

# Token layout of every prompt made by :func:`prompt_text` with the built-in processor:
# <|im_start|> user <|vision_start|> 16 x <|image_pad|> <|vision_end|> 6 question words
# <|im_end|> <|im_start|> assistant  -> 29 tokens; the answer is predicted at the last one.
VISION_START = 3
"""Sequence position of vision token 0 (cell (0, 0))."""
NUM_VISION_TOKENS = GRID * GRID
QUESTION_START = VISION_START + NUM_VISION_TOKENS + 1
"""Sequence position of the first question word."""

TRAIN_SEED = 0
EVAL_SEED = 1_000_003
KNOCKOUT_SEED = 2_000_003


@dataclass(frozen=True)
class Item:
    """One shape on the canvas: its type, colour, grid cell, size in pixels and offset in the cell."""

    shape: str
    color: str
    row: int
    col: int
    size: int = 28
    dx: int = 0
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    """An image, a question about it and its one-word answer.

    ``target`` is the ``(row, col)`` cell of the shape the question is about (None for
    counting questions); ``content`` holds the question words that pick the answer
    (the shape name or colour name; ``("many",)`` for counting questions).
    """

    image: Image.Image
    question: str
    answer: str
    target: tuple[int, int] | None
    content: tuple[str, ...]
    kind: str
    items: tuple[Item, ...]

    @property
    def target_token(self) -> int | None:
        """Index (0-15, row-major) of the vision token that covers the asked-about shape."""
        return None if self.target is None else self.target[0] * GRID + self.target[1]


def render(items: Iterable[Item]) -> Image.Image:
    """Draw ``items`` on a white 128x128 RGB canvas.

    Example:
        >>> render([Item("circle", "red", 0, 0)]).getpixel((16, 16))
        (225, 55, 50)
    """
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    for item in items:
        if item.shape not in SHAPES or item.color not in COLORS:
            raise ValueError(f"unknown shape or colour: {item}")
        if not (0 <= item.row < GRID and 0 <= item.col < GRID):
            raise ValueError(f"cell out of the {GRID}x{GRID} grid: {item}")
        fill = COLORS[item.color]
        s = item.size
        x0 = item.col * CELL + (CELL - s) // 2 + item.dx
        y0 = item.row * CELL + (CELL - s) // 2 + item.dy
        x1, y1 = x0 + s - 1, y0 + s - 1
        if not (
            item.col * CELL <= x0
            and x1 < (item.col + 1) * CELL
            and item.row * CELL <= y0
            and y1 < (item.row + 1) * CELL
        ):
            raise ValueError(f"shape does not fit in its {CELL}x{CELL} cell: {item}")
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif item.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign with arms a third of the size thick
            t = s // 3
            a = (s - t) // 2
            draw.rectangle((x0 + a, y0, x0 + a + t - 1, y1), fill=fill)
            draw.rectangle((x0, y0 + a, x1, y0 + a + t - 1), fill=fill)
    return image


def color_question(shape: str) -> str:
    """``"what color is the circle ?"``"""
    return f"what color is the {shape} ?"


def shape_question(color: str) -> str:
    """``"what is the red shape ?"``"""
    return f"what is the {color} shape ?"


COUNT_QUESTION = "how many shapes are there ?"


def all_texts() -> list[str]:
    """Every question and answer the world can produce (the tokenizer's vocabulary)."""
    texts = [color_question(s) for s in SHAPES] + [shape_question(c) for c in COLORS] + [COUNT_QUESTION]
    return texts + list(COLORS) + list(SHAPES) + list(COUNT_WORDS.values())


def sample_items(rng: np.random.Generator, counts: Sequence[int] = (2, 3, 4)) -> tuple[Item, ...]:
    """``n`` shapes (``n`` drawn from ``counts``) with distinct types, colours and cells.

    Every shape is drawn 28 pixels wide, centred in its 32-pixel cell.
    """
    n = int(counts[int(rng.integers(len(counts)))])
    if not 1 <= n <= len(SHAPES):
        raise ValueError(f"a scene holds 1 to {len(SHAPES)} shapes, not {n}")
    shapes = rng.permutation(len(SHAPES))[:n]
    colors = rng.permutation(len(COLORS))[:n]
    cells = rng.permutation(GRID * GRID)[:n]
    names = list(COLORS)
    return tuple(
        Item(SHAPES[s], names[c], int(cell) // GRID, int(cell) % GRID)
        for s, c, cell in zip(shapes, colors, cells, strict=False)
    )


def sample_scene(rng: np.random.Generator, kind: str | None = None, counts: Sequence[int] = (2, 3, 4)) -> Scene:
    """A random scene with a question of ``kind`` (``"color"``, ``"shape"``, ``"count"``; random if None).

    The scene holds ``n`` shapes, ``n`` drawn from ``counts`` (the world is 2 to 4; training
    also shows single shapes). Deterministic for a given generator state.

    Example:
        >>> import numpy as np
        >>> a = sample_scene(np.random.default_rng(7), "color")
        >>> b = sample_scene(np.random.default_rng(7), "color")
        >>> (a.question, a.answer, a.target) == (b.question, b.answer, b.target)
        True
    """
    items = sample_items(rng, counts)
    if kind is None:
        kind = QUESTION_KINDS[int(rng.choice(len(QUESTION_KINDS), p=KIND_WEIGHTS))]
    if kind == "count":
        return Scene(render(items), COUNT_QUESTION, COUNT_WORDS[len(items)], None, ("many",), kind, items)
    item = items[int(rng.integers(len(items)))]
    if kind == "color":
        question, answer, content = color_question(item.shape), item.color, (item.shape,)
    elif kind == "shape":
        question, answer, content = shape_question(item.color), item.shape, (item.color,)
    else:
        raise ValueError(f"unknown question kind {kind!r}: expected one of {QUESTION_KINDS}")
    return Scene(render(items), question, answer, (item.row, item.col), content, kind, items)


def sample_scenes(n: int, seed: int, kind: str | None = None) -> list[Scene]:
    """``n`` scenes from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, kind) for _ in range(n)]


def example_scene() -> Scene:
    """The scene of ``examples/shapes.png``: red circle (0, 1), blue square (1, 3), green triangle (2, 0)."""
    items = (
        Item("circle", "red", 0, 1),
        Item("square", "blue", 1, 3),
        Item("triangle", "green", 2, 0),
    )
    return Scene(render(items), color_question("circle"), "red", (0, 1), ("circle",), "color", items)


def build_processor():
    """The word-level ``Qwen3VLProcessor`` for this world."""
    return make_processor(words_of(all_texts()))


def messages(question: str) -> list[dict[str, Any]]:
    """The chat messages of one prompt: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_text(processor, question: str) -> str:
    """The chat-formatted prompt; the answer is the next token."""
    return processor.apply_chat_template(messages(question), add_generation_prompt=True, tokenize=False)


def encode(processor, scenes: Sequence[Scene], with_answer: bool = False):
    """Processor inputs for ``scenes`` (one batch; all prompts must have the same length).

    With ``with_answer`` the answer and ``<|im_end|>`` are appended (for training).
    """
    texts = [prompt_text(processor, s.question) + (f"{s.answer}<|im_end|>" if with_answer else "") for s in scenes]
    inputs = processor(text=texts, images=[s.image for s in scenes], return_tensors="pt")
    if not bool(inputs["attention_mask"].all()):
        raise ValueError("prompts in one batch must have the same length")
    return inputs


def answer_ids(processor, scenes: Sequence[Scene]) -> list[int]:
    """Token id of each scene's answer word."""
    return [processor.tokenizer.convert_tokens_to_ids(s.answer) for s in scenes]


def load(model_dir: str | Path = DEFAULT_MODEL_PATH, attn_implementation: str | None = None):
    """``(model, processor)`` loaded from ``model_dir`` with ``from_pretrained``, in eval mode."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(model_dir), **kwargs).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return model, processor


def predict(model, processor, scenes: Sequence[Scene], batch_size: int = 100) -> list[str]:
    """The model's greedy one-word answer for each scene."""
    import torch

    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            batch = scenes[i : i + batch_size]
            logits = model(**encode(processor, batch)).logits[:, -1]
            out += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return out


def accuracy(model, processor, scenes: Sequence[Scene]) -> float:
    """Fraction of ``scenes`` whose predicted answer is right."""
    preds = predict(model, processor, scenes)
    return sum(p == s.answer for p, s in zip(preds, scenes, strict=False)) / len(scenes)
