"""The knockout sweep: one clean pass, then every knockout in batches, metrics streamed out.

What makes it fast, without changing any number:

- the vision encoder runs once per sweep and its output is reused by every pass;
- teacher forcing makes the ``step`` dimension cheap: the clean continuation is generated
  first, then prompt + continuation is run once, and step ``s`` is read at position
  ``L-1+s`` (causality makes it equal to the last position of the sequence at step ``s``);
- a knockout of key ``p`` changes nothing before position ``p + 1``: knockouts run on the
  decoder only, from the first position their batch changes, on the clean pass's keys and
  values for the prefix;
- knockouts run in batches, and only the metrics are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from tqdm.auto import tqdm

from interventions import BlockKeys
from vlmask import _trace
from vlmask._errors import VlmaskError
from vlmask._inputs import Prompt, build_prompt
from vlmask._masks import base_allowed, parse_mask
from vlmask._memory import choose_batch_size, parse_size
from vlmask._metrics import logit_metrics, vector_distances
from vlmask._model import VLModel
from vlmask._results import SweepRecord, to_dataset
from vlmask._units import group_units

log = logging.getLogger(__name__)

NOTHING = BlockKeys(())


def first_changed(intervention: BlockKeys, seq_len: int, num_layers: int) -> int:
    """The first query position whose attention ``intervention`` changes (``seq_len`` if none)."""
    rows = [
        intervention.blocked_edges(seq_len, layer).any(1) for layer in range(num_layers) if intervention.acts_on(layer)
    ]
    hit = torch.stack(rows).any(0).nonzero() if rows else torch.empty(0)
    return int(hit[0]) if len(hit) else seq_len


@dataclass(frozen=True)
class Context:
    """What every pass over one prompt shares."""

    vl: VLModel
    extra: dict[str, torch.Tensor]
    encoder: dict[str, Any]
    base: torch.Tensor  # (seq, seq) edges the unmodified model allows

    def allowed(self, interventions: Sequence[BlockKeys], seq_len: int, start: int = 0) -> list[torch.Tensor]:
        """Per layer, the ``(batch, seq_len - start, seq_len)`` edges left once each intervention cut its own.

        Layers where the same interventions act share one tensor (an intervention cuts the
        same edges at every layer it acts on), so memory does not grow with depth.
        """
        base = self.base[start:seq_len, :seq_len]
        shared: dict[tuple[bool, ...], torch.Tensor] = {}
        per_layer = []
        for layer in range(self.vl.num_layers):
            acting = tuple(iv.acts_on(layer) for iv in interventions)
            if acting not in shared:
                rows = [
                    base & ~iv.blocked_edges(seq_len, layer)[start:] if on else base
                    for iv, on in zip(interventions, acting, strict=True)
                ]
                shared[acting] = torch.stack(rows)
            per_layer.append(shared[acting])
        return per_layer

    def _extra(self, seq_len: int) -> dict[str, torch.Tensor]:
        """Per-prompt inputs for the prompt followed by generated text tokens, ``seq_len`` in all."""
        extra = dict(self.extra)
        if "mm_token_type_ids" in extra:
            types = extra["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, seq_len - types.shape[1])], dim=1)
        return extra

    def run(
        self,
        ids: torch.Tensor,
        interventions: Sequence[BlockKeys],
        read: list[int],
        *,
        internals: bool = True,
        capture: bool = False,
    ) -> tuple[_trace.Readout, _trace.DecoderInputs | None]:
        """The whole model on ``ids (batch, seq)``, row ``i`` under ``interventions[i]``, reading ``read``."""
        seq_len = ids.shape[1]
        allowed = self.allowed(interventions, seq_len)
        return _trace.run_model(self.vl, ids, self._extra(seq_len), self.encoder, allowed, read, internals, capture)

    def run_fast(self, dec: _trace.DecoderInputs, interventions: Sequence[BlockKeys], read: list[int]):
        """Like :meth:`run` on the captured sequence, recomputing only from the first position that changes."""
        seq_len = dec.embeds.shape[1]
        start = min([*(first_changed(iv, seq_len, self.vl.num_layers) for iv in interventions), *read])
        return _trace.run_decoder(self.vl, dec, start, self.allowed(interventions, seq_len, start), read)[0]

    def clean_pass(self, prompt_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, _trace.Readout, _trace.DecoderInputs]:
        """Greedy clean continuation of exactly ``n`` tokens, read at each step's last position.

        The prompt runs through the whole model once (capturing the decoder's inputs and
        cache); each further step feeds one generated token to the decoder. Returns the
        tokens, the readout at positions ``L-1 .. L+n-2``, and the decoder inputs of the
        prompt plus the first ``n - 1`` tokens (the teacher-forced sequence).
        """
        self.vl.hf.model.rope_deltas = None  # transformers keeps M-RoPE offsets between calls; start afresh
        last = prompt_ids.shape[1] - 1
        out, dec = self.run(prompt_ids, [NOTHING], [last], capture=True)
        readouts = [out]
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            dec = dec.append_text(self.vl, tokens[-1])
            pos = dec.embeds.shape[1] - 1
            allowed = self.allowed([NOTHING], pos + 1, start=pos)
            out, dec = _trace.run_decoder(self.vl, dec, pos, allowed, [pos], extend=True)
            readouts.append(out)
            tokens.append(int(out.logits[0, -1].argmax()))
        clean = _trace.Readout(
            *(
                torch.cat([getattr(r, f) for r in readouts], dim=1 if f == "logits" else 2)
                for f in ("residual", "heads", "logits")
            )
        )
        return torch.tensor(tokens, dtype=prompt_ids.dtype), clean, dec


def context(vl: VLModel, built: Prompt, max_len: int, vision_attention: str = "native") -> Context:
    """Everything the passes over ``built`` share, for sequences up to ``max_len`` tokens."""
    inputs = built.inputs
    extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw") if k in inputs}
    base = base_allowed(max_len, built.tokens.vision_ranges, vision_attention)
    return Context(vl, extra, _encode_vision(vl, inputs), base)


def _encode_vision(vl: VLModel, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Run the vision encoder once; every pass of the sweep reuses its output."""
    outputs = {}
    with torch.inference_mode():
        if "pixel_values" in inputs:
            outputs["image"] = vl.hf.model.get_image_features(
                inputs["pixel_values"].to(vl.device), inputs["image_grid_thw"].to(vl.device), return_dict=True
            )
        if "pixel_values_videos" in inputs:
            outputs["video"] = vl.hf.model.get_video_features(
                inputs["pixel_values_videos"].to(vl.device), inputs["video_grid_thw"].to(vl.device), return_dict=True
            )
    return outputs


