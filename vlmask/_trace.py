"""The nnsight traces: the model runs with a chosen attention mask at each decoder layer,
and the read positions' layer outputs, head outputs and logits come back.

This is the only place vlmask intervenes on the model. At each decoder layer, in the order
the model runs them, it edits: what reaches self-attention (its ``attention_mask``
argument), the ``o_proj`` input (each head's output), and the layer's output (the residual
stream) — the hook points of the ``interventions`` contract. Attention itself is the
model's own code.

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


@dataclass(frozen=True)
class Plan:
    """What one pass does to the model.

    ``allowed[layer] (batch, query, key)`` are the attention edges left at each layer;
    ``rows[i]`` is batch row ``i``'s intervention, asked for its activation edits;
    ``start`` is the absolute position of the first computed query; ``head_means
    (layer, head, head_dim)`` the unmodified model's mean head outputs, where mean
    ablation needs them.
    """

    allowed: list[torch.Tensor]
    rows: tuple[Any, ...]
    start: int = 0
    head_means: torch.Tensor | None = None

    def editing(self, layer: int, hook: str) -> list[tuple[int, Any]]:
        """``(row, intervention)`` for the rows that edit ``hook`` at ``layer``."""
        return [(row, iv) for row, iv in enumerate(self.rows) if hook in iv.hooks(layer)]

    def edit_heads(self, layer: int, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """The ``o_proj`` input ``x (batch, pos, head * head_dim)`` after each row's ``edit_heads``."""
        means = None if self.head_means is None else self.head_means[layer]
        out = x.clone()
        for row, iv in self.editing(layer, "heads"):
            heads = x[row].unflatten(-1, (num_heads, -1))
            out[row] = iv.edit_heads(layer, heads, self.start, means).flatten(-2)
        return out

    def edit_residual(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """The layer output ``y (batch, pos, hidden)`` after each row's ``edit_residual``."""
        out = y.clone()
        for row, iv in self.editing(layer, "residual"):
            out[row] = iv.edit_residual(layer, y[row], self.start)
        return out


def _masks(vl: Any, allowed: list[torch.Tensor]) -> list[torch.Tensor]:
    """Attention masks in the implementation's format; layers sharing an ``allowed`` tensor share a mask."""
    converted: dict[int, torch.Tensor] = {}
    for a in allowed:
        if id(a) not in converted:
            converted[id(a)] = attention_mask(a, vl.attn_implementation, vl.dtype).to(vl.device)
    return [converted[id(a)] for a in allowed]


def _intervene(
    vl: Any,
    plan: Plan,
    masks: list[torch.Tensor],
    index: torch.Tensor,
    residual: list | None,
    heads: list,
    means: list | None = None,
) -> None:
    """Inside a trace, at each layer in execution order: hand self-attention its mask, edit the
    head outputs (the ``o_proj`` input) and the layer output for the rows whose interventions
    ask, and save what the read positions saw (after the edits).

    ``means``, if given, collects each layer's head outputs averaged over every computed
    position, in float32 (what mean ablation uses, taken from an unmodified run).
    The masks and lists are made before the trace (values made inside a trace survive only if saved).
    """
    for i, (layer, mask) in enumerate(zip(vl.traced.model.language_model.layers, masks, strict=True)):
        args, kwargs = layer.self_attn.inputs
        kwargs["attention_mask"] = mask
        layer.self_attn.inputs = (args, kwargs)
        edit = bool(plan.editing(i, "heads"))
        if edit or residual is not None or means is not None:
            x = layer.self_attn.o_proj.input
            if edit:
                x = plan.edit_heads(i, x, vl.num_heads)
                layer.self_attn.o_proj.input = x
            if residual is not None:
                heads.append(x[:, index].float().cpu().save())
            if means is not None:
                means.append(x.float().mean(1).cpu().save())
        edit = bool(plan.editing(i, "residual"))
        if edit or residual is not None:
            y = layer.output
            if edit:
                y = plan.edit_residual(i, y)
                layer.output = y
            if residual is not None:
                residual.append(y[:, index].float().cpu().save())


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
    plan: Plan,
    read: list[int],
    internals: bool = True,
    capture: bool = False,
    means: list | None = None,
) -> tuple[Readout, DecoderInputs | None]:
    """Run the whole model on ``input_ids (batch, seq)`` under ``plan`` (``allowed[layer] (batch, seq, seq)``).

    ``extra`` holds per-prompt inputs (``mm_token_type_ids``, grids) for batch 1; they are
    repeated here. With ``capture`` (batch 1), also return the decoder's inputs and cache.
    ``means``, a list, receives each layer's head outputs averaged over all positions.
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
    masks = _masks(vl, plan.allowed)
    residual, heads = ([], []) if internals else (None, [])
    with torch.inference_mode(), vl.traced.trace(**kwargs):
        if capture:
            decoder_kwargs = vl.traced.model.language_model.inputs[1].save()
        _intervene(vl, plan, masks, index, residual, heads, means)
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
    vl: Any, dec: DecoderInputs, plan: Plan, read: list[int], extend: bool = False
) -> tuple[Readout, DecoderInputs | None]:
    """Recompute positions ``plan.start..`` of a captured sequence (``allowed[layer] (batch, seq - start, seq)``).

    Positions before ``start`` are taken from the captured cache; ``read`` positions must be >= ``start``.
    With ``extend`` (batch 1), also return ``dec`` with the keys and values of the new positions.
    """
    start = plan.start
    batch = plan.allowed[0].shape[0]
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
    masks = _masks(vl, plan.allowed)

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
        _intervene(vl, plan, masks, index, residual, heads)
        logits = vl.traced.lm_head.output.float().cpu().save()
    readout = _readout(vl, residual, heads, logits)
    if not extend:
        return readout, None
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return readout, DecoderInputs(dec.embeds, dec.position_ids, dec.visual_mask, dec.deepstack, keys, values)
