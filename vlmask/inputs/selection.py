"""Which prompt positions a mask specification names (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

from vlmask.errors import VlmaskError


def parse_indices(spec: str, n: int, what: str = "key position") -> list[int]:
    """Positions and half-open ranges ``start:end`` separated by commas, checked against ``0..n-1``.

    Example:
        >>> parse_indices("1:3,0", 4)
        [0, 1, 2]
        >>> parse_indices("7", 4, "layer")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: layer 7 is out of range: there are 4 (0-3)
    """
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if ":" in part:
                start_text, end_text = part.split(":", 1)
                start, end = int(start_text or 0), int(end_text or n)
            else:
                start, end = int(part), int(part) + 1
        except ValueError:
            raise VlmaskError(
                f"{what}s {spec!r} are not understood at {part!r}: expected numbers and ranges like 18:24,30"
            ) from None
        if start >= end:
            raise VlmaskError(f"range {part!r} is empty: write start:end with start < end")
        for index in range(start, end):
            if not 0 <= index < n:
                raise VlmaskError(f"{what} {index} is out of range: there are {n} ({0}-{n - 1})")
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
            raise VlmaskError("--mask prompt selects nothing: the prompt's text could not be found among its tokens")
        return sorted(prompt)
    if spec in ("text", "vision"):
        positions = [i for i, kind in enumerate(kinds) if kind == spec]
        if spec == "vision" and not positions:
            raise VlmaskError("--mask vision needs vision tokens, but the prompt has none: pass an image or a video")
        if not positions:
            raise VlmaskError(f"--mask {spec} selects nothing: the prompt has no {spec} tokens")
        return positions
    if spec == "all":
        return list(range(len(kinds)))
    try:
        return parse_indices(spec, len(kinds))
    except VlmaskError as err:
        message = str(err).replace(f"there are {len(kinds)} ", f"the prompt has {len(kinds)} tokens ")
        raise VlmaskError(
            message + ("" if "out of range" in message else "; or use text, prompt, vision, all")
        ) from None
