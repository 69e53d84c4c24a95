"""One nnsight trace: the model runs with a chosen attention mask at each decoder layer,
and the measured positions' layer outputs, head outputs and logits come back.

This is the only place vlmask intervenes on the model. The edit is on what reaches each
decoder layer's self-attention (its ``attention_mask`` argument); attention itself is
the model's own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

from vlmask._masks import attention_mask


@dataclass(frozen=True)
class Readout:
    """What a pass measured at the read positions (float32, on CPU).

    Shapes: ``residual (batch, layer, pos, hidden)``, ``heads (batch, layer, pos, head, head_dim)``,
    ``logits (batch, pos, vocab)``.
    """

    residual: torch.Tensor
    heads: torch.Tensor
    logits: torch.Tensor


def repeat_encoder_outputs(outputs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Vision encoder outputs for ``batch`` copies of the same prompt (the encoder runs once)."""
    repeated = {}
    for modality, out in outputs.items():
        copy = type(out)(**{k: v for k, v in out.items()})
        copy.pooler_output = tuple(out.pooler_output) * batch
        copy.deepstack_features = [tuple(level) * batch for level in out.deepstack_features]
        repeated[modality] = copy
    return repeated


def run(
    vl: Any,
    input_ids: torch.Tensor,
    extra: dict[str, torch.Tensor],
    encoder_outputs: dict[str, Any],
    allowed: list[torch.Tensor],
    read: list[int],
    read_internals: bool = True,
) -> Readout:
    """Run ``input_ids (batch, seq)`` with ``allowed[layer] (batch, seq, seq)`` masks.

    ``extra`` holds per-prompt inputs (``mm_token_type_ids``, ``image_grid_thw``) for
    batch 1; they are repeated here. Only ``read`` positions are kept.
    """
    batch = input_ids.shape[0]
    device, dtype = vl.device, vl.dtype
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
    if "mm_token_type_ids" in extra:
        kwargs["mm_token_type_ids"] = extra["mm_token_type_ids"].expand(batch, -1).to(device)
    for key in ("image_grid_thw", "video_grid_thw"):
        if key in extra:
            kwargs[key] = extra[key].repeat(batch, 1).to(device)
    if encoder_outputs:
        kwargs["mm_encoder_outputs"] = repeat_encoder_outputs(encoder_outputs, batch)
    masks = [attention_mask(a, vl.attn_implementation, dtype).to(device) for a in allowed]
    index = torch.tensor(read, device=device)
    layers = vl.traced.model.language_model.layers
    residual, heads = [], []
    with torch.inference_mode(), vl.traced.trace(**kwargs):
        for layer, mask in zip(layers, masks, strict=True):
            args, kw = layer.self_attn.inputs
            kw["attention_mask"] = mask
            layer.self_attn.inputs = (args, kw)
            if read_internals:
                heads.append(layer.self_attn.o_proj.input[:, index].float().cpu().save())
                residual.append(layer.output[:, index].float().cpu().save())
        logits = vl.traced.output.logits[:, index].float().cpu().save()
    if not read_internals:
        empty = torch.empty(batch, 0)
        return Readout(empty, empty, logits)
    return Readout(
        residual=torch.stack(residual, dim=1),
        heads=rearrange(torch.stack(heads, dim=1), "b l p (h d) -> b l p h d", h=vl.num_heads),
        logits=logits,
    )
