"""The state of a pass: what reached the decoder, what a pass does to the model, and what it read.

- :class:`DecoderInputs`: what reached the language decoder for one sequence (its embeddings,
  positions, key/value cache and family extras), captured once and cut or extended
  for the passes that reuse it;
- :class:`PassPlan`: what one pass does (the attention edges left per layer, each row's
  intervention, the positions it computes) and reads; it is the only place the engine asks an
  intervention for its edits;
- :class:`Readout`: what a pass read, float32 on CPU, with its own concatenate, select and
  unpack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from interventions import At, Intervention, ModelShape
from vlmask.model.load import VLModel


@dataclass(frozen=True)
class Readout:
    """What a pass measured at the read positions (float32, on CPU).

    Shapes: ``residual (batch, layer, pos, hidden)``, ``heads (batch, layer, pos, head, head_dim)``,
    ``logits (batch, pos, vocab)``; ``residual`` and ``heads`` are empty ``(batch, 0)`` when the
    pass read only logits. ``attention (batch, layer, pos, head, key)``: the attention
    probabilities from each read position to every key, where the pass read them (else empty).

    Example:
        >>> step = Readout(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 1, 5))
        >>> Readout.concat([step, step]).logits.shape
        torch.Size([1, 2, 5])
    """

    residual: torch.Tensor
    heads: torch.Tensor
    logits: torch.Tensor
    attention: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @staticmethod
    def of_layers(
        residual: list[torch.Tensor] | None,
        heads: list[torch.Tensor],
        logits: torch.Tensor,
        num_heads: int,
        attention: torch.Tensor | None = None,
    ) -> Readout:
        """A readout from per-layer reads: ``residual[layer] (batch, pos, hidden)`` (None: logits only),
        ``heads[layer] (batch, pos, head * head_dim)`` and ``attention`` (None: not read)."""
        attention = torch.empty(0) if attention is None else attention
        if residual is None:
            empty = torch.empty(logits.shape[0], 0)
            return Readout(empty, empty, logits, attention)
        return Readout(
            residual=torch.stack(residual, dim=1),
            heads=rearrange(torch.stack(heads, dim=1), "b l p (h d) -> b l p h d", h=num_heads),
            logits=logits,
            attention=attention,
        )

    @staticmethod
    def concat(readouts: Sequence[Readout]) -> Readout:
        """Readouts of the same rows at successive read positions (steps), as one, in order.

        Attention rows of earlier steps have fewer keys: they are padded with zeros (a key
        after the query gets no attention) to the last step's keys.
        """
        attention = torch.empty(0)
        if all(r.attention.numel() for r in readouts):
            keys = max(r.attention.shape[-1] for r in readouts)
            padded = [torch.nn.functional.pad(r.attention, (0, keys - r.attention.shape[-1])) for r in readouts]
            attention = torch.cat(padded, dim=2)
        return Readout(
            torch.cat([r.residual for r in readouts], dim=2),
            torch.cat([r.heads for r in readouts], dim=2),
            torch.cat([r.logits for r in readouts], dim=1),
            attention,
        )

    def select(self, keep: torch.Tensor, other: Readout) -> Readout:
        """``other``'s values where ``keep (batch, pos)`` is True, these elsewhere (``torch.where`` per read);
        the attention read, if any, is this readout's."""
        if not keep.any():
            return self
        return Readout(
            torch.where(keep[:, None, :, None], other.residual, self.residual),
            torch.where(keep[:, None, :, None, None], other.heads, self.heads),
            torch.where(keep[:, :, None], other.logits, self.logits),
            self.attention,
        )

    def unpacked(self, rows: int) -> Readout:
        """A packed pass's readout (batch 1, the rows' reads end to end) as one batch row per row."""
        if self.residual.numel():
            residual = rearrange(self.residual, "1 l (k p) d -> k l p d", k=rows)
            heads = rearrange(self.heads, "1 l (k p) h d -> k l p h d", k=rows)
        else:
            residual = heads = torch.empty(rows, 0)
        logits = rearrange(self.logits, "1 (k p) v -> k p v", k=rows)
        return Readout(residual, heads, logits, self.attention)  # attention is read in one-row packs only


