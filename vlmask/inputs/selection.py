"""Which prompt positions a mask specification names (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

from vlmask.errors import VlmaskError


def _ranges(spec: str, what: str, expected: str) -> list[tuple[str, int, int | None]]:
    """``(part, start, end)`` of each comma-separated part; ``end`` None for an open range ``start:``."""
    ranges: list[tuple[str, int, int | None]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if ":" in part:
                start_text, end_text = part.split(":", 1)
                start, end = int(start_text or 0), int(end_text) if end_text else None
            else:
                start, end = int(part), int(part) + 1
        except ValueError:
            raise VlmaskError(f"{what}s {spec!r} are not understood at {part!r}: expected {expected}") from None
        if end is not None and start >= end:
            raise VlmaskError(f"range {part!r} is empty: write start:end with start < end")
        if start < 0:
            raise VlmaskError(f"{what} {start} is out of range: {what}s count from 0")
        ranges.append((part, start, end))
    if not ranges:
        raise VlmaskError(f"{what}s {spec!r} select nothing")
    return ranges


def check_indices(spec: str, what: str = "key position") -> str:
    """``spec`` if it is positions and ranges written right (whatever their upper bound will be), else an error.

    Example:
        >>> check_indices("3:,1")
        '3:,1'
        >>> check_indices("5:2", "layer")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: range '5:2' is empty: write start:end with start < end
    """
    _ranges(spec, what, "numbers and ranges like 18:24,30")
    return spec


def parse_indices(
    spec: str, n: int, what: str = "key position", among: str = "", expected: str = "numbers and ranges like 18:24,30"
) -> list[int]:
    """Positions and half-open ranges ``start:end`` separated by commas, checked against ``0..n-1``.

    ``among`` says what the ``n`` are in a message (default ``there are n``), ``expected``
    what would have been understood.

    Example:
        >>> parse_indices("1:3,0", 4)
        [0, 1, 2]
        >>> parse_indices("7", 4, "layer", among="the model has 4 decoder layers")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: layer 7 is out of range: the model has 4 decoder layers (0-3)
    """
    chosen: set[int] = set()
    for _, start, end in _ranges(spec, what, expected):
        for index in range(start, n if end is None else end):
            if index >= n:
                raise VlmaskError(f"{what} {index} is out of range: {among or f'there are {n}'} (0-{n - 1})")
            chosen.add(index)
    if not chosen:
        raise VlmaskError(f"{what}s {spec!r} select nothing")
    return sorted(chosen)


def parse_mask(spec: str, kinds: Sequence[str], prompt: Sequence[int] = ()) -> list[int]:
    """The prompt positions that ``spec`` names, given each position's kind.

    ``spec`` is ``text`` (every text token, the chat template's included), ``prompt``
    (the text tokens of the user's prompt, positions ``prompt``), ``vision``, ``all``, or a
    comma-separated list of positions and half-open ranges ``start:end``.

    Example:
        >>> parse_mask("text", ["special", "text", "vision", "text"])
        [1, 3]
        >>> parse_mask("30", ["text"] * 4)
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: key position 30 is out of range: the prompt has 4 tokens (0-3)
    """
    spec = spec.strip()
    if spec == "prompt":
        if not prompt:
            raise VlmaskError("mask prompt selects nothing: the prompt's text could not be found among its tokens")
        return sorted(prompt)
    if spec in ("text", "vision"):
        positions = [i for i, kind in enumerate(kinds) if kind == spec]
        if spec == "vision" and not positions:
            raise VlmaskError("mask vision needs vision tokens, but the prompt has none: pass an image or a video")
        if not positions:
            raise VlmaskError(f"mask {spec} selects nothing: the prompt has no {spec} tokens")
        return positions
    if spec == "all":
        return list(range(len(kinds)))
    n = len(kinds)
    return parse_indices(spec, n, among=f"the prompt has {n} tokens", expected="text, prompt, vision, all, or 18:24,30")
