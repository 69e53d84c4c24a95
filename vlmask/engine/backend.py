"""The backend boundary: how a pass is executed on the model, swappable by name.

A :class:`Backend` answers two calls with values: :meth:`~Backend.run_model` (the whole
model, optionally capturing what reached the decoder and the mean head outputs) and
:meth:`~Backend.run_decoder` (the decoder alone, on captured inputs). What a pass does at
each layer is :class:`~vlmask.engine.steps.LayerSteps`, shared; a backend only attaches it
and runs the forward: ``"nnsight"`` (the default, an nnsight trace) or ``"hooks"`` (plain
PyTorch hooks, to price nnsight itself). A backend registers itself by subclassing with a
``name``; :meth:`Backend.named` finds one by name.

Example:
    >>> Backend.named("hooks").name
    'hooks'
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmask.engine.state import DecoderInputs, ModelInputs, PassPlan, Readout
from vlmask.engine.steps import DecoderCall, LayerSteps, captured_inputs, decoder_call, layer_masks, model_kwargs
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel

BUILTIN = {"nnsight": "vlmask.engine.nnsight_backend", "hooks": "vlmask.engine.hooks_backend"}
"""The shipped backends, by name, and the module that defines each (imported on first use)."""

_REGISTRY: dict[str, type[Backend]] = {}


@dataclass(frozen=True)
class ModelPass:
    """What a pass over the whole model gives: its readout, what reached the decoder (if captured,
    batch 1) and each layer's mean head outputs ``(layer, head, head_dim)`` (if asked for)."""

    readout: Readout
    inputs: DecoderInputs | None = None
    head_means: torch.Tensor | None = None


@dataclass(frozen=True)
class DecoderPass:
    """What a decoder pass gives: its readout (one batch row per plan row) and, if asked for,
    the inputs with the rows' own keys and values (one packed row, or a batch) or, for a packed
    pass, the ``packed`` keys and values (see :meth:`DecoderInputs.packed_rows`)."""

    readout: Readout
    inputs: DecoderInputs | None = None
    packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None


class Backend(ABC):
    """How passes run on the model. Subclasses attach :class:`LayerSteps` and run the forward."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    @staticmethod
    def named(name: str | Backend = "nnsight") -> Backend:
        """The backend called ``name`` (a :class:`Backend` is returned as it is).

        Example:
            >>> Backend.named("nnsight").name
            'nnsight'
        """
        if isinstance(name, Backend):
            return name
        if name not in _REGISTRY and name in BUILTIN:
            importlib.import_module(BUILTIN[name])
        if name not in _REGISTRY:
            raise VlmaskError(f"backend {name!r} is not known: expected one of {sorted({*BUILTIN, *_REGISTRY})}")
        return _REGISTRY[name]()

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark a tensor read during the forward as kept past it (nothing to do for plain hooks)."""
        return tensor

    @abstractmethod
    def forward_model(
        self, vl: VLModel, kwargs: dict[str, Any], steps: LayerSteps, capture: bool
    ) -> tuple[Any, dict[str, Any] | None]:
        """Run ``vl.hf(**kwargs)`` with ``steps`` attached: its output and (with ``capture``) the decoder's kwargs."""

    @abstractmethod
    def forward_decoder(self, vl: VLModel, call: DecoderCall, steps: LayerSteps) -> torch.Tensor:
        """Run ``call.decode`` with ``steps`` attached: the logits at the read positions, float32 on CPU."""

    def run_model(
        self, vl: VLModel, inputs: ModelInputs, plan: PassPlan, *, capture: bool = False, mean_heads: bool = False
    ) -> ModelPass:
        """Run the whole model on ``inputs`` under ``plan`` (``allowed[layer] (batch, seq, seq)``).

        With ``capture`` (batch 1), also return what reached the decoder, cache included;
        with ``mean_heads``, each layer's head outputs averaged over every position.
        """
        index = torch.tensor(plan.read, device=vl.device)
        kwargs = model_kwargs(vl, inputs, index, capture)
        steps = LayerSteps(vl, plan, layer_masks(vl, plan.allowed), index, mean_heads, self.keep)
        with steps.attending():
            output, decoder_kwargs = self.forward_model(vl, kwargs, steps, capture)
        readout = steps.readout(output.logits.float().cpu())
        captured = captured_inputs(vl, decoder_kwargs, output.cache) if capture else None
        return ModelPass(readout, captured, steps.head_means())

    def run_decoder(
        self, vl: VLModel, inputs: DecoderInputs, plan: PassPlan, *, extend: bool = False, keep: bool = False
    ) -> DecoderPass:
        """Recompute, for each row ``i``, positions ``plan.starts[i]..`` of a captured sequence, in one packed pass
        (or, without ``starts``, positions ``plan.start..`` of each row's own sequence).

        Positions before a row's start are the captured keys and values; read positions
        must be >= every start. With ``extend`` (one packed row, or a batch), the pass also
        gives ``inputs`` with the rows' own keys and values: as captured before the start,
        recomputed from there on; with ``keep``, each layer's keys and values as the pass left
        them (the captured ones, then every computed position).
        """
        call = decoder_call(vl, inputs, plan)
        steps = LayerSteps(vl, plan, call.masks, call.index, keep=self.keep)
        with steps.attending():
            logits = self.forward_decoder(vl, call, steps)
        readout = steps.readout(logits)
        if plan.starts:
            readout = readout.unpacked(len(plan.rows))
        kept = ([layer.keys for layer in call.cache.layers], [layer.values for layer in call.cache.layers])
        extended = inputs.extended(call.cache, plan.start, call.buffers) if extend else None
        return DecoderPass(readout, extended, kept if keep else None)