@dataclass(frozen=True)
class DecoderInputs:
    """What reached the language decoder for one sequence (batch 1), as the model computed it.

    ``position_ids`` are the model's own (M-RoPE rows for vision-language models; None when
    the decoder numbers positions itself); ``keys``/``values`` hold each layer's cache
    ``(1, kv_heads, seq, head_dim)``; ``extra`` what else the family's decoder was given
    (Qwen3-VL: the vision positions and DeepStack features).

    ``buffers``, where set (:meth:`stacked`), are each layer's key and value buffers
    ``(batch, kv_heads, capacity, head_dim)`` whose first positions ``keys``/``values`` are: a
    pass writes the keys and values it computes into them in place, after these (no copy of
    the cache), so an earlier, shorter view of the same buffers must not be passed again
    once a later one has been.
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor | None
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    extra: dict[str, Any]
    buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def seq_len(self) -> int:
        """Positions in the sequence (the cache may hold fewer: the last ones still to compute)."""
        return self.embeds.shape[1]

    def append_text(self, vl: VLModel, token: int | Sequence[int]) -> DecoderInputs:
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
        return DecoderInputs(embeds, positions, self.keys, self.values, vl.family.appended(self.extra), self.buffers)

    @staticmethod
    def stacked(parts: Sequence[DecoderInputs], capacity: int) -> DecoderInputs:
        """The rows of ``parts`` (the same positions, as many cached) as one batch, in order, each layer's keys and
        values copied into :attr:`buffers` with room for ``capacity`` positions.

        Example:
            >>> k = torch.zeros(1, 2, 3, 4)
            >>> one = DecoderInputs(torch.zeros(1, 4, 8), None, [k], [k], {})
            >>> both = DecoderInputs.stacked([one, one], capacity=6)
            >>> both.keys[0].shape, both.buffers[0][0].shape
            (torch.Size([2, 2, 3, 4]), torch.Size([2, 2, 6, 4]))
        """
        cached = parts[0].keys[0].shape[2]

        def into(layers: Sequence[torch.Tensor]) -> torch.Tensor:
            first, offset = layers[0], 0
            buffer = first.new_empty(sum(t.shape[0] for t in layers), first.shape[1], capacity, first.shape[3])
            for t in layers:
                buffer[offset : offset + t.shape[0], :, :cached] = t
                offset += t.shape[0]
            return buffer

        keys = [into(layer) for layer in zip(*(p.keys for p in parts), strict=True)]
        values = [into(layer) for layer in zip(*(p.values for p in parts), strict=True)]
        positions = None
        if parts[0].position_ids is not None:
            positions = torch.cat([p.position_ids for p in parts], dim=-2)
        embeds = torch.cat([p.embeds for p in parts])
        views = [k[:, :, :cached] for k in keys], [v[:, :, :cached] for v in values]
        return DecoderInputs(embeds, positions, *views, parts[0].extra, (keys, values))

    def packed_rows(
        self,
        vl: VLModel,
        packed: tuple[list[torch.Tensor], list[torch.Tensor]],
        starts: Sequence[int],
        rows: Sequence[int],
        n: int,
    ) -> DecoderInputs:
        """The first ``n`` positions of rows ``rows`` of a packed pass over these inputs, one batch row each.

        ``packed``: each layer's keys and values as the pass left them (these inputs' cached
        ones, then the rows' recomputed positions end to end, row ``i`` from ``starts[i]`` to
        the sequence's end). A row's own cache is the clean keys before its start, then its
        own; its embeddings and positions are these (the same tokens up to ``n``).
        """
        cached, seq, batch = self.keys[0].shape[2], self.seq_len, len(rows)
        offsets = [cached + sum(seq - first for first in starts[:i]) for i in range(len(starts))]

        def own(clean: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
            pieces = [(clean[:, :, : starts[r]], computed[:, :, offsets[r] : offsets[r] + n - starts[r]]) for r in rows]
            return torch.cat([torch.cat(piece, dim=2) for piece in pieces])

        keys = [own(c, k) for c, k in zip(self.keys, packed[0], strict=True)]
        values = [own(c, v) for c, v in zip(self.values, packed[1], strict=True)]
        positions = None if self.position_ids is None else self.position_ids[..., :n]
        if positions is not None:
            positions = positions.expand(*positions.shape[:-2], batch, n)
        embeds = self.embeds[:, :n].expand(batch, -1, -1)
        return DecoderInputs(embeds, positions, keys, values, vl.family.prefix(self.extra, n))

    def extended(self, cache: Any, start: int, buffers: Any = None) -> DecoderInputs:
        """These inputs with the keys and values of a pass (one packed row, or a batch) that recomputed ``start..``.

        ``cache`` is the pass's (a transformers ``Cache``: these keys, then the ones it
        appended). The row's own cache: the clean keys before ``start``, then the recomputed ones.
        ``buffers``: the :attr:`buffers` the pass wrote into in place (None: it concatenated).
        """
        cached = self.keys[0].shape[2]
        if start == cached:  # the pass started right after the cache: the cache is the row's own already
            keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
            return DecoderInputs(self.embeds, self.position_ids, keys, values, self.extra, buffers)
        keys = [torch.cat([layer.keys[:, :, :start], layer.keys[:, :, cached:]], dim=2) for layer in cache.layers]
        values = [torch.cat([layer.values[:, :, :start], layer.values[:, :, cached:]], 2) for layer in cache.layers]
        return DecoderInputs(self.embeds, self.position_ids, keys, values, self.extra)


@dataclass(frozen=True)
class ModelInputs:
    """What the whole model takes for copies of one prompt: ``input_ids (batch, seq)``, the per-prompt
    ``extra`` inputs for batch 1 (already for ``seq`` positions) and the vision encoder's outputs, reused."""

    input_ids: torch.Tensor
    extra: dict[str, torch.Tensor]
    encoder_outputs: dict[str, Any]


