"""The nnsight traces: the model runs with a chosen attention mask at each decoder layer,
and the read positions' layer outputs, head outputs and logits come back.

This is the only place vlmask intervenes on the model. The edit is on what reaches each
decoder layer's self-attention (its ``attention_mask`` argument); attention itself is
the model's own code.

Two ways in:

- :func:`run_model` runs the whole model (top-level forward) and can capture what reaches
  the language decoder, including its key/value cache;
- :func:`run_decoder` runs only the decoder on captured inputs, from position ``start`` on,
  reusing the captured keys and values of the positions before it. A knockout of key ``p``
  changes nothing before ``p + 1``, so that prefix need not be recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from transformers import DynamicCache

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


@dataclass(frozen=True)
class DecoderInputs:
    """What reached the language decoder for one sequence (batch 1), as the model computed it.

    ``keys``/``values`` hold each layer's cache ``(1, kv_heads, seq, head_dim)``;
    ``deepstack`` the visual features the model adds at vision positions after the first
    decoder layers, in vision-position order.
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor
    visual_mask: torch.Tensor | None
    deepstack: list[torch.Tensor] | None
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def append_text(self, vl: Any, token: int) -> DecoderInputs:
        """These inputs followed by one generated text token (its keys and values still to compute).

        Its embedding comes from the model's own table; its M-RoPE position is the last
        position plus one on every axis, as in transformers' cached decoding.
        """
        ids = torch.tensor([[token]], device=self.embeds.device)
        embed = vl.hf.model.language_model.embed_tokens(ids).to(self.embeds.dtype)
        positions = None
        if self.position_ids is not None:
            positions = torch.cat([self.position_ids, self.position_ids[:, :, -1:] + 1], dim=-1)
        visual = None
        if self.visual_mask is not None:
            visual = torch.cat([self.visual_mask, self.visual_mask.new_zeros(1, 1)], dim=1)
        embeds = torch.cat([self.embeds, embed], dim=1)
        return DecoderInputs(embeds, positions, visual, self.deepstack, self.keys, self.values)


