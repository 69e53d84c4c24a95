"""vlmask's own sweep algorithm with its two nnsight traces swapped for plain PyTorch hooks.

The benchmark's ``hooks`` method runs :func:`vlmask.sweep` inside :func:`plain_hooks`: every
pass does exactly the same work (same plan, same masks, same edits and reads, same cache
reuse), but the interventions are ``register_forward_pre_hook`` / ``register_forward_hook``
calls instead of an nnsight trace. The time difference is what nnsight itself costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlmask.engine import trace as _trace


def _hooks(vl: Any, plan: _trace.Plan, masks: list, index: torch.Tensor, residual, heads, means=None) -> list:
    """What ``_trace._intervene`` does inside a trace, as hooks on each decoder layer."""
    handles = []
    for i, (layer, mask) in enumerate(zip(vl.decoder.layers, masks, strict=True)):

        def attention(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        def o_proj(module, args, i=i):
            x = args[0]
            if plan.editing(i, "heads"):
                x = plan.edit_heads(i, x, vl.num_heads)
            if residual is not None:
                heads.append(x[:, index].float().cpu())
            if means is not None:
                means.append(x.float().mean(1).cpu())
            return (x,)

        def output(module, args, y, i=i):
            if plan.editing(i, "residual"):
                y = plan.edit_residual(i, y)
            if residual is not None:
                residual.append(y[:, index].float().cpu())
            return y

        handles.append(layer.self_attn.register_forward_pre_hook(attention, with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_proj))
        handles.append(layer.register_forward_hook(output))
    return handles


@contextlib.contextmanager
def _installed(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_model(vl, input_ids, extra, encoder_outputs, plan, read, internals=True, capture=False, means=None):
    """:func:`vlmask.engine.trace.run_model` with hooks."""
    index = torch.tensor(read, device=vl.device)
    kwargs = _trace.model_kwargs(vl, input_ids, extra, encoder_outputs, index, capture)
    residual, heads = ([], []) if internals else (None, [])
    seen: dict[str, Any] = {}
    handles = _hooks(vl, plan, _trace._masks(vl, plan.allowed), index, residual, heads, means)
    handles.append(vl.decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True))
    with torch.inference_mode(), _installed(handles):
        output = vl.hf(**kwargs)
    readout = _trace._readout(vl, residual, heads, output.logits.float().cpu())
    return readout, _trace.captured(vl, seen, output.cache) if capture else None


def run_decoder(vl, dec, plan, read, extend=False):
    """:func:`vlmask.engine.trace.run_decoder` with hooks: the same decoder call, hooks instead of a trace."""
    call = _trace.decoder_call(vl, dec, plan, read)
    residual, heads = [], []
    handles = _hooks(vl, plan, call.masks, call.index, residual, heads)
    with torch.inference_mode(), _installed(handles):
        logits = call.decode(call.embeds, call.positions).float().cpu()
    readout = _trace.decoder_readout(vl, plan, residual, heads, logits)
    return readout, _trace.extended(dec, call.cache, plan.start) if extend else None


@contextlib.contextmanager
def plain_hooks() -> Iterator[None]:
    """Inside this block, vlmask's passes run with plain hooks instead of nnsight traces."""
    saved = _trace.run_model, _trace.run_decoder
    _trace.run_model, _trace.run_decoder = run_model, run_decoder
    try:
        yield
    finally:
        _trace.run_model, _trace.run_decoder = saved
