"""What every family provides; the defaults fit a text-only causal language model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from vlmask.model.devices import execution_device


class Family:
    """A model family: where its decoder is and what its decoder takes.

    The defaults describe a text-only causal LM (``hf.model`` is the decoder, ids are
    the only input). Vision-language families override what differs.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    example: ClassVar[str] = ""  # a hub id, for the README and messages
    vision: ClassVar[bool] = False
    decoder_path: ClassVar[tuple[str, ...]] = ("model",)
    extra_keys: ClassVar[tuple[str, ...]] = ()  # processor outputs the top-level forward takes besides input_ids
    deepstack: ClassVar[bool] = False  # adds visual features to vision positions between decoder layers

    def auto_class(self) -> Any:
        """The transformers auto class that loads this family's checkpoints."""
        return AutoModelForCausalLM

    def decoder(self, root: Any) -> Any:
        """The language decoder of ``root`` (the transformers model, or nnsight's envoy of it)."""
        for name in self.decoder_path:
            root = getattr(root, name)
        return root

    def reset(self, hf: Any) -> None:
        """Forget state the model keeps between calls (before a fresh sequence)."""

    def prompt_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor outputs the top-level forward takes besides ``input_ids`` (batch 1)."""
        return {k: inputs[k] for k in self.extra_keys if k in inputs}

    def extend_inputs(self, extra: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
        """``extra`` for the prompt followed by generated text tokens, ``seq_len`` positions in all."""
        return dict(extra)

    def repeat_inputs(self, extra: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """``extra`` for ``batch`` copies of the same prompt (one entry per image or video, repeated)."""
        return {k: v.repeat(batch, *[1] * (v.ndim - 1)) for k, v in extra.items()}

    def encode_vision(self, hf: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Run the vision encoder once: what ``mm_encoder_outputs`` takes (empty without vision)."""
        return {}

    def repeat_encoder_outputs(self, outputs: dict[str, Any], batch: int) -> dict[str, Any]:
        """Encoder outputs for ``batch`` copies of the same prompt."""
        return outputs

    def captured(self, decoder_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Inputs, besides embeddings and positions, the decoder was given (kept to recompute suffixes)."""
        return {}

    def prefix(self, extra: dict[str, Any], n: int) -> dict[str, Any]:
        """``extra`` for the first ``n`` positions of the sequence."""
        return extra

    def appended(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``extra`` for the sequence followed by one more text token."""
        return extra

    def packed(
        self, extra: dict[str, Any], starts: Sequence[int], seq_len: int, removed: Sequence[Sequence[int]] = ()
    ) -> dict[str, Any]:
        """Decoder keyword arguments for a packed pass over positions ``starts[i]..seq_len-1`` of each row;
        ``removed[i]``: the vision positions of row ``i`` that get no DeepStack features (where the family has any)."""
        return {}


class VisionLanguage(Family):
    """Qwen-style vision-language models: ``hf.model.language_model``, vision features passed precomputed."""

    vision = True
    decoder_path = ("model", "language_model")
    extra_keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw")

    def auto_class(self) -> Any:
        return AutoModelForImageTextToText

    def reset(self, hf: Any) -> None:
        hf.model.rope_deltas = None  # M-RoPE offsets transformers keeps between calls

    def extend_inputs(self, extra: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
        extra = dict(extra)
        if "mm_token_type_ids" in extra:  # generated tokens are text (type 0)
            types = extra["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, seq_len - types.shape[1])], dim=1)
        return extra

    def repeat_inputs(self, extra: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        repeated = super().repeat_inputs({k: v for k, v in extra.items() if k != "mm_token_type_ids"}, batch)
        if "mm_token_type_ids" in extra:  # one row per sequence
            repeated["mm_token_type_ids"] = extra["mm_token_type_ids"].expand(batch, -1)
        return repeated

    def encode_vision(self, hf: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        device = execution_device(hf.model.visual, hf)
        outputs = {}
        with torch.inference_mode():
            if "pixel_values" in inputs:
                outputs["image"] = hf.model.get_image_features(
                    inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device), return_dict=True
                )
            if "pixel_values_videos" in inputs:
                outputs["video"] = hf.model.get_video_features(
                    inputs["pixel_values_videos"].to(device), inputs["video_grid_thw"].to(device), return_dict=True
                )
        return outputs

    def repeat_encoder_outputs(self, outputs: dict[str, Any], batch: int) -> dict[str, Any]:
        repeated = {}
        for modality, out in outputs.items():
            copy = type(out)(**dict(out.items()))
            copy.pooler_output = tuple(out.pooler_output) * batch
            repeated[modality] = copy
        return repeated
