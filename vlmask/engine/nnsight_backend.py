"""The nnsight backend: each pass is one nnsight trace. The only module of vlmask that imports nnsight.

A decoder pass that edits and reads nothing inside the layers (a generation step under a
knockout that only blocks attention, whose masks the swapped attention function hands out)
runs the plain forward: a trace would attach nothing. The model's nnsight wrapper is made on
first use and kept with the model (:attr:`VLModel.backend_state`), so loading a model never
touches nnsight.
"""

from __future__ import annotations

from typing import Any

import torch
from nnsight import NNsight

from vlmask.engine.backend import Backend
from vlmask.engine.steps import DecoderCall, LayerSteps
from vlmask.model.load import VLModel


def envoy(vl: VLModel) -> NNsight:
    """The nnsight wrapper of ``vl.hf``, made on first use and kept with ``vl``."""
    wrapped = vl.backend_state.get("nnsight")
    if wrapped is None:
        wrapped = vl.backend_state["nnsight"] = NNsight(vl.hf)
    return wrapped


def _attach(steps: LayerSteps, decoder: Any) -> None:
    """Inside a trace, at each layer in execution order: pass the ``o_proj`` input, the MLP output and
    the layer output through ``steps`` where it edits or reads them (self-attention gets its mask
    from the attention call itself: :meth:`LayerSteps.attending`).

    The lists are made before the trace (values made inside a trace survive only if saved).
    """
    for i, layer in enumerate(decoder.layers):
        if steps.wants_heads(i):
            x = steps.heads(i, layer.self_attn.o_proj.input)
            if x is not None:
                layer.self_attn.o_proj.input = x
        if steps.wants_mlp(i):
            layer.mlp.output = steps.mlp(i, layer.mlp.output)
        if steps.wants_output(i):
            y = steps.output(i, layer.output)
            if y is not None:
                layer.output = y


class NNsightBackend(Backend):
    """Passes as nnsight traces of the model (the default)."""

    name = "nnsight"

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.save()

    def forward_model(
        self, vl: VLModel, kwargs: dict[str, Any], steps: LayerSteps, capture: bool
    ) -> tuple[Any, dict[str, Any] | None]:
        traced = envoy(vl)
        decoder_kwargs = None
        with torch.inference_mode(), traced.trace(**kwargs):
            if capture:
                decoder_kwargs = vl.family.decoder(traced).inputs[1].save()
            _attach(steps, vl.family.decoder(traced))
            output = traced.output.save()
        return output, decoder_kwargs

    def forward_decoder(self, vl: VLModel, call: DecoderCall, steps: LayerSteps) -> torch.Tensor:
        if not steps.attaches():  # nothing to edit or read at any layer (a generation step): no trace to set up
            with torch.inference_mode():
                return call.decode(call.embeds, call.positions).float().cpu()
        traced = envoy(vl)
        with torch.inference_mode(), traced.trace(call.embeds, call.positions, fn=call.decode):
            _attach(steps, vl.family.decoder(traced))
            logits = traced.lm_head.output.float().cpu().save()
        return logits
