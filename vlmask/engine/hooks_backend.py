"""The plain-hooks backend: the same passes as the nnsight backend, attached with PyTorch hooks.

Every pass does exactly the same work (same plan, masks, edits and reads, same cache reuse),
but the interventions are ``register_forward_pre_hook`` / ``register_forward_hook`` calls
instead of an nnsight trace: the benchmark's ``hooks`` method, whose time difference from
``vlmask`` is what nnsight itself costs. Select it with ``backend="hooks"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlmask.engine.backend import Backend
from vlmask.engine.steps import DecoderCall, LayerSteps
from vlmask.model.load import VLModel


def layer_hooks(vl: VLModel, steps: LayerSteps) -> list[Any]:
    """``steps`` as hooks on each decoder layer: its ``o_proj``, its MLP and its output (self-attention gets its
    mask from the attention call itself: :meth:`LayerSteps.attending`)."""
    handles = []
    for i, layer in enumerate(vl.decoder.layers):

        def heads(module, args, i=i):
            x = steps.heads(i, args[0])
            return None if x is None else (x,)

        def output(module, args, y, i=i):
            return steps.output(i, y)

        if steps.wants_heads(i):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(heads))
        if steps.wants_mlp(i):
            handles.append(layer.mlp.register_forward_hook(lambda module, args, y, i=i: steps.mlp(i, y)))
        if steps.wants_output(i):
            handles.append(layer.register_forward_hook(output))
    return handles


@contextlib.contextmanager
def installed(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HooksBackend(Backend):
    """Passes with plain PyTorch hooks on the transformers modules; nnsight is never touched."""

    name = "hooks"

    def forward_model(
        self, vl: VLModel, kwargs: dict[str, Any], steps: LayerSteps, capture: bool
    ) -> tuple[Any, dict[str, Any] | None]:
        seen: dict[str, Any] = {}
        handles = layer_hooks(vl, steps)
        if capture:
            handles.append(vl.decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True))
        with torch.inference_mode(), installed(handles):
            output = vl.hf(**kwargs)
        return output, seen if capture else None

    def forward_decoder(self, vl: VLModel, call: DecoderCall, steps: LayerSteps) -> torch.Tensor:
        with torch.inference_mode(), installed(layer_hooks(vl, steps)):
            return call.decode(call.embeds, call.positions).float().cpu()
