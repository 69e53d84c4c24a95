"""The knockout sweep: one clean pass, then every knockout in batches, metrics streamed out.

Teacher forcing makes the ``step`` dimension cheap: the clean continuation is generated
first, then the prompt plus that continuation is run once per knockout, and each step is
read at its own position (causality makes position ``L-1+s`` of the long sequence equal
to the last position of the sequence at step ``s``).
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
from vlmask._metrics import logit_metrics, vector_distances
from vlmask._model import VLModel
from vlmask._results import SweepRecord, to_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Context:
    """What every pass of one sweep shares."""

    vl: VLModel
    extra: dict[str, torch.Tensor]
    encoder: dict[str, Any]
    base: torch.Tensor  # (seq, seq) allowed edges of the unmodified model

    def allowed(self, interventions: Sequence[BlockKeys], seq_len: int) -> list[torch.Tensor]:
        """Per layer, the ``(batch, seq, seq)`` edges left once each intervention cut its own."""
        base = self.base[:seq_len, :seq_len]
        per_layer = []
        for layer in range(self.vl.num_layers):
            rows = [base & ~iv.blocked_edges(seq_len, layer) if iv.acts_on(layer) else base for iv in interventions]
            per_layer.append(torch.stack(rows))
        return per_layer

    def extend(self, n_new: int) -> dict[str, torch.Tensor]:
        """Per-prompt inputs for the prompt followed by ``n_new`` generated text tokens."""
        extra = dict(self.extra)
        if "mm_token_type_ids" in extra:
            types = extra["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, n_new)], dim=1)
        return extra

    def run(
        self, ids: torch.Tensor, interventions: Sequence[BlockKeys], read: list[int], internals: bool = True
    ) -> _trace.Readout:
        """Run ``ids (batch, seq)``, row ``i`` under ``interventions[i]``, reading positions ``read``."""
        seq_len = ids.shape[1]
        extra = self.extend(seq_len - self.extra_len)
        return _trace.run(self.vl, ids, extra, self.encoder, self.allowed(interventions, seq_len), read, internals)

    @property
    def extra_len(self) -> int:
        return int(self.extra["mm_token_type_ids"].shape[1]) if "mm_token_type_ids" in self.extra else 0


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


def context(vl: VLModel, built: Prompt, max_len: int, vision_attention: str = "native") -> _Context:
    """Everything the passes over ``built`` share, for sequences up to ``max_len`` tokens."""
    inputs = built.inputs
    extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw") if k in inputs}
    base = base_allowed(max_len, built.tokens.vision_ranges, vision_attention)
    return _Context(vl, extra, _encode_vision(vl, inputs), base)


def _greedy(ctx: _Context, ids: torch.Tensor, interventions: Sequence[BlockKeys], n: int) -> torch.Tensor:
    """Continue each row of ``ids`` greedily for ``n`` tokens under its intervention."""
    for _ in range(n):
        logits = ctx.run(ids, interventions, [ids.shape[1] - 1], internals=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).to(ids.dtype)], dim=1)
    return ids[:, ids.shape[1] - n :] if n else ids[:, :0]


def _masked_generation(
    ctx: _Context,
    prompt_ids: torch.Tensor,
    clean: torch.Tensor,
    forced_top: torch.Tensor,
    interventions: Sequence[BlockKeys],
) -> torch.Tensor:
    """Greedy continuations under each knockout, ``(batch, steps)``.

    Teacher-forced argmaxes are the free-running continuation up to the first step where a
    knockout's top token leaves the clean one; only from there is it generated afresh.
    """
    steps = clean.shape[0]
    out = forced_top.clone()
    for row, iv in enumerate(interventions):
        differs = (forced_top[row] != clean).nonzero()
        if len(differs) == 0 or int(differs[0]) == steps - 1:
            continue
        first = int(differs[0])
        ids = torch.cat([prompt_ids, clean[:first][None], forced_top[row, first : first + 1][None]], dim=1)
        out[row, first + 1 :] = _greedy(ctx, ids, [iv], steps - first - 1)[0]
    return out


def sweep(
    vl: VLModel,
    prompt: str,
    images: Sequence[str | Path] = (),
    *,
    mask: str | Sequence[int] = "text",
    num_tokens: int = 1,
    layers: Sequence[int] | None = None,
    chat_template: str = "auto",
    vision_attention: str = "native",
    batch_size: int = 8,
    progress: bool = True,
) -> xr.Dataset:
    """Block each chosen key position in turn and measure what changes.

    Every masked position ``p`` is blocked at ``layers`` (all if None): queries after
    ``p`` cannot attend to it. Measured at the last position of each of the
    ``num_tokens`` teacher-forced steps: decoder-layer outputs, per-head attention
    outputs and the next-token distribution, against the clean run.

    Example:
        >>> import vlmask
        >>> vl = vlmask.load_model()
        >>> ds = vlmask.sweep(vl, "what color is the circle ?", ["examples/shapes.png"], progress=False)
        >>> sorted(ds["residual"].dims)
        ['layer', 'metric', 'step', 'token']
    """
    if num_tokens < 1:
        raise VlmaskError(f"--num-tokens must be at least 1, got {num_tokens}")
    if batch_size < 1:
        raise VlmaskError(f"--batch-size must be at least 1, got {batch_size}")
    built: Prompt = build_prompt(vl.processor, prompt, list(images), chat_template)
    kinds = built.tokens.kind
    positions = parse_mask(mask, kinds) if isinstance(mask, str) else sorted(set(mask))
    knockouts = [BlockKeys((p,), layers=None if layers is None else tuple(layers)) for p in positions]
    for iv in knockouts:
        iv.check(len(kinds), vl.num_layers)

    prompt_ids = built.inputs["input_ids"]
    prompt_len = prompt_ids.shape[1]
    full_len = prompt_len + num_tokens - 1
    ctx = context(vl, built, full_len, vision_attention)

    nothing = BlockKeys(())
    clean_ids = _greedy(ctx, prompt_ids, [nothing], num_tokens)[0]
    ids = torch.cat([prompt_ids[0], clean_ids[:-1]])[None]
    read = list(range(prompt_len - 1, full_len))
    clean = ctx.run(ids, [nothing], read)
    forced = clean.logits[0].argmax(-1)
    if not torch.equal(forced, clean_ids):
        log.warning(
            "teacher-forced clean pass disagrees with greedy generation at a near tie: %s vs %s",
            forced.tolist(),
            clean_ids.tolist(),
        )

    residual, heads, logits, generated = [], [], [], []
    bar = tqdm(total=len(knockouts), desc="knockouts", unit="token", disable=not progress)
    for start in range(0, len(knockouts), batch_size):
        chunk = knockouts[start : start + batch_size]
        out = ctx.run(ids.expand(len(chunk), -1), chunk, read)
        residual.append(vector_distances(clean.residual, out.residual))
        heads.append(vector_distances(clean.heads, out.heads))
        logits.append(logit_metrics(clean.logits, out.logits))
        generated.append(_masked_generation(ctx, prompt_ids, clean_ids, out.logits.argmax(-1), chunk))
        bar.update(len(chunk))
    bar.close()

    record = SweepRecord(
        prompt=built,
        vl=vl,
        positions=positions,
        layers=None if layers is None else list(layers),
        mask=mask if isinstance(mask, str) else ",".join(map(str, positions)),
        vision_attention=vision_attention,
        clean_ids=clean_ids.tolist(),
        clean_top_logprob=torch.log_softmax(clean.logits[0], -1).max(-1).values,
        residual=torch.cat(residual),
        heads=torch.cat(heads),
        logits=torch.cat(logits),
        masked_ids=torch.cat(generated),
        intervention=knockouts[0].to_dict() if knockouts else nothing.to_dict(),
    )
    return to_dataset(record)
