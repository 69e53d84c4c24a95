"""Model families: what the engine needs to know about each architecture it traces.

A family says where the language decoder is (its ``layers``, each with ``self_attn`` and
``self_attn.o_proj``), how the vision encoder runs once and is reused, which per-prompt
inputs the model takes besides token ids, and what else its decoder needs when only a
suffix of the positions is recomputed (Qwen3-VL's DeepStack features). Rotary positions
need nothing per family: the engine captures the position ids the model itself computed
(multimodal M-RoPE included) and slices them.

Adding a family is one module here, defining a :class:`Family` subclass added to
``FAMILIES``, and one entry in ``tests/test_family_table.py`` (the correctness table on a tiny
random model of the family).

Example:
    >>> from transformers import LlamaConfig
    >>> family_of(LlamaConfig()).name
    'Llama'
"""

from __future__ import annotations

from typing import Any

from vlmask.errors import VlmaskError
from vlmask.model.families._base import Family, VisionLanguage
from vlmask.model.families.llava import Llava, LlavaNext
from vlmask.model.families.qwen2_vl import Qwen2_5VL, Qwen2VL
from vlmask.model.families.qwen3_vl import Qwen3VL
from vlmask.model.families.text import Llama, Qwen3

FAMILIES: tuple[Family, ...] = (Qwen3VL(), Qwen2_5VL(), Qwen2VL(), LlavaNext(), Llava(), Qwen3(), Llama())
"""Every supported family, in the order the README lists them."""

REQUIREMENTS = (
    "an adapter (a Family in vlmask/families/) must give the decoder's path (its layers, each with self_attn "
    "taking attention_mask as a keyword argument and self_attn.o_proj), the per-prompt model inputs, and how "
    "the vision encoder's output is reused"
)


def family_of(config: Any) -> Family:
    """The family of a transformers config (its ``model_type``), or a clear error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise VlmaskError(f"model type {model_type!r} is not supported: vlmask supports {names}; {REQUIREMENTS}")


__all__ = ["FAMILIES", "Family", "VisionLanguage", "family_of"]
