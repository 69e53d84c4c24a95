"""What a pass does, whichever backend attaches it: the calls' arguments, the masks, and each layer's steps.

At each decoder layer, in the order the model runs them, a pass edits what reaches
self-attention (its ``attention_mask`` argument), the ``o_proj`` input (each head's output)
and the layer's output (the residual stream) — the hook points of the ``interventions``
contract — and reads the read positions after the edits. :class:`LayerSteps` is that logic,
once; a backend only attaches it (an nnsight trace, plain PyTorch hooks). Attention itself is
the model's own code.

A decoder pass (:func:`decoder_call`) recomputes only the positions a knockout changes (a
knockout of key ``p`` changes nothing before ``p + 1``), on the captured keys and values of
the positions before them; the rows' recomputed positions are packed into one sequence
whose attention mask keeps them apart.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from vlmask.engine.attention_calls import AttentionCalls, Segments, packed_attention
from vlmask.engine.attention_read import AttentionReader
from vlmask.engine.rows import first_projections, read_rows_only, shared_rows
from vlmask.engine.state import DecoderInputs, ModelInputs, PassPlan, Readout
from vlmask.model.attention import attention_mask
from vlmask.model.load import VLModel


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


def layer_masks(
    vl: VLModel, allowed: list[torch.Tensor], pack: Callable | None = None, bare: bool = False
) -> list[torch.Tensor | None]:
    """Attention masks in the implementation's format, each on its layer's device; layers sharing an ``allowed``
    tensor (and a device) share a mask.

    ``pack``, if given, turns each ``allowed`` into its packed form first. With ``bare``, a layer whose every
    query is one position that sees every key gets no mask (None), as in the model's own decoding step.
    """
    converted: dict[tuple[int, torch.device], torch.Tensor | None] = {}
    out = []
    for a, device in zip(allowed, vl.layer_devices, strict=True):
        if (id(a), device) not in converted:
            edges = a if pack is None else pack(a)
            free = bare and edges.shape[-2] == 1 and bool(edges.all())
            converted[id(a), device] = (
                None if free else attention_mask(edges, vl.attn_implementation, vl.dtype).to(device)
            )
        out.append(converted[id(a), device])
    return out


def segment_masks(
    vl: VLModel, allowed: list[torch.Tensor], start: int, starts: Sequence[int], cached: int
) -> list[Segments]:
    """Each layer's :class:`Segments` of a packed pass (rows ``starts``, ``cached`` clean keys), from its
    ``allowed (row, seq - start, seq)``; layers sharing an ``allowed`` tensor (and a device) share them."""
    made: dict[tuple[int, torch.device], Segments] = {}
    out = []
    for a, device in zip(allowed, vl.layer_devices, strict=True):
        if (id(a), device) not in made:

            def convert(edges: torch.Tensor, device: torch.device = device) -> torch.Tensor:
                return attention_mask(edges, vl.attn_implementation, vl.dtype).to(device)

            made[id(a), device] = Segments.of(a, start, starts, cached, convert)
        out.append(made[id(a), device])
    return out


_NOTHING = contextlib.nullcontext()  # reusable: a pass that skips nothing enters no hooks


class LayerSteps:
    """What a pass does at each decoder layer, and what it keeps, whichever backend runs it.

    A backend hands self-attention :attr:`masks` ``[layer]``; where :meth:`wants_heads` it
    passes the ``o_proj`` input through :meth:`heads` (which edits and reads it), and where
    :meth:`wants_output` the layer output through :meth:`output`; both return the edited
    tensor, or None where nothing was edited. ``keep`` marks each kept tensor (nnsight's
    ``save``; identity for plain hooks). The backend runs the forward inside :meth:`attending`,
    which hands each layer's attention call its mask (:attr:`masks`) and reads attention where
    the plan asks for it: the attention function itself is swapped, whatever attaches the rest.
    """

    def __init__(
        self,
        vl: VLModel,
        plan: PassPlan,
        masks: list[torch.Tensor | Segments],
        index: torch.Tensor,
        mean_heads: bool = False,
        keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        narrow_attention: bool = True,
    ) -> None:
        self.num_heads, self.plan, self.masks, self.index, self.keep = vl.num_heads, plan, masks, index, keep
        self.edits = {
            hook: [bool(plan.editing(i, hook)) for i in range(len(masks))] for hook in ("heads", "mlp", "residual")
        }
        self.residual: list[torch.Tensor] | None = [] if plan.internals else None
        self.head_reads: list[torch.Tensor] = []
        self.means: list[torch.Tensor] | None = [] if mean_heads else None
        self.reader = AttentionReader(vl, index) if plan.attention else None
        attention = narrow_attention and not mean_heads  # mean ablation averages every row's heads
        self.narrowed = self._narrowed(vl, attention)
        o_proj = getattr(vl.decoder.layers[-1].self_attn, "o_proj", None)
        self.narrowed_heads = len(masks) - 1 if any(m is o_proj for m in self.narrowed) else None
        rows = index if self.narrowed and attention else None
        self.calls = AttentionCalls(vl, masks, self.reader, last_rows=rows)

    def _narrowed(self, vl: VLModel, attention: bool) -> list[torch.nn.Module]:
        """The last layer's modules that compute only the read rows in this pass (:func:`read_rows_only`): its MLP
        and, with ``attention``, its query and output projections. None where the pass reads every computed
        position, or edits anything at the last layer (an edit may read other positions than the read ones)."""
        plan, last = self.plan, len(self.masks) - 1
        computed = sum(plan.seq_len - s for s in plan.starts) if plan.starts else plan.seq_len - plan.start
        if len(self.index) >= computed or any(self.edits[hook][last] for hook in self.edits):
            return []
        layer = vl.decoder.layers[last]
        projections = [getattr(layer.self_attn, name, None) for name in ("q_proj", "o_proj")] if attention else []
        return [layer.mlp, *(m for m in projections if isinstance(m, torch.nn.Linear))]

    def attending(self) -> contextlib.AbstractContextManager[None]:
        """The context the forward runs in: each layer's attention call gets the pass's mask (and is read
        where the plan asks for it), and the last layer computes only the read positions where it can
        (:attr:`narrowed`, :func:`read_rows_only`)."""
        return self._narrowing() if self.narrowed else self.calls.swapped()

    @contextlib.contextmanager
    def _narrowing(self) -> Iterator[None]:
        with self.calls.swapped(), read_rows_only(self.narrowed, self.index):
            yield

    def attaches(self) -> bool:
        """Whether the pass edits or reads anything at any layer (else the plain forward, masks given by
        :meth:`attending`, is the whole pass)."""
        return any(self.wants_heads(i) or self.wants_mlp(i) or self.wants_output(i) for i in range(len(self.masks)))

    def wants_heads(self, layer: int) -> bool:
        return self.edits["heads"][layer] or self.residual is not None or self.means is not None

    def heads(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Edit the ``o_proj`` input ``x (batch, pos, head * head_dim)`` of ``layer``, then read it."""
        edited = self.plan.edit_heads(layer, x, self.num_heads) if self.edits["heads"][layer] else None
        x = x if edited is None else edited
        if self.residual is not None:
            # where the last layer's output projection is narrowed, what reaches it is the read rows already
            read = x if layer == self.narrowed_heads else x[:, self.index.to(x.device)]
            self.head_reads.append(self.keep(read.float().cpu()))
        if self.means is not None:
            self.means.append(self.keep(x.float().mean(1).cpu()))
        return edited

    def wants_mlp(self, layer: int) -> bool:
        return self.edits["mlp"][layer]

    def mlp(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """Edit the MLP output ``y (batch, pos, hidden)`` of ``layer``."""
        return self.plan.edit_hidden("mlp", layer, y)

    def wants_output(self, layer: int) -> bool:
        return self.edits["residual"][layer] or self.residual is not None

    def output(self, layer: int, y: torch.Tensor) -> torch.Tensor | None:
        """Edit the output ``y (batch, pos, hidden)`` of ``layer``, then read it."""
        edited = self.plan.edit_hidden("residual", layer, y) if self.edits["residual"][layer] else None
        if self.residual is not None:
            self.residual.append(self.keep((y if edited is None else edited)[:, self.index.to(y.device)].float().cpu()))
        return edited

    def readout(self, logits: torch.Tensor) -> Readout:
        """What the pass read, its ``logits (batch, read, vocab)`` (float32, CPU) given."""
        attention = None if self.reader is None else self.reader.stacked()
        return Readout.of_layers(self.residual, self.head_reads, logits, self.num_heads, attention)

    def head_means(self) -> torch.Tensor | None:
        """Each layer's head outputs averaged over every computed position, row 0: ``(layer, head, head_dim)``."""
        if self.means is None:
            return None
        return torch.stack([m[0] for m in self.means]).unflatten(-1, (self.num_heads, -1))


def model_kwargs(vl: VLModel, inputs: ModelInputs, index: torch.Tensor, capture: bool) -> dict[str, Any]:
    """The top-level forward's arguments for ``inputs``, keeping the logits at ``index``."""
    device, batch = vl.device, inputs.input_ids.shape[0]
    kwargs: dict[str, Any] = {"input_ids": inputs.input_ids.to(device), "use_cache": capture, "logits_to_keep": index}
    kwargs |= {k: v.to(device) for k, v in vl.family.repeat_inputs(inputs.extra, batch).items()}
    if inputs.encoder_outputs:
        kwargs["mm_encoder_outputs"] = vl.family.repeat_encoder_outputs(inputs.encoder_outputs, batch)
    return kwargs


def captured_inputs(vl: VLModel, decoder_kwargs: dict[str, Any], cache: Any) -> DecoderInputs:
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


@dataclass(frozen=True)
class DecoderCall:
    """A decoder pass (packed or batched, see :func:`decoder_call`): ``decode(embeds, positions)``
    gives the logits at ``index`` (the read positions among the computed ones) and appends
    the computed keys and values to ``cache`` (which starts with the captured ones), in place
    into the inputs' ``buffers`` where they have room (else None: concatenated);
    ``masks`` go to self-attention (:class:`Segments` in a packed pass of several rows, unless
    :func:`packed_attention` says ``"dense"``)."""

    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    embeds: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    cache: Any
    masks: list[torch.Tensor | Segments]
    buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None


class BufferLayer(DynamicLayer):
    """A cache layer whose keys and values are the first ``length`` positions of ``buffers`` (each
    ``(batch, kv_head, capacity, head_dim)``): :meth:`update` writes the new positions into them in place
    and returns the longer views, where a ``DynamicLayer`` would concatenate (copying the whole cache)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.buffers, self.keys, self.values = (keys, values), keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start, (keys, values) = self.keys.shape[-2], self.buffers
        end = start + key_states.shape[-2]
        if end > keys.shape[-2]:
            raise ValueError(f"{end} positions do not fit a cache buffer of {keys.shape[-2]}")
        keys[:, :, start:end], values[:, :, start:end] = key_states, value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def plain_cache(vl: VLModel) -> bool:
    """Whether every layer of the model's cache is a plain ``DynamicLayer`` (asked once, kept with ``vl``)."""
    plain = vl.backend_state.get("plain cache")
    if plain is None:
        layers = DynamicCache(config=vl.text_config).layers
        plain = vl.backend_state["plain cache"] = all(type(layer) is DynamicLayer for layer in layers)
    return plain


def shared_cache(
    vl: VLModel, keys: list[torch.Tensor], values: list[torch.Tensor], buffers: tuple[list, list] | None = None
) -> DynamicCache:
    """A cache starting with each layer's ``keys``/``values (batch, kv_head, seq, head_dim)``, by reference.

    Nothing is copied in: a pass's ``update`` concatenates its own keys and values into a new
    tensor (as every transformers ``DynamicLayer`` does), so the captured tensors, shared by
    every pass over the prompt, are read and never changed. A layer type that keeps its
    states otherwise (a sliding window) gets them through its own ``update``. With
    ``buffers`` (every layer's keys and values, of which ``keys``/``values`` are the first
    positions; only where :func:`plain_cache`), each layer is a :class:`BufferLayer`: the pass
    writes into them in place instead.

    Example:
        >>> k = torch.zeros(1, vl.text_config.num_key_value_heads, 3, 16)
        >>> cache = shared_cache(vl, [k] * vl.num_layers, [k] * vl.num_layers)
        >>> cache.layers[0].keys is k, cache.get_seq_length()
        (True, 3)
    """
    if plain_cache(vl):  # made directly (the config's walk costs)
        cache = DynamicCache()
        if buffers is not None:
            length = keys[0].shape[2]
            cache.layers = [BufferLayer(k, v, length) for k, v in zip(*buffers, strict=True)]
            return cache
        cache.layers = [_initialized(vl, k, v) for k, v in zip(keys, values, strict=True)]
        return cache
    cache = DynamicCache(config=vl.text_config)
    for i, (layer, k, v) in enumerate(zip(cache.layers, keys, values, strict=True)):
        if type(layer) is DynamicLayer:
            cache.layers[i] = _initialized(vl, k, v)
        else:
            cache.update(k, v, i)
    return cache


def _initialized(vl: VLModel, keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    """A ``DynamicLayer`` holding ``keys``/``values``: a copy of one initialized once per dtype and device (its own
    initialization makes two empty tensors, a thirtieth of a millisecond per pass at eight layers)."""
    made = vl.backend_state.setdefault("initialized layers", {})
    where = keys.dtype, values.dtype, keys.device
    if where not in made:
        made[where] = DynamicLayer()
        made[where].lazy_initialization(keys, values)
    layer = copy.copy(made[where])
    layer.keys, layer.values = keys, values
    return layer


def _packed(x: torch.Tensor, starts: Sequence[int], dim: int) -> torch.Tensor:
    """``x`` at positions ``first..`` for each of ``starts``, laid end to end along ``dim``."""
    return torch.cat([x.narrow(dim, first, x.shape[dim] - first) for first in starts], dim=dim)


def _first_rows(starts: Sequence[int], seq: int) -> tuple[slice, torch.Tensor]:
    """In a pack of rows ``starts`` (each to ``seq``), the rows of the one that starts first (every position once),
    and, per packed row, its position's row among them: :func:`~vlmask.engine.rows.shared_rows`'s arguments.

    Example:
        >>> _first_rows([3, 1], seq=5)  # packed positions 3 4 | 1 2 3 4
        (slice(2, 6, None), tensor([2, 3, 0, 1, 2, 3]))
    """
    low = min(range(len(starts)), key=lambda i: starts[i])
    offset = sum(seq - first for first in starts[:low])
    gather = torch.cat([torch.arange(first - starts[low], seq - starts[low]) for first in starts])
    return slice(offset, offset + seq - starts[low]), gather


def decoder_call(vl: VLModel, dec: DecoderInputs, plan: PassPlan) -> DecoderCall:
    """Set up a decoder pass: cache, inputs, positions, family extras, masks.

    Packed (``plan.starts``): ``dec`` is one sequence and each row recomputes its own
    positions, laid end to end. Batched (no ``starts``): ``dec`` holds one sequence per
    row, each cached up to ``plan.start``, and every row computes positions ``start..``.
    """
    packed, starts, seq = bool(plan.starts), plan.starts or (plan.start,), plan.seq_len
    cached = dec.keys[0].shape[2]
    if min(starts) > cached or (not packed and plan.start != cached):
        raise ValueError(f"a pass from position {min(starts)} does not fit the {cached} cached positions")
    embeds = _packed(dec.embeds[:, :seq], starts, 1)
    buffers = dec.buffers
    if buffers is not None and (cached + embeds.shape[1] > buffers[0][0].shape[2] or not plain_cache(vl)):
        buffers = None  # no room, or layers that keep their states otherwise: concatenated
    cache = shared_cache(vl, dec.keys, dec.values, buffers)
    if dec.position_ids is None:  # the decoder numbers positions itself: every rotary axis is the position
        positions = _packed(torch.arange(seq, device=embeds.device)[None], starts, 1).expand(embeds.shape[0], -1)
    else:
        positions = _packed(dec.position_ids[..., :seq], starts, -1)
    extra = vl.family.packed(dec.extra, starts, seq, plan.removed if packed else ())
    if packed:  # each row's reads, at its own offset in the pack
        offsets = [(piece.start + r - first) for _, piece, first in plan.pieces for r in plan.read]
    else:
        offsets = [r - plan.start for r in plan.read]
    index = torch.tensor(offsets, device=vl.device)

    first_rows = _first_rows(starts, seq) if len(starts) > 1 else None  # the first layer's projections: once each
    projections = first_projections(vl) if first_rows else []

    def decode(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with shared_rows(projections, *first_rows) if first_rows else _NOTHING:
            hidden = vl.decoder(
                inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, **extra
            ).last_hidden_state
        return vl.hf.lm_head(hidden[:, index.to(hidden.device)])

    if packed and len(starts) > 1 and not plan.attention and packed_attention() == "segments":
        masks = segment_masks(vl, plan.allowed, plan.start, starts, cached)
    else:
        pack = (lambda a: packed_allowed(a, plan.start, starts, cached)) if packed else None
        masks = layer_masks(vl, plan.allowed, pack, bare=True)
    return DecoderCall(decode, embeds, positions, index, cache, masks, buffers)
