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
    deepstack = True

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

    def packed(
        self, extra: dict[str, Any], starts: Sequence[int], seq_len: int, removed: Sequence[Sequence[int]] = ()
    ) -> dict[str, Any]:
        if not extra:
            return {}
        visual = extra["visual"][:, :seq_len]
        packed = torch.cat([visual[:, first:] for first in starts], dim=1)
        if not packed.any():
            return {}
        before = [int(visual[0, :first].sum()) for first in starts]
        deepstack = [torch.cat([level[b:] for b in before]) for level in extra["deepstack"]]
        if any(removed):
            keep = _kept(visual[0], starts, before, removed).to(deepstack[0].device)[:, None]
            deepstack = [torch.where(keep, level, torch.zeros_like(level)) for level in deepstack]
        return {"visual_pos_masks": packed, "deepstack_visual_embeds": deepstack}


def _kept(
    visual: torch.Tensor, starts: Sequence[int], before: Sequence[int], removed: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Which packed DeepStack rows are added: False at each row's ``removed`` vision positions.

    ``visual (seq,)`` marks the vision positions; row ``i``'s DeepStack rows are those of its
    vision positions from ``starts[i]`` (``before[i]`` vision positions precede it), laid end to end.
    """
    rank = visual.long().cumsum(0) - 1  # each vision position's index among the vision positions
    total = int(visual.sum())
    keep = torch.ones(sum(total - b for b in before), dtype=torch.bool)
    offset = 0
    for first, b, gone in zip(starts, before, removed, strict=True):
        for p in gone:
            if p < first:
                raise ValueError(f"vision position {p} loses its DeepStack features but its row starts at {first}")
            if visual[p]:
                keep[offset + int(rank[p]) - b] = False
        offset += total - b
    return keep
