"""The knockout sweep: one clean pass, then every knockout in batches, metrics streamed out.

What makes it fast, without changing any number:

- the vision encoder runs once per sweep and its output is reused by every pass;
- teacher forcing makes the ``step`` dimension cheap: the clean continuation is generated
  first, then prompt + continuation is run once, and step ``s`` is read at position
  ``L-1+s`` (causality makes it equal to the last position of the sequence at step ``s``);
- a knockout of key ``p`` changes nothing before position ``p + 1`` (each intervention says
  where it starts changing things: ``first_changed``): knockouts run on the decoder only,
  each from the first position it changes, on the clean pass's keys and values before it;
- knockouts run in packed passes: the positions each knockout recomputes are laid end to
  end in one sequence, whose attention mask keeps the knockouts apart, so a pass computes
  no position that a knockout does not need; only the metrics are kept.

A ``base`` intervention changes the clean run itself: the clean pass runs with it (so the
reused prefix is the base's), and every knockout runs as ``base & knockout``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from tqdm.auto import tqdm

from interventions.compose import compose
from vlmask.engine.knockouts import plan
from vlmask.engine.packing import packed_cap, pass_bytes, plan_batches
from vlmask.engine.passes import NOTHING, _masked_generation, _pin_unchanged, context, first_changed
from vlmask.errors import VlmaskError
from vlmask.inputs.prompt import Prompt, build_prompt
from vlmask.inputs.selection import parse_indices, parse_mask
from vlmask.inputs.units import group_units
from vlmask.model.load import VLModel
from vlmask.results.dataset import SweepRecord, to_dataset
from vlmask.results.metrics import logit_metrics, vector_distances
from vlmask.spec import SweepSpec

log = logging.getLogger(__name__)


def _knockouts(vl: VLModel, built: Prompt, spec: SweepSpec) -> Any:
    """The sweep's :class:`~vlmask.engine.knockouts.Knockouts`: masked token units, or the values ``spec.over``."""
    layers = spec.layers
    if isinstance(layers, str):
        among = f"the model has {vl.num_layers} decoder layers"
        layers = parse_indices(layers, vl.num_layers, "layer", among=among)
    if spec.over is not None:
        return plan(vl.num_layers, over=[compose(v) for v in spec.over], layers=layers)
    mask = "text" if spec.mask is None else spec.mask
    positions = parse_mask(mask, built.tokens.kind, built.prompt_positions) if isinstance(mask, str) else list(mask)
    return plan(vl.num_layers, units=group_units(positions, built.tokens, spec.mask_unit), layers=layers)


def sweep(
    vl: VLModel,
    spec_or_prompt: SweepSpec | str,
    images: Sequence[str | Path] = (),
    *,
    progress: bool = True,
    **options: Any,
) -> xr.Dataset:
    """Knock out each chosen token (or each intervention of ``over``) in turn and measure what changes.

    Takes a :class:`~vlmask.spec.SweepSpec`, or the prompt, its images and any of its options
    by name (``mask``, ``mask_unit``, ``over``, ``base``, ``layers``, ``num_tokens``, ...: each
    field's help says what it does); ``progress`` switches the progress bar.

    Each masked unit (``mask``, default every text token) is blocked at ``layers`` (all if
    None): no later query attends to it; dimension ``token``. ``over`` knocks out each of its
    intervention values instead: dimension ``intervention``. With ``layers=vlmask.windows(k)``
    every knockout runs at each window of layers (dimension ``window``). ``base`` is applied
    to the clean run and every knockout alike, and every metric compares ``base & knockout``
    with ``base`` alone. Measured at the last position of each of the ``num_tokens``
    teacher-forced steps: decoder-layer outputs, per-head attention outputs and the next-token
    distribution, against the clean run.

    Example:
        >>> import vlmask
        >>> vl = vlmask.load_model()
        >>> ds = vlmask.sweep(vl, "what color is the circle ?", ["examples/shapes.png"], progress=False)
        >>> sorted(ds["residual"].dims)
        ['layer', 'metric', 'step', 'token']
        >>> spec = vlmask.SweepSpec("what color is the circle ?", images=["examples/shapes.png"], mask="vision")
        >>> vlmask.sweep(vl, spec, progress=False).sizes["token"]
        16
    """
    if isinstance(spec_or_prompt, SweepSpec) and (images or options):
        raise VlmaskError("pass a SweepSpec alone, or a prompt with its images and options, not both")
    spec = spec_or_prompt if isinstance(spec_or_prompt, SweepSpec) else SweepSpec(spec_or_prompt, images, **options)
    built: Prompt = build_prompt(
        vl.processor, spec.prompt, list(spec.images), spec.chat_template, list(spec.videos), spec.video_fps
    )
    knockouts = _knockouts(vl, built, spec)
    base = NOTHING if spec.base is None else compose(spec.base)
    for iv in [base, *knockouts.values]:
        iv.check(len(built.tokens), vl.num_layers, vl.num_heads, vl.text_config.hidden_size)

    prompt_ids = built.inputs["input_ids"]
    prompt_len = prompt_ids.shape[1]
    full_len = prompt_len + spec.num_tokens - 1
    ctx = context(vl, built, full_len, spec.vision_attention)
    if any(iv.needs_head_means for iv in [base, *knockouts.values]):
        ctx = ctx.with_head_means(prompt_ids)
    clean_ids, clean, decoder_inputs = ctx.clean_pass(prompt_ids, spec.num_tokens, base)
    read = list(range(prompt_len - 1, full_len))
    firsts = [first_changed(iv, full_len, vl.num_layers) for iv in knockouts.values]
    rows = [compose(base, iv) for iv in knockouts.values]
    starts = [min(f, read[0]) for f in firsts]  # a pass computes at least the positions it reads

    cap = packed_cap(full_len)

    def fits(positions: int, count: int) -> bool:
        memory = pass_bytes(vl.text_config, full_len, positions, count, len(read), vl.dtype.itemsize)
        return positions <= cap and memory <= spec.max_memory

    residual, heads, logits, generated = [], [], [], []
    bar = tqdm(total=len(rows), desc="knockouts", unit="knockout", disable=not progress)
    for batch in plan_batches(starts, full_len, spec.batch_size, fits):
        chunk = rows[batch]
        out = ctx.run_fast(decoder_inputs, chunk, read, starts[batch])
        out = _pin_unchanged(out, clean, firsts[batch], read)
        residual.append(vector_distances(clean.residual, out.residual))
        heads.append(vector_distances(clean.heads, out.heads))
        logits.append(logit_metrics(clean.logits, out.logits))
        top = out.logits.argmax(-1)
        generated.append(_masked_generation(ctx, decoder_inputs, clean_ids, top, chunk, starts[batch]))
        bar.update(len(chunk))
    bar.close()

    mask_text = ""
    if knockouts.dim == "token":
        mask = "text" if spec.mask is None else spec.mask
        mask_text = mask if isinstance(mask, str) else ",".join(map(str, sorted(set(mask))))
    record = SweepRecord(
        prompt=built,
        vl=vl,
        knockouts=knockouts,
        base=None if base == NOTHING else base.to_dict(),
        mask=mask_text,
        mask_unit=spec.mask_unit if knockouts.dim == "token" else "",
        vision_attention=spec.vision_attention,
        clean_ids=clean_ids.tolist(),
        clean_top_logprob=torch.log_softmax(clean.logits[0], -1).max(-1).values,
        residual=torch.cat(residual),
        heads=torch.cat(heads),
        logits=torch.cat(logits),
        masked_ids=torch.cat(generated),
        video_fps=spec.video_fps,
    )
    return to_dataset(record)
