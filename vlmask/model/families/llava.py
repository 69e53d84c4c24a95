"""LLaVA-1.5 and LLaVA-NeXT: a CLIP vision tower and a projector in front of a plain causal decoder.

The processor expands each ``<image>`` into one placeholder per visual feature; the model
scatters the projected features into those positions and runs its language model (Llama,
Mistral, ...) causally over every token, image tokens included: that is the native mask
vlmask knocks out from. Rotary positions are the plain ``0..n-1``. LLaVA-1.5 has one
feature per vision patch (no merge); LLaVA-NeXT adds any-resolution tiles after the
base image and a learned image-newline feature after every row of the tiles, which sits in
an ``<image>`` position too (vlmask labels it ``special``: see :mod:`vlmask.inputs.grid`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vlmask.model.devices import execution_device
from vlmask.model.families._base import VisionLanguage


class Llava(VisionLanguage):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): ``hf.model.language_model`` over scattered image features."""

    name = "LLaVA-1.5"
    model_types = ("llava",)
    example = "llava-hf/llava-1.5-7b-hf"
    extra_keys = ()  # the vision features go in precomputed; the decoder needs nothing else
    encoder_keys: ClassVar[tuple[str, ...]] = ()  # processor outputs get_image_features takes besides pixel_values

    def reset(self, hf: Any) -> None:
        """Nothing to forget: positions are recomputed on every call."""

    def encode_vision(self, hf: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        if "pixel_values" not in inputs:
            return {}
        device = execution_device(hf.model.vision_tower, hf)
        kwargs = {k: inputs[k].to(device) for k in ("pixel_values", *self.encoder_keys)}
        with torch.inference_mode():
            out = hf.model.get_image_features(**kwargs, return_dict=True)
        return {"image": out}


class LlavaNext(Llava):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): base image + any-resolution tiles + row newlines."""

    name = "LLaVA-NeXT"
    model_types = ("llava_next",)
    example = "llava-hf/llava-v1.6-mistral-7b-hf"
    encoder_keys = ("image_sizes",)