def _masked_generation(
    ctx: Context,
    prompt_ids: torch.Tensor,
    clean: torch.Tensor,
    forced_top: torch.Tensor,
    interventions: Sequence[BlockKeys],
) -> torch.Tensor:
    """Greedy continuations under each knockout, ``(batch, steps)``.

    Teacher-forced argmaxes are the free-running continuation up to the first step where a
    knockout's top token leaves the clean one; only from there on is it generated afresh
    (full passes, batched over the knockouts that left at the same step).
    """
    steps = clean.shape[0]
    out = forced_top.clone()
    left_at: dict[int, list[int]] = {}
    for row in range(len(interventions)):
        differs = (forced_top[row] != clean).nonzero()
        if len(differs) and int(differs[0]) < steps - 1:
            left_at.setdefault(int(differs[0]), []).append(row)
    for first, rows in left_at.items():
        ids = torch.cat(
            [
                prompt_ids.expand(len(rows), -1),
                clean[:first].expand(len(rows), -1),
                forced_top[rows, first : first + 1],
            ],
            dim=1,
        )
        group = [interventions[r] for r in rows]
        for _ in range(steps - first - 1):
            logits = ctx.run(ids, group, [ids.shape[1] - 1], internals=False)[0].logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).to(ids.dtype)], dim=1)
        out[rows, first + 1 :] = ids[:, prompt_ids.shape[1] + first + 1 :]
    return out


def _pin_unchanged(out: _trace.Readout, clean: _trace.Readout, firsts: list[int], read: list[int]) -> _trace.Readout:
    """Read positions before a knockout's first changed position are the clean values, exactly."""
    keep = torch.tensor([[r < f for r in read] for f in firsts])  # (batch, pos)
    if not keep.any():
        return out
    residual = torch.where(keep[:, None, :, None], clean.residual, out.residual)
    heads = torch.where(keep[:, None, :, None, None], clean.heads, out.heads)
    logits = torch.where(keep[:, :, None], clean.logits, out.logits)
    return _trace.Readout(residual, heads, logits)


