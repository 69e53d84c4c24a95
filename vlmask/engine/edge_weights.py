"""The edges knockouts cut, as weights: what each layer's knockouts change for any gradient (triage's algebra).

:func:`cut_edges` lists every knockout's blocked edges that a pass allows, per layer; :class:`EdgeIndex` turns one
list into gathers; :class:`LayerEdges` holds one layer's edge weights (from its attention probabilities ``A``)
and gives, for a gradient ``g = dM/d(A @ V)``, every knockout's first-order change of ``M``: the exact
renormalised row change ``(s r - t) / (1 - s)`` of :mod:`vlmask.engine.triage`, summed as block matrix products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions import At, Intervention

SATURATED = 0.9
"""A query row is saturated where a knockout removes at least this share of its attention (counted, see README)."""


def cut_edges(values: Sequence[Intervention], allowed: list[torch.Tensor], seq: int) -> list[torch.Tensor | None]:
    """Per layer, every knockout's blocked edges that the pass allows, as rows ``(knockout, q, k)`` (None: none).

    ``allowed[layer] (1, seq, seq)`` are the base pass's edges; layers where every knockout has the
    same ``attention_key`` share one tensor, as in :meth:`~vlmask.engine.state.PassPlan.build`.
    """
    shared: dict[tuple[Any, ...], torch.Tensor | None] = {}
    out = []
    for layer, edges in enumerate(allowed):
        keys = tuple(iv.attention_key(layer) for iv in values)
        if (keys, id(edges)) not in shared:
            found = []
            kept = edges[0].cpu()
            for i, (iv, key) in enumerate(zip(values, keys, strict=True)):
                pairs = None if key is None else iv.blocked_pairs(At(layer, seq))
                if pairs is not None and len(pairs):
                    pairs = pairs[kept[pairs[:, 0], pairs[:, 1]]]
                    found.append(torch.cat([torch.full_like(pairs[:, :1], i), pairs], dim=1))
            shared[keys, id(edges)] = torch.cat(found) if found else None
        out.append(shared[keys, id(edges)])
    return out


CHUNK = 2**24
"""The most elements of one dense block of edge weights ``(head, query, pair)`` (see :meth:`LayerEdges.changes`)."""
BLOCK = 128
"""The most knockouts (``r`` terms) or pairs (``t`` terms) in one block of :meth:`LayerEdges.changes`: a block's
queries start at its lowest edge's, so smaller blocks skip more of the rows before each key (a causal model's
weights are zero there)."""


@dataclass(frozen=True)
class EdgeIndex:
    """One edge list of :func:`_edges` as gathers, edges sorted by (knockout, key): each edge's query ``q``, flat
    ``(k, q)`` index ``flat`` (key-major: a pair's edges lie together), ``row`` and ``pair``; per row (a knockout's
    query) its query ``row_q`` and knockout ``row_knockout``; per pair (a knockout's key) its key ``pair_key``,
    knockout ``pair_knockout`` and first edge ``pair_start`` (one more entry: the edge count); ``rows_are_edges``:
    each row is one edge, the rows in order."""

    q: torch.Tensor
    flat: torch.Tensor
    row: torch.Tensor
    pair: torch.Tensor
    row_q: torch.Tensor
    row_knockout: torch.Tensor
    pair_key: torch.Tensor
    pair_knockout: torch.Tensor
    pair_start: list[int]
    rows_are_edges: bool

    @staticmethod
    def of(edges: torch.Tensor, seq: int, device: torch.device, queries: int | None = None) -> EdgeIndex:
        """From ``edges (edge, 3)`` rows ``(knockout, q, k)`` over ``seq`` keys and ``queries`` query rows (``seq``
        unless given: a layer that computes fewer rows numbers its queries among them)."""
        queries = seq if queries is None else queries
        knockout, q, k = edges.to(device).unbind(1)
        order = torch.argsort(knockout * seq + k, stable=True)
        knockout, q, k = knockout[order], q[order], k[order]
        rows, row = torch.unique(knockout * seq + q, return_inverse=True)
        pairs, pair, counts = torch.unique_consecutive(knockout * seq + k, return_inverse=True, return_counts=True)
        starts = [0, *counts.cumsum(0).tolist()]
        same = len(rows) == len(row) and bool((row == torch.arange(len(row), device=device)).all())
        flat = k * queries + q
        return EdgeIndex(q, flat, row, pair, rows % seq, rows // seq, pairs % seq, pairs // seq, starts, same)


@dataclass(frozen=True)
class LayerEdges:
    """What one layer's knockouts change, for any gradient ``g = dM/d(A @ V)`` (so ``dM/dA = g V^T``).

    A knockout's first-order change of ``M`` is ``sum_rows row_weight * r[row_q] - sum_edges edge_weight *
    (g_q . V_k)`` (and over heads), with ``r_q = g_q . (A @ V)_q = sum_k A_qk dM/dA_qk``: the row's
    ``(s r - t) / (1 - s)``, split into its terms (one tensor where each row is one edge: the weights are the
    same). ``saturated (row,)`` counts the heads where the row lost at least :data:`SATURATED` of its attention.
    """

    index: EdgeIndex
    row_weight: torch.Tensor
    edge_weight: torch.Tensor
    saturated: torch.Tensor

    @staticmethod
    def of(probs: torch.Tensor, index: EdgeIndex) -> LayerEdges:
        """From one layer's ``probs (head, seq, seq)`` (sums in its precision, at least float32's)."""
        heads, dtype = probs.shape[0], torch.promote_types(probs.dtype, torch.float32)
        # key-major, each pair's edges read in a run: a copy, unless probs is laid out so (attention_probabilities)
        by_key = probs.transpose(-1, -2).reshape(heads, -1)
        cut = by_key[:, index.flat].to(dtype)  # (head, edge): A at each cut edge
        single = index.rows_are_edges  # one edge per row, in order (one key per knockout)
        lost = cut if single else torch.zeros(heads, len(index.row_q), dtype=dtype, device=probs.device)
        if not single:
            lost.index_add_(1, index.row, cut)
        rest = (probs.sum(-1).to(dtype)[:, index.row_q] - lost).clamp_min(torch.finfo(dtype).tiny)
        saturated = (lost >= SATURATED).sum(0, dtype=torch.int32)
        row_weight = lost.div_(rest) if single else lost / rest  # single: lost is cut, no longer needed
        return LayerEdges(index, row_weight, row_weight if single else cut / rest[:, index.row], saturated)

    def changes(self, grads: torch.Tensor, outputs: torch.Tensor, values: torch.Tensor, count: int) -> torch.Tensor:
        """``(bucket, knockout)`` for ``grads (bucket, head, seq, head_dim)``, at ``outputs`` ``A @ V`` and ``values``
        ``V`` ``(head, seq, head_dim)``: each term a matrix product per block of knockouts or pairs (:data:`BLOCK`,
        :data:`CHUNK`)."""
        ix, (buckets, heads, seq, width) = self.index, grads.shape
        dtype = torch.promote_types(grads.dtype, torch.float32)  # a 16-bit model's gradients: summed in float32
        grads, outputs, values = grads.to(dtype), outputs.to(dtype), values.to(dtype)
        r = (grads * outputs[None]).sum(-1)  # (bucket, head, query)
        out = torch.zeros(buckets, count, dtype=torch.float64, device=grads.device)
        step = min(max(1, CHUNK // (heads * seq)), BLOCK)
        single = ix.rows_are_edges  # each row one edge, of one weight: its r term rides in the t terms' product
        for first in range(0, 0 if single else count, step):  # the r terms, a block of knockouts at a time
            last = min(first + step, count)
            rows = slice(*torch.searchsorted(ix.row_knockout, torch.tensor([first, last], device=r.device)).tolist())
            if rows.start == rows.stop:
                continue
            low = int(ix.row_q[rows].min())  # the block's first query: none before it has a weight
            weights = torch.zeros(heads, seq - low, last - first, dtype=r.dtype, device=r.device)
            weights[:, ix.row_q[rows] - low, ix.row_knockout[rows] - first] = self.row_weight[:, rows].to(r.dtype)
            out[:, first:last] += (r[:, :, low:].reshape(buckets, -1) @ weights.reshape(-1, last - first)).double()
        carried = torch.cat([grads, r[..., None]], -1) if single else grads  # single: r as one more column
        for first in range(0, len(ix.pair_key), step):  # the t terms, a block of pairs at a time
            last = min(first + step, len(ix.pair_key))
            edges = slice(ix.pair_start[first], ix.pair_start[last])
            low = int(ix.q[edges].min())
            weights = torch.zeros(heads, last - first, seq - low, dtype=dtype, device=grads.device)
            weights[:, ix.pair[edges] - first, ix.q[edges] - low] = self.edge_weight[:, edges].to(dtype)
            mixed = weights[None] @ carried[:, :, low:]  # (bucket, head, pair, head_dim): sum_q weight * g_q
            t = (mixed[..., :width] * values[:, ix.pair_key[first:last]][None]).sum((1, 3))  # (bucket, pair)
            if single:  # the r term: sum_q weight * r_q
                t = t - mixed[..., width].sum(1)
            out.index_add_(1, ix.pair_knockout[first:last], -t.double())
        return out


def keeper(
    edges: list[torch.Tensor | None], rows: Sequence[int] = ()
) -> Callable[[int, torch.Tensor], LayerEdges | None]:
    """``keep(layer, probs)`` for :func:`~vlmask.engine.triage.traced_forward`: the layer's :class:`LayerEdges` of
    ``probs (1, head, seq, seq)`` (None where no knockout cuts an edge), made as the forward reaches it; layers
    sharing edges share gathers. A layer that computes only query ``rows`` (``probs (1, head, len(rows), seq)``:
    the last one, where nothing else reaches what is measured) keeps its edges at those rows.

    Example:
        >>> edges = [torch.tensor([[0, 2, 1], [0, 3, 1], [1, 3, 2]])]  # (knockout, query, key)
        >>> keep = keeper(edges, rows=[3])
        >>> probs = torch.full((1, 1, 1, 4), 0.25)  # one head, query row 3 only
        >>> keep(0, probs).index.row_knockout.tolist(), keep(0, probs).row_weight.tolist()
        ([0, 1], [[0.3333333432674408, 0.3333333432674408]])
    """
    indices: dict[tuple[int, torch.device, int], EdgeIndex | None] = {}

    def keep(layer: int, probs: torch.Tensor) -> LayerEdges | None:
        if edges[layer] is None:
            return None
        queries, seq = probs.shape[-2:]
        key = id(edges[layer]), probs.device, queries  # a model split over devices: each device its own gathers
        if key not in indices:
            cut = edges[layer] if queries == seq else at_rows(edges[layer], rows, seq)
            indices[key] = None if cut is None else EdgeIndex.of(cut, seq, probs.device, queries)
        return None if indices[key] is None else LayerEdges.of(probs[0], indices[key])

    return keep


def at_rows(edges: torch.Tensor, rows: Sequence[int], seq: int) -> torch.Tensor | None:
    """The ``edges (edge, 3)`` ``(knockout, q, k)`` whose query is one of ``rows``, each query numbered among them
    (None: none is).

    Example:
        >>> at_rows(torch.tensor([[0, 2, 1], [0, 3, 1], [1, 4, 2]]), [4, 3], seq=5).tolist()
        [[0, 1, 1], [1, 0, 2]]
    """
    where = torch.full((seq,), -1, dtype=edges.dtype)
    where[torch.as_tensor(list(rows), dtype=torch.long)] = torch.arange(len(rows), dtype=edges.dtype)
    found = where[edges[:, 1].cpu()].to(edges.device)
    if not bool((found >= 0).any()):
        return None
    picked = edges[found >= 0].clone()
    picked[:, 1] = found[found >= 0]
    return picked
