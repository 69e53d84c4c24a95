"""Text-only causal language models with the standard attention interface.

``hf.model.layers[i].self_attn`` receives ``attention_mask`` as a keyword argument and
uses a 4D mask as given (boolean for sdpa, additive for eager); nothing else is needed.
"""

from __future__ import annotations

from vlmask.model.families._base import Family


class Qwen3(Family):
    name = "Qwen3"
    model_types = ("qwen3",)
    example = "Qwen/Qwen3-0.6B"


class Llama(Family):
    name = "Llama"
    model_types = ("llama",)
    example = "meta-llama/Llama-3.2-1B-Instruct"
