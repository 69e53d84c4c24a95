"""Qwen3-VL: M-RoPE, and DeepStack (visual features added to the first decoder layers' outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmask.model.families._base import VisionLanguage


class Qwen3VL(VisionLanguage):
    """The decoder takes ``visual_pos_masks (batch, seq)`` and ``deepstack_visual_embeds``, one
    ``(vision positions, hidden)`` tensor per DeepStack level, in vision-position order."""

    name = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    example = "Qwen/Qwen3-VL-2B-Instruct"

    def repeat_encoder_outputs(self, outputs: dict[str, Any], batch: int) -> dict[str, Any]:
        repeated = super().repeat_encoder_outputs(outputs, batch)
        for modality, out in outputs.items():
            repeated[modality].deepstack_features = [tuple(level) * batch for level in out.deepstack_features]
        return repeated

    def captured(self, decoder_kwargs: dict[str, Any]) -> dict[str, Any]:
        if decoder_kwargs.get("visual_pos_masks") is None:
            return {}
        return {"visual": decoder_kwargs["visual_pos_masks"], "deepstack": decoder_kwargs["deepstack_visual_embeds"]}

    def prefix(self, extra: dict[str, Any], n: int) -> dict[str, Any]:
        # DeepStack features stay whole: positions past the prompt are text, so none is cut off
        return {**extra, "visual": extra["visual"][:, :n]} if extra else extra

    def appended(self, extra: dict[str, Any]) -> dict[str, Any]:
        if not extra:
            return extra
        return {**extra, "visual": torch.cat([extra["visual"], extra["visual"].new_zeros(1, 1)], dim=1)}

    def packed(self, extra: dict[str, Any], starts: Sequence[int], seq_len: int) -> dict[str, Any]:
        if not extra:
            return {}
        visual = extra["visual"][:, :seq_len]
        packed = torch.cat([visual[:, first:] for first in starts], dim=1)
        if not packed.any():
            return {}
        before = [int(visual[0, :first].sum()) for first in starts]
        deepstack = [torch.cat([level[b:] for b in before]) for level in extra["deepstack"]]
        return {"visual_pos_masks": packed, "deepstack_visual_embeds": deepstack}