def repeat_encoder_outputs(outputs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Vision encoder outputs for ``batch`` copies of the same prompt (the encoder runs once)."""
    repeated = {}
    for modality, out in outputs.items():
        copy = type(out)(**dict(out.items()))
        copy.pooler_output = tuple(out.pooler_output) * batch
        copy.deepstack_features = [tuple(level) * batch for level in out.deepstack_features]
        repeated[modality] = copy
    return repeated


def _masks(vl: Any, allowed: list[torch.Tensor]) -> list[torch.Tensor]:
    """Attention masks in the implementation's format; layers sharing an ``allowed`` tensor share a mask."""
    converted: dict[int, torch.Tensor] = {}
    for a in allowed:
        if id(a) not in converted:
            converted[id(a)] = attention_mask(a, vl.attn_implementation, vl.dtype).to(vl.device)
    return [converted[id(a)] for a in allowed]


def _intervene(vl: Any, masks: list[torch.Tensor], index: torch.Tensor, residual: list | None, heads: list) -> None:
    """Inside a trace: hand each layer's self-attention its mask; save what the read positions saw.

    The lists are made before the trace (values made inside a trace survive only if saved).
    """
    for layer, mask in zip(vl.traced.model.language_model.layers, masks, strict=True):
        args, kwargs = layer.self_attn.inputs
        kwargs["attention_mask"] = mask
        layer.self_attn.inputs = (args, kwargs)
        if residual is not None:
            heads.append(layer.self_attn.o_proj.input[:, index].float().cpu().save())
            residual.append(layer.output[:, index].float().cpu().save())


def _readout(vl: Any, residual: list | None, heads: list, logits: torch.Tensor) -> Readout:
    if residual is None:
        empty = torch.empty(logits.shape[0], 0)
        return Readout(empty, empty, logits)
    return Readout(
        residual=torch.stack(residual, dim=1),
        heads=rearrange(torch.stack(heads, dim=1), "b l p (h d) -> b l p h d", h=vl.num_heads),
        logits=logits,
    )


def run_model(
    vl: Any,
    input_ids: torch.Tensor,
    extra: dict[str, torch.Tensor],
    encoder_outputs: dict[str, Any],
    allowed: list[torch.Tensor],
    read: list[int],
    internals: bool = True,
    capture: bool = False,
) -> tuple[Readout, DecoderInputs | None]:
    """Run the whole model on ``input_ids (batch, seq)`` with ``allowed[layer] (batch, seq, seq)`` masks.

    ``extra`` holds per-prompt inputs (``mm_token_type_ids``, grids) for batch 1; they are
    repeated here. With ``capture`` (batch 1), also return the decoder's inputs and cache.
    """
    batch = input_ids.shape[0]
    device = vl.device
    index = torch.tensor(read, device=device)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": capture, "logits_to_keep": index}
    if "mm_token_type_ids" in extra:
        kwargs["mm_token_type_ids"] = extra["mm_token_type_ids"].expand(batch, -1).to(device)
    for key in ("image_grid_thw", "video_grid_thw"):
        if key in extra:
            kwargs[key] = extra[key].repeat(batch, 1).to(device)
    if encoder_outputs:
        kwargs["mm_encoder_outputs"] = repeat_encoder_outputs(encoder_outputs, batch)
    masks = _masks(vl, allowed)
    residual, heads = ([], []) if internals else (None, [])
    with torch.inference_mode(), vl.traced.trace(**kwargs):
        if capture:
            decoder_kwargs = vl.traced.model.language_model.inputs[1].save()
        _intervene(vl, masks, index, residual, heads)
        output = vl.traced.output.save()
    readout = _readout(vl, residual, heads, output.logits.float().cpu())
    if not capture:
        return readout, None
    cache = output.cache
    captured = DecoderInputs(
        embeds=decoder_kwargs["inputs_embeds"],
        position_ids=decoder_kwargs["position_ids"],
        visual_mask=decoder_kwargs.get("visual_pos_masks"),
        deepstack=decoder_kwargs.get("deepstack_visual_embeds"),
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
    )
    return readout, captured


def run_decoder(
    vl: Any, dec: DecoderInputs, start: int, allowed: list[torch.Tensor], read: list[int], extend: bool = False
) -> tuple[Readout, DecoderInputs | None]:
    """Recompute positions ``start..`` of a captured sequence under ``allowed[layer] (batch, seq - start, seq)``.

    Positions before ``start`` are taken from the captured cache; ``read`` positions must be >= ``start``.
    With ``extend`` (batch 1), also return ``dec`` with the keys and values of the new positions.
    """
    batch = allowed[0].shape[0]
    device = vl.device
    cache = None
    if start or extend:
        cache = DynamicCache(config=vl.text_config)
        for i, (k, v) in enumerate(zip(dec.keys, dec.values, strict=True)):
            if start:
                cache.update(k[:, :, :start].expand(batch, -1, -1, -1), v[:, :, :start].expand(batch, -1, -1, -1), i)
    visual_mask, deepstack = None, None
    if dec.visual_mask is not None and dec.visual_mask[:, start:].any():
        visual_mask = dec.visual_mask[:, start:].expand(batch, -1)
        before = int(dec.visual_mask[:, :start].sum())
        deepstack = [level[before:].repeat(batch, 1) for level in dec.deepstack]
    index = torch.tensor([r - start for r in read], device=device)
    masks = _masks(vl, allowed)

    def decode(embeds: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        hidden = vl.hf.model.language_model(
            inputs_embeds=embeds,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
            visual_pos_masks=visual_mask,
            deepstack_visual_embeds=deepstack,
        ).last_hidden_state
        return vl.hf.lm_head(hidden[:, index])

    embeds = dec.embeds[:, start:].expand(batch, -1, -1)
    # Text-only prompts: the model numbers positions itself, counting the cached prefix.
    positions = None if dec.position_ids is None else dec.position_ids[:, :, start:].expand(-1, batch, -1)
    residual, heads = [], []
    with torch.inference_mode(), vl.traced.trace(embeds, positions, fn=decode):
        _intervene(vl, masks, index, residual, heads)
        logits = vl.traced.lm_head.output.float().cpu().save()
    readout = _readout(vl, residual, heads, logits)
    if not extend:
        return readout, None
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return readout, DecoderInputs(dec.embeds, dec.position_ids, dec.visual_mask, dec.deepstack, keys, values)
