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
- :func:`run_decoder` runs only the decoder on captured inputs: each knockout recomputes
  only the positions it changes (a knockout of key ``p`` changes nothing before ``p + 1``),
  on the captured keys and values of the positions before them, and all the knockouts'
  recomputed positions are packed into one sequence whose attention mask keeps them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from transformers import DynamicCache

from interventions import At
from vlmask.model.attention import attention_mask


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

    ``position_ids`` are the model's own (M-RoPE rows for vision-language models; None when
    the decoder numbers positions itself); ``keys``/``values`` hold each layer's cache
    ``(1, kv_heads, seq, head_dim)``; ``extra`` what else the family's decoder was given
    (Qwen3-VL: the vision positions and DeepStack features).
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor | None
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    extra: dict[str, Any]

    def prefix(self, vl: Any, n: int) -> DecoderInputs:
        """These inputs cut to the first ``n`` positions."""
        return DecoderInputs(
            self.embeds[:, :n],
            None if self.position_ids is None else self.position_ids[..., :n],
            [k[:, :, :n] for k in self.keys],
            [v[:, :, :n] for v in self.values],
            vl.family.prefix(self.extra, n),
        )

    def append_text(self, vl: Any, token: int | Sequence[int]) -> DecoderInputs:
        """These inputs followed by one generated text token per row (its keys and values still to compute).

        Its embedding comes from the model's own table; its position is the last position
        plus one on every rotary axis, as in transformers' cached decoding.
        """
        tokens = [token] if isinstance(token, int) else list(token)
        ids = torch.tensor(tokens, device=self.embeds.device)[:, None]
        embed = vl.decoder.embed_tokens(ids).to(self.embeds.dtype)
        positions = None
        if self.position_ids is not None:
            positions = torch.cat([self.position_ids, self.position_ids[..., -1:] + 1], dim=-1)
        embeds = torch.cat([self.embeds, embed], dim=1)
        return DecoderInputs(embeds, positions, self.keys, self.values, vl.family.appended(self.extra))

    @staticmethod
    def stacked(rows: Sequence[DecoderInputs]) -> DecoderInputs:
        """Sequences of equal length (one row each, same prompt) as one batch, one row each."""
        positions = None if rows[0].position_ids is None else torch.cat([r.position_ids for r in rows], dim=-2)
        return DecoderInputs(
            torch.cat([r.embeds for r in rows]),
            positions,
            [torch.cat(layer) for layer in zip(*(r.keys for r in rows), strict=True)],
            [torch.cat(layer) for layer in zip(*(r.values for r in rows), strict=True)],
            rows[0].extra,
        )