@dataclass(frozen=True)
class PassPlan:
    """What one pass does to the model, and what it reads.

    ``allowed[layer] (batch, query, key)`` are the attention edges left at each layer, for
    queries ``start..``; ``rows[i]`` is row ``i``'s intervention, asked for its activation
    edits; ``read`` the positions read (``internals``: layer and head outputs too, else logits
    only; ``attention``: each layer's attention probabilities too, see
    :mod:`vlmask.engine.attention_read`); ``head_means (layer, head, head_dim)`` the unmodified
    model's mean head outputs, where mean ablation needs them.

    A pass over the whole model gives each row its own batch row. A decoder pass is
    *packed* (``starts`` given): row ``i`` computes only positions ``starts[i]..`` and the
    rows' positions are laid end to end in one sequence, so no position is computed that a
    row does not need. ``removed[i]`` (a decoder pass under ``vision_removal="full"``): the
    vision positions where row ``i`` gets no DeepStack features.

    Every question the engine asks an intervention is a method here (:meth:`build`,
    :meth:`first_changed`, :meth:`needs_head_means`, :meth:`editing`, :meth:`edit_heads`,
    :meth:`edit_hidden`).
    """

    allowed: list[torch.Tensor]
    rows: tuple[Intervention, ...]
    read: tuple[int, ...]
    start: int = 0
    head_means: torch.Tensor | None = None
    starts: tuple[int, ...] = ()
    internals: bool = True
    removed: tuple[tuple[int, ...], ...] = ()
    attention: bool = False

    @staticmethod
    def build(
        unmodified: torch.Tensor,
        interventions: Sequence[Intervention],
        num_layers: int,
        seq_len: int,
        read: Sequence[int],
        *,
        start: int = 0,
        starts: Sequence[int] = (),
        head_means: torch.Tensor | None = None,
        internals: bool = True,
        removed: Sequence[Sequence[int]] = (),
        attention: bool = False,
    ) -> PassPlan:
        """The plan of a pass over positions ``start..seq_len-1`` (``starts``: packed, from ``min(starts)``).

        ``unmodified (max_len, max_len)`` holds the edges the unmodified model allows; each row's
        intervention cuts its own. Layers where every intervention has the same
        ``attention_key`` share one tensor, so memory does not grow with depth.
        """
        rows = tuple(interventions)
        if attention and len(starts) > 1:
            raise ValueError("attention is read in passes whose keys are one sequence: at most one packed row")
        start = min(starts) if starts else start
        edges = unmodified[start:seq_len, :seq_len]
        shared: dict[tuple[Any, ...], torch.Tensor] = {}
        allowed = []
        for layer in range(num_layers):
            keys = tuple(iv.attention_key(layer) for iv in rows)
            if keys not in shared:
                cuts = [
                    None if key is None else iv.blocked_edges(At(layer, seq_len, start))
                    for iv, key in zip(rows, keys, strict=True)
                ]
                shared[keys] = torch.stack([edges if cut is None else edges & ~cut[start:] for cut in cuts])
            allowed.append(shared[keys])
        removed = tuple(tuple(r) for r in removed)
        return PassPlan(allowed, rows, tuple(read), start, head_means, tuple(starts), internals, removed, attention)

    @staticmethod
    def first_changed(interventions: Sequence[Intervention], seq_len: int, num_layers: int) -> list[int]:
        """The first position whose computation each intervention changes (``seq_len`` if none)."""
        shape = ModelShape(num_layers)
        return [iv.first_changed(seq_len, shape) for iv in interventions]

    @staticmethod
    def cut_keys(interventions: Sequence[Intervention], seq_len: int, num_layers: int) -> list[tuple[int, ...]]:
        """The key positions each intervention stops some later query reading, at some layer."""
        out = []
        for iv in interventions:
            cut, seen = torch.zeros(seq_len, dtype=torch.bool), set()
            for layer in range(num_layers):
                key = iv.attention_key(layer)
                if key is not None and key not in seen:
                    seen.add(key)
                    edges = iv.blocked_edges(At(layer, seq_len))
                    if edges is not None:
                        cut |= edges.any(0)
            out.append(tuple(cut.nonzero().flatten().tolist()))
        return out

    @staticmethod
    def needs_head_means(interventions: Sequence[Intervention]) -> bool:
        """Whether any intervention needs the unmodified model's mean head outputs."""
        return any(iv.needs_head_means for iv in interventions)

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

    def editing(self, layer: int, hook: str) -> list[tuple[int, Intervention]]:
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

    def edit_hidden(self, hook: str, layer: int, y: torch.Tensor) -> torch.Tensor:
        """``y (batch, pos, hidden)`` at ``hook`` (``"mlp"``: the MLP output; ``"residual"``: the layer
        output) after each row's ``edit_mlp`` / ``edit_residual``."""
        out = y.clone()
        pieces = self.pieces
        for row, iv in self.editing(layer, hook):
            b, span, first = pieces[row]
            out[b, span] = getattr(iv, f"edit_{hook}")(y[b, span], At(layer, self.seq_len, first))
        return out