def sweep(
    vl: VLModel,
    prompt: str,
    images: Sequence[str | Path] = (),
    *,
    mask: str | Sequence[int] = "text",
    mask_unit: str = "token",
    videos: Sequence[str | Path] = (),
    video_fps: float = 2.0,
    num_tokens: int = 1,
    layers: Sequence[int] | None = None,
    chat_template: str = "auto",
    vision_attention: str = "native",
    batch_size: int | None = None,
    max_memory: int | str = "2GiB",
    progress: bool = True,
) -> xr.Dataset:
    """Block each chosen key position in turn and measure what changes.

    Every masked position ``p`` is blocked at ``layers`` (all if None): queries after
    ``p`` cannot attend to it. Measured at the last position of each of the
    ``num_tokens`` teacher-forced steps: decoder-layer outputs, per-head attention
    outputs and the next-token distribution, against the clean run. ``batch_size``
    knockouts share a forward pass; None picks the largest batch whose estimated
    memory fits ``max_memory`` (bytes, or text such as ``"2GiB"``).

    ``mask_unit`` groups the masked vision tokens into units blocked together (one entry
    of ``token`` each): ``token``, ``row``, ``column``, ``region:K`` (KxK merged tokens) or
    ``image`` (a whole image or video frame group). ``videos`` are directories of frame
    images (sorted by name), taken as sampled at ``video_fps``.

    Example:
        >>> import vlmask
        >>> vl = vlmask.load_model()
        >>> ds = vlmask.sweep(vl, "what color is the circle ?", ["examples/shapes.png"], progress=False)
        >>> sorted(ds["residual"].dims)
        ['layer', 'metric', 'step', 'token']
    """
    if num_tokens < 1:
        raise VlmaskError(f"--num-tokens must be at least 1, got {num_tokens}")
    if batch_size is not None and batch_size < 1:
        raise VlmaskError(f"--batch-size must be at least 1, got {batch_size}")
    budget = parse_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
    built: Prompt = build_prompt(vl.processor, prompt, list(images), chat_template, list(videos), video_fps)
    kinds = built.tokens.kind
    positions = parse_mask(mask, kinds) if isinstance(mask, str) else sorted(set(mask))
    if not positions:
        raise VlmaskError("no positions to mask: pass text, vision, all, or a list of positions")
    units = group_units(positions, built.tokens, mask_unit)
    knockouts = [BlockKeys(unit, layers=None if layers is None else tuple(layers)) for unit in units]
    for iv in knockouts:
        iv.check(len(kinds), vl.num_layers)

    prompt_ids = built.inputs["input_ids"]
    prompt_len = prompt_ids.shape[1]
    full_len = prompt_len + num_tokens - 1
    ctx = context(vl, built, full_len, vision_attention)
    clean_ids, clean, decoder_inputs = ctx.clean_pass(prompt_ids, num_tokens)
    read = list(range(prompt_len - 1, full_len))
    if batch_size is None:
        recomputed = full_len - min(first_changed(knockouts[0], full_len, vl.num_layers), read[0])
        bytes_per = vl.dtype.itemsize
        batch_size = choose_batch_size(vl.text_config, full_len, recomputed, len(read), bytes_per, budget)
        log.info("%d knockouts per pass (memory budget %d bytes)", batch_size, budget)

    residual, heads, logits, generated = [], [], [], []
    bar = tqdm(total=len(knockouts), desc="knockouts", unit="token", disable=not progress)
    for start in range(0, len(knockouts), batch_size):
        chunk = knockouts[start : start + batch_size]
        out = ctx.run_fast(decoder_inputs, chunk, read)
        out = _pin_unchanged(out, clean, [first_changed(iv, full_len, vl.num_layers) for iv in chunk], read)
        residual.append(vector_distances(clean.residual, out.residual))
        heads.append(vector_distances(clean.heads, out.heads))
        logits.append(logit_metrics(clean.logits, out.logits))
        generated.append(_masked_generation(ctx, prompt_ids, clean_ids, out.logits.argmax(-1), chunk))
        bar.update(len(chunk))
    bar.close()

    record = SweepRecord(
        prompt=built,
        vl=vl,
        units=units,
        layers=None if layers is None else list(layers),
        mask=mask if isinstance(mask, str) else ",".join(map(str, positions)),
        vision_attention=vision_attention,
        clean_ids=clean_ids.tolist(),
        clean_top_logprob=torch.log_softmax(clean.logits[0], -1).max(-1).values,
        residual=torch.cat(residual),
        heads=torch.cat(heads),
        logits=torch.cat(logits),
        masked_ids=torch.cat(generated),
        intervention=knockouts[0].to_dict(),
        mask_unit=mask_unit,
        video_fps=video_fps,
    )
    return to_dataset(record)
