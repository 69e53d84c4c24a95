"""Qwen2-VL and Qwen2.5-VL: M-RoPE over a plain decoder, no DeepStack.

Qwen2.5-VL's windowed attention lives in its vision encoder, which runs once per sweep,
so the language decoder is treated exactly as Qwen2-VL's. Its videos also carry
``second_per_grid_ts`` (seconds per frame group), which the rotary positions use.
"""

from __future__ import annotations

from vlmask.model.families._base import VisionLanguage


class Qwen2VL(VisionLanguage):
    name = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    example = "Qwen/Qwen2-VL-2B-Instruct"


class Qwen2_5VL(VisionLanguage):
    name = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    example = "Qwen/Qwen2.5-VL-3B-Instruct"
    extra_keys = (*VisionLanguage.extra_keys, "second_per_grid_ts")
