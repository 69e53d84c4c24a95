"""The knockout sweep: one clean pass, then every knockout in packed batches, metrics streamed out.

The passes themselves, and what makes them fast without changing any number, are
:class:`vlmask.engine.passes.PromptPasses`; this module turns the options into knockouts and
the measurements into a labeled Dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from interventions import ModelShape, compose
from vlmask.engine.knockouts import Windows, plan
from vlmask.engine.labels import sweep_record
from vlmask.engine.packing import parse_size
from vlmask.engine.passes import NOTHING, PromptPasses
from vlmask.errors import VlmaskError
from vlmask.inputs.prompt import Prompt, build_prompt
from vlmask.inputs.selection import parse_mask
from vlmask.inputs.units import group_units
from vlmask.model.load import VLModel
from vlmask.results.dataset import Measured, to_dataset

log = logging.getLogger(__name__)


def _knockouts(vl: VLModel, built: Prompt, mask: Any, mask_unit: str, over: Any, layers: Any) -> Any:
    """The sweep's :class:`~vlmask.engine.knockouts.Knockouts`: masked token units, or the values ``over``."""
    if over is None:
        kinds = built.tokens.kind
        mask = "text" if mask is None else mask
        positions = parse_mask(mask, kinds, built.prompt_positions) if isinstance(mask, str) else sorted(set(mask))
        if not positions:
            raise VlmaskError("no positions to mask: pass text, prompt, vision, all, or a list of positions")
        return plan(vl.num_layers, units=group_units(positions, built.tokens, mask_unit), layers=layers)
    if mask is not None or mask_unit != "token":
        raise VlmaskError(
            "pass either mask=/mask_unit= (a sweep over tokens) or over= (a list of interventions), not both"
        )
    values = [over] if hasattr(over, "to_dict") else list(over)
    return plan(vl.num_layers, over=[compose(v) for v in values], layers=layers)


def sweep(
    vl: VLModel,
    prompt: str,
    images: Sequence[str | Path] = (),
    *,
    mask: str | Sequence[int] | None = None,
    mask_unit: str = "token",
    over: Any = None,
    base: Any = None,
    videos: Sequence[str | Path] = (),
    video_fps: float = 2.0,
    num_tokens: int = 1,
    layers: Sequence[int] | Windows | None = None,
    chat_template: str = "auto",
    vision_attention: str = "native",
    batch_size: int | None = None,
    max_memory: int | str = "2GiB",
    progress: bool = True,
    backend: str = "nnsight",
) -> xr.Dataset:
    """Knock out each chosen token (or each intervention of ``over``) in turn and measure what changes.

    By default every masked position ``p`` (``mask``, default ``"text"``) is blocked at
    ``layers`` (all if None): queries after ``p`` cannot attend to it; results have a
    ``token`` dimension. ``over`` instead takes a list of intervention values
    (``BlockKeys``, ``BlockEdges``, ``AblateHeads``, ``PatchResidual``, ``Compose``), each
    knocked out in turn: dimension ``intervention``. ``layers`` may be :func:`vlmask.windows`:
    every knockout then runs at each window of layers (dimension ``window``, its coordinate
    the centre layer); for ``over`` values, ``layers`` replaces their own ``layers``.
    ``base`` is applied to the clean run and to every knockout alike (for example a head
    ablation: which tokens matter with that head gone?), and every metric compares
    ``base & knockout`` with ``base`` alone.

    Measured at the last position of each of the ``num_tokens`` teacher-forced steps:
    decoder-layer outputs, per-head attention outputs and the next-token distribution,
    against the clean run. Knockouts share packed forward passes of at most ``batch_size``
    knockouts (None: no limit) whose estimated memory fits ``max_memory`` (bytes, or text
    such as ``"2GiB"``). ``backend`` runs the passes (``"nnsight"``, or ``"hooks"``: plain
    PyTorch hooks, the same numbers).

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
    knockouts = _knockouts(vl, built, mask, mask_unit, over, layers)
    base = NOTHING if base is None else compose(base)
    for iv in [base, *knockouts.values]:
        iv.check(len(built.tokens), ModelShape(vl.num_layers, vl.num_heads, vl.text_config.hidden_size))

    prompt_ids = built.inputs["input_ids"]
    passes = PromptPasses.of(vl, built, prompt_ids.shape[1] + num_tokens - 1, vision_attention, backend)
    out = passes.measure(
        prompt_ids, num_tokens, base, knockouts.values, batch_size=batch_size, budget=budget, progress=progress
    )

    mask_text = ""
    if knockouts.dim == "token":
        mask = "text" if mask is None else mask
        mask_text = mask if isinstance(mask, str) else ",".join(map(str, sorted(set(mask))))
    measured = Measured(
        clean_ids=out.clean.tokens.tolist(),
        clean_top_logprob=torch.log_softmax(out.clean.readout.logits[0], -1).max(-1).values,
        residual=out.residual,
        heads=out.heads,
        logits=out.logits,
        masked_ids=out.masked_ids,
    )
    return to_dataset(
        sweep_record(
            vl,
            built,
            knockouts,
            measured,
            video_fps,
            base=None if base == NOTHING else base.to_dict(),
            mask=mask_text,
            mask_unit=mask_unit if knockouts.dim == "token" else "",
            vision_attention=vision_attention,
        )
    )
