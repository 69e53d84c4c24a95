"""Pure functions that build attention masks and parse mask specifications."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmask._errors import VlmaskError

MASK_FORMATS = {"sdpa": "boolean (True = may attend)", "eager": "additive float (0 or the dtype's minimum)"}
VISION_ATTENTION = ("native", "bidirectional")


def check_attention_implementation(name: str) -> None:
    """Refuse attention implementations whose mask cannot carry a knockout.

    Example:
        >>> check_attention_implementation("flash_attention_2")
        Traceback (most recent call last):
        ...
        vlmask._errors.VlmaskError: attention implementation 'flash_attention_2' cannot block a key: ...
    """
    if name in MASK_FORMATS:
        return
    why = "it treats the mask as padding only" if "flash" in str(name) else "vlmask has no mask format for it"
    raise VlmaskError(
        f"attention implementation {name!r} cannot block a key: {why}; "
        f"load the model with attn_implementation one of {sorted(MASK_FORMATS)}"
    )


def base_allowed(
    seq_len: int, vision_ranges: Sequence[tuple[int, int]] = (), vision_attention: str = "native"
) -> torch.Tensor:
    """Boolean ``(seq_len, seq_len)`` of the edges the model itself allows (True = may attend).

    ``native`` is Qwen3-VL's own behaviour: causal over every token, image tokens
    included. ``bidirectional`` (not native; the old prototype's variant) also lets
    the tokens of each vision range ``[start, end)`` attend to each other.

    Example:
        >>> base_allowed(3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        >>> base_allowed(3, [(0, 2)], "bidirectional").int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    if vision_attention not in VISION_ATTENTION:
        raise VlmaskError(f"vision attention {vision_attention!r} is not known: expected one of {VISION_ATTENTION}")
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    if vision_attention == "bidirectional":
        for start, end in vision_ranges:
            allowed[start:end, start:end] = True
    return allowed


def attention_mask(
    allowed: torch.Tensor, implementation: str, dtype: torch.dtype, query_rows: slice | None = None
) -> torch.Tensor:
    """The 4D mask ``(batch, 1, query, key)`` in the format ``implementation`` expects.

    ``allowed`` is boolean ``(batch, seq, seq)``; ``query_rows`` keeps a slice of the
    query rows (for a pass that computes only some positions).

    Example:
        >>> allowed = base_allowed(2)[None]
        >>> attention_mask(allowed, "sdpa", torch.float32).tolist()
        [[[[True, False], [True, True]]]]
        >>> attention_mask(allowed, "eager", torch.float32)[0, 0, 0, 1].item() == torch.finfo(torch.float32).min
        True
    """
    check_attention_implementation(implementation)
    if query_rows is not None:
        allowed = allowed[:, query_rows]
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def parse_indices(spec: str, n: int, what: str = "key position") -> list[int]:
    """Positions and half-open ranges ``start:end`` separated by commas, checked against ``0..n-1``.

    Example:
        >>> parse_indices("1:3,0", 4)
        [0, 1, 2]
        >>> parse_indices("7", 4, "layer")
        Traceback (most recent call last):
        ...
        vlmask._errors.VlmaskError: layer 7 is out of range: there are 4 (0-3)
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
        vlmask._errors.VlmaskError: key position 30 is out of range: the prompt has 4 tokens (0-3)
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
