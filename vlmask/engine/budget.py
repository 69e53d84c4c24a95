"""What a sweep will cost, told before it starts: the prompt's length against the model's, and large work.

A prompt (with its continuation) longer than the model's positions is refused. Work above
:data:`LARGE_WORK` positions to recompute is announced on the ``vlmask`` log (a warning) with
its number of knockouts and an estimated time, from one timed clean forward pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from interventions import ModelShape
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel

log = logging.getLogger(__name__)

LARGE_WORK = 100_000
"""Positions to recompute (over every knockout) above which a sweep announces its size and estimated time."""


def max_positions(vl: VLModel) -> int | None:
    """The most positions the model's decoder takes (``max_position_embeddings``), None where it states none.

    Example:
        >>> max_positions(vl)
        4096
    """
    value = getattr(vl.text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_length(vl: VLModel, prompt_len: int, num_tokens: int) -> None:
    """Refuse a prompt, or a continuation, that would run past the model's positions.

    The teacher-forced sequence is the prompt and ``num_tokens - 1`` generated tokens.

    Example:
        >>> check_length(vl, 20, 5000)
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: num_tokens 5000 is too many: the prompt has 20 tokens ..., so at most 4077
    """
    limit = max_positions(vl)
    if limit is None:
        return
    if prompt_len > limit:
        raise VlmaskError(
            f"the prompt is {prompt_len} tokens long (images and template included), but the model takes at most"
            f" {limit} positions: shorten it, or use fewer or smaller images",
            option="prompt",
        )
    if prompt_len + num_tokens - 1 > limit:
        raise VlmaskError(
            f"num_tokens {num_tokens} is too many: the prompt has {prompt_len} tokens and the model takes {limit}"
            f" positions, so at most {limit - prompt_len + 1}",
            option="num_tokens",
        )


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def announce(vl: VLModel, inputs: dict[str, Any], knockouts: Sequence[Any], num_tokens: int) -> float | None:
    """Warn of large work before it starts; return the estimated seconds (None for small work, not timed).

    Each knockout recomputes the positions from the first one it changes to the end of the
    prompt and continuation; the time per position is read off one clean forward pass.

    Example:
        >>> from interventions import BlockKeys
        >>> from vlmask.inputs.prompt import build_prompt
        >>> built = build_prompt(vl.processor, "what color is the circle ?")
        >>> announce(vl, built.inputs, [BlockKeys((0,))], num_tokens=1) is None  # small: nothing said
        True
    """
    prompt_len = inputs["input_ids"].shape[1]
    seq_len, shape = prompt_len + num_tokens - 1, ModelShape(vl.num_layers)
    positions = sum(seq_len - min(iv.first_changed(seq_len, shape), prompt_len - 1) for iv in knockouts)
    if positions <= LARGE_WORK:
        return None
    started = time.perf_counter()
    with torch.inference_mode():
        vl.hf(**{k: v.to(vl.device) if hasattr(v, "to") else v for k, v in inputs.items()})
    per_position = (time.perf_counter() - started) / prompt_len
    seconds = per_position * positions
    log.warning(
        "large sweep: %d knockouts x %d steps, %d positions to recompute; estimated %s (%.2f ms per position,"
        " timed on one clean pass)",
        len(knockouts),
        num_tokens,
        positions,
        _duration(seconds),
        per_position * 1e3,
    )
    return seconds