@dataclass(frozen=True)
class Plan:
    """What one pass does to the model.

    ``allowed[layer] (batch, query, key)`` are the attention edges left at each layer, for
    queries ``start..``; ``rows[i]`` is row ``i``'s intervention, asked for its activation
    edits; ``head_means (layer, head, head_dim)`` the unmodified model's mean head outputs,
    where mean ablation needs them.

    A pass over the whole model gives each row its own batch row. A decoder pass is
    *packed* (``starts`` given): row ``i`` computes only positions ``starts[i]..`` and the
    rows' positions are laid end to end in one sequence, so no position is computed that a
    row does not need.
    """

    allowed: list[torch.Tensor]
    rows: tuple[Any, ...]
    start: int = 0
    head_means: torch.Tensor | None = None
    starts: tuple[int, ...] = ()

    @property
    def seq_len(self) -> int:
        return self.allowed[0].shape[-1]

    @property
    def pieces(self) -> list[tuple[int, slice, int]]:
        """Per row: its batch row, its slice of that row's computed positions, and its first position."""
        if not self.starts:
            return [(i, slice(None), self.start) for i in range(len(self.rows))]
        out, offset = [], 0
        for first in self.starts:
            out.append((0, slice(offset, offset + self.seq_len - first), first))
            offset += self.seq_len - first
        return out

    def editing(self, layer: int, hook: str) -> list[tuple[int, Any]]:
        """``(row, intervention)`` for the rows that edit ``hook`` at ``layer``."""
        return [(row, iv) for row, iv in enumerate(self.rows) if hook in iv.hooks(layer)]

    def edit_heads(self, layer: int, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """The ``o_proj`` input ``x (batch, pos, head * head_dim)`` after each row's ``edit_heads``."""
        means = None if self.head_means is None else self.head_means[layer]
        out = x.clone()
        pieces = self.pieces
        for row, iv in self.editing(layer, "heads"):
            b, span, first = pieces[row]
            heads = x[b, span].unflatten(-1, (num_heads, -1))
            out[b, span] = iv.edit_heads(heads, At(layer, self.seq_len, first, means)).flatten(-2)
        return out

    def edit_residual(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """The layer output ``y (batch, pos, hidden)`` after each row's ``edit_residual``."""
        out = y.clone()
        pieces = self.pieces
        for row, iv in self.editing(layer, "residual"):
            b, span, first = pieces[row]
            out[b, span] = iv.edit_residual(y[b, span], At(layer, self.seq_len, first))
        return out


def packed_allowed(allowed: torch.Tensor, start: int, starts: Sequence[int], cached: int) -> torch.Tensor:
    """Edges ``(1, packed, cached + packed)`` of a packed pass, from each row's ``allowed (row, seq - start, seq)``.

    Keys are the ``cached`` clean positions, then the packed positions. Row ``i``'s query
    at position ``q`` sees clean keys before ``starts[i]`` and its own recomputed keys
    ``starts[i]..q``, as ``allowed`` says; never another row's.

    Example:
        >>> allowed = torch.ones(2, 2, 3, dtype=torch.bool).tril(1)  # queries 1-2 of 3 positions, causal
        >>> packed_allowed(allowed, 1, [1, 2], cached=3).int().tolist()
        [[[1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]]]
    """
    seq = allowed.shape[-1]
    total = sum(seq - first for first in starts)
    out = torch.zeros(total, cached + total, dtype=torch.bool)
    offset = 0
    for row, first in enumerate(starts):
        n = seq - first
        edges = allowed[row, first - start :]
        out[offset : offset + n, :first] = edges[:, :first]
        out[offset : offset + n, cached + offset : cached + offset + n] = edges[:, first:]
        offset += n
    return out[None]


def _masks(vl: Any, allowed: list[torch.Tensor], pack: Any = None) -> list[torch.Tensor]:
    """Attention masks in the implementation's format; layers sharing an ``allowed`` tensor share a mask.

    ``pack``, if given, turns each ``allowed`` into its packed form first.
    """
    converted: dict[int, torch.Tensor] = {}
    for a in allowed:
        if id(a) not in converted:
            edges = a if pack is None else pack(a)
            converted[id(a)] = attention_mask(edges, vl.attn_implementation, vl.dtype).to(vl.device)
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
    for i, (layer, mask) in enumerate(zip(vl.family.decoder(vl.traced).layers, masks, strict=True)):
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


def model_kwargs(
    vl: Any, input_ids: torch.Tensor, extra: dict[str, torch.Tensor], encoder_outputs: dict[str, Any], index, capture
) -> dict[str, Any]:
    """The top-level forward's arguments for ``input_ids (batch, seq)``, the per-prompt ``extra`` repeated."""
    batch = input_ids.shape[0]
    device = vl.device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": capture, "logits_to_keep": index}
    for key, value in extra.items():
        if key == "mm_token_type_ids":  # one row per sequence
            kwargs[key] = value.expand(batch, -1).to(device)
        else:  # one entry per image or video
            kwargs[key] = value.repeat(batch, *[1] * (value.ndim - 1)).to(device)
    if encoder_outputs:
        kwargs["mm_encoder_outputs"] = vl.family.repeat_encoder_outputs(encoder_outputs, batch)
    return kwargs


def captured(vl: Any, decoder_kwargs: dict[str, Any], cache: Any) -> DecoderInputs:
    """The decoder's inputs (its forward's keyword arguments) and the cache the pass filled."""
    embeds = decoder_kwargs.get("inputs_embeds")
    if embeds is None:  # a text-only model hands its decoder token ids
        with torch.inference_mode():
            embeds = vl.decoder.embed_tokens(decoder_kwargs["input_ids"])
    return DecoderInputs(
        embeds=embeds,
        position_ids=decoder_kwargs.get("position_ids"),
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        extra=vl.family.captured(decoder_kwargs),
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
    index = torch.tensor(read, device=vl.device)
    kwargs = model_kwargs(vl, input_ids, extra, encoder_outputs, index, capture)
    masks = _masks(vl, plan.allowed)
    residual, heads = ([], []) if internals else (None, [])
    with torch.inference_mode(), vl.traced.trace(**kwargs):
        if capture:
            decoder_kwargs = vl.family.decoder(vl.traced).inputs[1].save()
        _intervene(vl, plan, masks, index, residual, heads, means)
        output = vl.traced.output.save()
    readout = _readout(vl, residual, heads, output.logits.float().cpu())
    return readout, captured(vl, decoder_kwargs, output.cache) if capture else None


@dataclass(frozen=True)
class DecoderCall:
    """A decoder pass (packed or batched, see :func:`decoder_call`): ``decode(embeds, positions)``
    gives the logits at ``index`` (the read positions among the computed ones) and appends
    the computed keys and values to ``cache`` (which starts with the captured ones);
    ``masks`` go to self-attention."""

    decode: Any
    embeds: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    cache: Any
    masks: list[torch.Tensor]


def _packed(x: torch.Tensor, starts: Sequence[int], dim: int) -> torch.Tensor:
    """``x`` at positions ``first..`` for each of ``starts``, laid end to end along ``dim``."""
    return torch.cat([x.narrow(dim, first, x.shape[dim] - first) for first in starts], dim=dim)


def decoder_call(vl: Any, dec: DecoderInputs, plan: Plan, read: list[int]) -> DecoderCall:
    """Set up the pass of :func:`run_decoder`: cache, inputs, positions, family extras, masks.

    Packed (``plan.starts``): ``dec`` is one sequence and each row recomputes its own
    positions, laid end to end. Batched (no ``starts``): ``dec`` holds one sequence per
    row, each cached up to ``plan.start``, and every row computes positions ``start..``.
    """
    packed = bool(plan.starts)
    starts = plan.starts or (plan.start,)
    seq = plan.seq_len
    cached = dec.keys[0].shape[2]
    if min(starts) > cached or (not packed and plan.start != cached):
        raise ValueError(f"a pass from position {min(starts)} does not fit the {cached} cached positions")
    cache = DynamicCache(config=vl.text_config)
    for i, (k, v) in enumerate(zip(dec.keys, dec.values, strict=True)):
        cache.update(k, v, i)
    embeds = _packed(dec.embeds[:, :seq], starts, 1)
    if dec.position_ids is None:  # the decoder numbers positions itself: every rotary axis is the position
        positions = _packed(torch.arange(seq, device=embeds.device)[None], starts, 1).expand(embeds.shape[0], -1)
    else:
        positions = _packed(dec.position_ids[..., :seq], starts, -1)
    extra = vl.family.packed(dec.extra, starts, seq)
    if packed:  # each row's reads, at its own offset in the pack
        offsets = [(piece.start + r - first) for _, piece, first in plan.pieces for r in read]
    else:
        offsets = [r - plan.start for r in read]
    index = torch.tensor(offsets, device=vl.device)

    def decode(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = vl.decoder(
            inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, **extra
        ).last_hidden_state
        return vl.hf.lm_head(hidden[:, index])

    pack = (lambda a: packed_allowed(a, plan.start, starts, cached)) if packed else None
    return DecoderCall(decode, embeds, positions, index, cache, _masks(vl, plan.allowed, pack))


def unpacked(readout: Readout, rows: int) -> Readout:
    """A packed pass's readout (batch 1, rows' reads end to end) as one batch row per row."""
    if readout.residual.numel():
        residual = rearrange(readout.residual, "1 l (k p) d -> k l p d", k=rows)
        heads = rearrange(readout.heads, "1 l (k p) h d -> k l p h d", k=rows)
    else:
        residual = heads = torch.empty(rows, 0)
    return Readout(residual, heads, rearrange(readout.logits, "1 (k p) v -> k p v", k=rows))


def decoder_readout(vl: Any, plan: Plan, residual: list, heads: list, logits: torch.Tensor) -> Readout:
    """What a decoder pass read, one batch row per row of ``plan`` (a packed pass's reads unpacked)."""
    readout = _readout(vl, residual, heads, logits)
    return unpacked(readout, len(plan.rows)) if plan.starts else readout


def extended(dec: DecoderInputs, cache: Any, start: int) -> DecoderInputs:
    """``dec`` with the keys and values of a one-row pass that recomputed positions ``start..``.

    The row's own cache: the clean keys before ``start``, then the ones the pass appended
    after the ``dec.keys`` it started from.
    """
    cached = dec.keys[0].shape[2]
    if start == cached:  # the pass started right after the cache: the cache is the row's own already
        keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    else:
        keys = [torch.cat([layer.keys[:, :, :start], layer.keys[:, :, cached:]], dim=2) for layer in cache.layers]
        values = [torch.cat([layer.values[:, :, :start], layer.values[:, :, cached:]], 2) for layer in cache.layers]
    return DecoderInputs(dec.embeds, dec.position_ids, keys, values, dec.extra)


def run_decoder(
    vl: Any, dec: DecoderInputs, plan: Plan, read: list[int], extend: bool = False
) -> tuple[Readout, DecoderInputs | None]:
    """Recompute, for each row ``i``, positions ``plan.starts[i]..`` of a captured sequence, in one packed pass
    (or, without ``starts``, positions ``plan.start..`` of each row's own sequence: see :func:`decoder_call`).

    Positions before a row's start are the captured keys and values; ``read`` positions
    must be >= every start. With ``extend`` (one packed row, or a batch), also return
    ``dec`` with the rows' own keys and values: as captured before the start, recomputed
    from there on.
    """
    call = decoder_call(vl, dec, plan, read)
    residual, heads = [], []
    with torch.inference_mode(), vl.traced.trace(call.embeds, call.positions, fn=call.decode):
        _intervene(vl, plan, call.masks, call.index, residual, heads)
        logits = vl.traced.lm_head.output.float().cpu().save()
    return decoder_readout(vl, plan, residual, heads, logits), extended(dec, call.cache, plan.start) if extend else None
