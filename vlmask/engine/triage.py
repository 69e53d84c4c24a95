"""Triage: every knockout's effect estimated from one forward and a few backward passes (attribution patching).

One forward of the clean teacher-forced sequence (prompt plus clean continuation, under the
base intervention) runs with autograd on. The model's attention function (transformers'
``ALL_ATTENTION_FUNCTIONS`` entry, ``sdpa`` or ``eager``, as :mod:`vlmask.engine.attention_read`
reads it) is swapped for one that computes each decoder layer's probabilities
``A (batch, head, query, key)`` from the model's own query and key, with the pass's mask, and
returns the model's own output plus ``A @ V - (A @ V).detach()``: the same numbers, through
which the gradient reaches every ``A``. Everything else (MLP, norms, rotary, DeepStack) is the
model's own code.

Blocking a key set ``U`` in query row ``q`` of a layer changes that row exactly to
``A' = A * [k not in U] / (1 - s_q)`` with ``s_q = sum_{j in U} A_qj`` (the renormalisation:
AtP*'s QK fix, exact at that layer for every row, saturated or not). With ``G = dM/dA`` the
first-order change of a quantity ``M`` is ``sum_{layer, head, q} (s_q r_q - t_q) / (1 - s_q)``
where ``t_q = sum_{j in U} A_qj G_qj`` and ``r_q = sum_k A_qk G_qk``. Each knockout's edges are
its own ``blocked_edges`` at each layer where it acts (``BlockEdges``: those edges only;
windows: their layers only); an edge the base or the model already cuts has ``A = 0``.

The quantities ``M``, per step: the clean top-``TOP_K`` logits and the log-sum-exp of the
rest of the vocabulary (one bucket). Their first-order changes give the log-prob drop of the
clean top token exactly at first order (the buckets partition the vocabulary), and the
Gauss-Newton (Fisher) form of the KL between the clean and the knocked-out distributions
coarse-grained to those ``TOP_K + 1`` buckets, ``0.5 sum_b P_b (d_b - sum_c P_c d_c)^2``
(a lower bound of the full KL's quadratic form: coarse-graining never increases KL).
KL has zero gradient at the clean point, hence the quadratic form.

Under ``vision_removal="full"`` a knockout also withholds the DeepStack features of its
blocked vision positions: the first-order term ``-sum g . f`` over those features ``f`` is added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions import At, Intervention
from vlmask.engine.attention_calls import model_function, swapping
from vlmask.engine.attention_read import attention_probabilities
from vlmask.engine.hooks_backend import installed, layer_hooks
from vlmask.engine.state import DecoderInputs
from vlmask.engine.steps import LayerSteps, layer_masks
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel

TOP_K = 4
"""Vocabulary entries (the clean top ones) whose logit changes the KL estimate follows; the rest is one bucket.

Each costs one backward pass per step. Measured on the benchmark model (S2, 196 vision knockouts), 4 and 8
both put the exact top 10 inside the estimated top 20 (Spearman 0.97 against the exact KL)."""
SATURATED = 0.9
"""A query row is saturated where a knockout removes at least this share of its attention (counted, see README)."""


REPRODUCED = (1e-3, 5e-2)
"""How far ``A @ V`` may be from the model's own attention output (float32/64, then 16-bit models) before
triage refuses the model: its attention then does more than a masked softmax (a sliding window, a
softcap, sinks), and the gradients would be another model's."""


@dataclass(frozen=True)
class Estimates:
    """First-order estimates per knockout and step: ``kl``, ``logprob_drop`` ``(knockout, step)`` (float64);
    ``saturated (knockout,)`` how many (layer, head, query) rows lost at least :data:`SATURATED` of their attention."""

    kl: torch.Tensor
    logprob_drop: torch.Tensor
    saturated: torch.Tensor


class _Tap:
    """While in :meth:`tapping`, each decoder layer's attention returns its probabilities in the graph."""

    def __init__(self, vl: VLModel) -> None:
        self.vl = vl
        self.layers = {id(layer.self_attn): i for i, layer in enumerate(vl.decoder.layers)}
        self.probs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.difference = 0.0  # the largest |A @ V - model's own output| seen

    def _attend(self, module: Any, own: torch.Tensor, query, key, value, mask, scaling) -> torch.Tensor:
        dtype = torch.promote_types(query.dtype, torch.float32)
        rep = query.shape[1] // key.shape[1]
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        mask = None if mask is None else mask[..., : key.shape[-2]]
        probs = attention_probabilities(query, key, mask, scale, dtype)
        mixed = (probs @ value.to(dtype).repeat_interleave(rep, 1)).transpose(1, 2).to(own.dtype)
        self.difference = max(self.difference, float((mixed - own).detach().abs().max()))
        self.probs[self.layers[id(module)]] = probs
        return own.detach() + (mixed - mixed.detach())

    def tapping(self) -> contextlib.AbstractContextManager[None]:
        """While in the block, each decoder layer's attention is the model's own, its probabilities in the graph."""
        implementation = self.vl.attn_implementation

        def wrapper(before: Any, module: Any, query, key, value, mask: Any, **kw: Any):
            own, weights = model_function(module, implementation, before)(module, query, key, value, mask, **kw)
            if id(module) in self.layers:
                own = self._attend(module, own, query, key, value, mask, kw.get("scaling"))
            return own, weights

        return swapping(implementation, wrapper)


@dataclass(frozen=True)
class Traced:
    """The autograd forward: ``logits (read, vocab)``, each layer's ``probs (1, head, seq, seq)``, the DeepStack
    features ``deepstack[level] (vision, hidden)`` (leaves; empty without) and ``difference`` (see :class:`_Tap`)."""

    logits: torch.Tensor
    probs: list[torch.Tensor]
    deepstack: list[torch.Tensor]
    difference: float


def traced_forward(vl: VLModel, dec: DecoderInputs, plan: Any, read: Sequence[int]) -> Traced:
    """The decoder on the whole sequence ``dec`` under ``plan`` (one row: the base), in the autograd graph."""
    seq = dec.seq_len
    clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731 (inference tensors out)
    embeds = dec.embeds.clone().requires_grad_()
    positions = torch.arange(seq, device=embeds.device)[None] if dec.position_ids is None else dec.position_ids
    extra = {
        k: [clone(t) for t in v] if isinstance(v, list) else clone(v)
        for k, v in vl.family.packed(dec.extra, [0], seq).items()
    }
    deepstack = [t.requires_grad_() for t in extra.get("deepstack_visual_embeds", [])]
    index = torch.tensor(list(read), device=vl.device)
    steps = LayerSteps(vl, plan, layer_masks(vl, plan.allowed), index)
    tap = _Tap(vl)
    # the tap outside: the pass's call hands the base's mask to it, then to the model's own function
    with torch.enable_grad(), _frozen(vl.hf), tap.tapping(), steps.attending(), installed(layer_hooks(vl, steps)):
        hidden = vl.decoder(inputs_embeds=embeds, position_ids=clone(positions), use_cache=False, **extra)
        logits = vl.hf.lm_head(hidden.last_hidden_state[0, index])
    missing = [i for i, p in enumerate(tap.probs) if p is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not call the attention function: triage cannot read them")
    tolerance = REPRODUCED[0] if vl.dtype.itemsize >= 4 else REPRODUCED[1]
    if tap.difference > tolerance:  # e.g. a sliding window, a softcap or attention sinks, which A @ V leaves out
        raise VlmaskError(
            f"triage's attention A @ V differs from this model's own attention output by {tap.difference:.3g} "
            f"(more than {tolerance:g}): the model's attention does more than a masked softmax, so the "
            "estimates would be for another model; run the exact sweep (no triage)"
        )
    return Traced(logits, list(tap.probs), deepstack, tap.difference)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradient for the weights while in the block (the backward passes need the activations' only)."""
    wanted = [p for p in model.parameters() if p.requires_grad]
    for p in wanted:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in wanted:
            p.requires_grad_(True)


def check_estimable(values: Sequence[Intervention], num_layers: int) -> None:
    """Refuse knockouts that do more than cut attention edges: triage estimates edge cuts only."""
    for iv in values:
        other = {h for layer in range(num_layers) for h in iv.hooks(layer)} - {"attention"}
        if other:
            raise VlmaskError(
                f"triage estimates knockouts that cut attention edges (BlockKeys, BlockEdges), but {iv!r} also edits"
                f" {', '.join(sorted(other))}: run it without triage"
            )


@dataclass(frozen=True)
class _Rows:
    """The query rows knockouts change at one layer: each blocked edge ``(q, k)`` and its ``row``; per row its query
    ``row_q``, its knockout ``row_knockout``, the attention ``s (head, row)`` it loses and ``rest`` it keeps."""

    q: torch.Tensor
    k: torch.Tensor
    row: torch.Tensor
    row_q: torch.Tensor
    row_knockout: torch.Tensor
    s: torch.Tensor
    rest: torch.Tensor


def _edges(values: Sequence[Intervention], allowed: list[torch.Tensor], seq: int) -> list[torch.Tensor | None]:
    """Per layer, every knockout's blocked edges that the pass allows, as rows ``(knockout, q, k)`` (None: none).

    ``allowed[layer] (1, seq, seq)`` are the base pass's edges; layers where every knockout has the
    same ``attention_key`` share one list, as in :meth:`~vlmask.engine.state.PassPlan.build`.
    """
    shared: dict[tuple[Any, ...], torch.Tensor | None] = {}
    out = []
    for layer, edges in enumerate(allowed):
        keys = tuple(iv.attention_key(layer) for iv in values)
        if (keys, id(edges)) not in shared:
            found = []
            for i, (iv, key) in enumerate(zip(values, keys, strict=True)):
                cut = None if key is None else iv.blocked_edges(At(layer, seq))
                if cut is not None:
                    pairs = (cut & edges[0].cpu()).nonzero()
                    found.append(torch.cat([torch.full_like(pairs[:, :1], i), pairs], dim=1))
            shared[keys, id(edges)] = torch.cat(found) if found else None
        out.append(shared[keys, id(edges)])
    return out


def _layer_rows(probs: torch.Tensor, edges: torch.Tensor) -> _Rows:
    """The changed rows of ``probs (head, seq, seq)`` (float64 sums) for ``edges (n, 3)`` of :func:`_edges`."""
    seq = probs.shape[-1]
    edges = edges.to(probs.device)
    knockout, q, k = edges.unbind(1)
    rows, row = torch.unique(knockout * seq + q, return_inverse=True)
    lost = torch.zeros(probs.shape[0], len(rows), dtype=torch.float64, device=probs.device)
    lost.index_add_(1, row, probs[:, q, k].double())
    total = probs.sum(-1).double()[:, rows % seq]
    rest = (total - lost).clamp_min(torch.finfo(torch.float64).tiny)
    return _Rows(q, k, row, rows % seq, rows // seq, lost, rest)


def _first_order(rows: _Rows, probs: torch.Tensor, grad: torch.Tensor, count: int) -> torch.Tensor:
    """``(knockout,)``: ``sum_{head, q} (s r - t) / (1 - s)`` at one layer, for ``grad = dM/dA (head, seq, seq)``."""
    weighted = probs * grad
    t = torch.zeros_like(rows.s).index_add_(1, rows.row, weighted[:, rows.q, rows.k].double())
    r = weighted.sum(-1).double()[:, rows.row_q]
    per_row = ((rows.s * r - t) / rows.rest).sum(0)
    return torch.zeros(count, dtype=torch.float64, device=per_row.device).index_add_(0, rows.row_knockout, per_row)


def _buckets(logits: torch.Tensor, k: int, target: int | None = None) -> torch.Tensor:
    """``(k + 1,)``: the ``k`` largest logits (the clean top token first), then the log-sum-exp of all others.

    With a ``target`` (an answer's token, measured instead of the top one), it comes first, then the
    ``k - 1`` largest of the others.
    """
    top = logits.topk(k).indices
    if target is not None:
        rest = top[top != target][: k - 1]
        top = torch.cat([torch.tensor([target], device=top.device), rest])
    others = torch.ones_like(logits, dtype=torch.bool)
    others[top] = False
    return torch.cat([logits[top], logits[others].logsumexp(0, keepdim=True)])


def _deepstack_ranks(dec: DecoderInputs, removed: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per knockout, the indices among the vision positions (DeepStack rows) of its ``removed`` positions."""
    visual = dec.extra.get("visual")
    if visual is None or not any(removed):
        return [torch.empty(0, dtype=torch.long) for _ in removed]
    rank = visual[0].long().cumsum(0) - 1
    return [rank[list(gone)].cpu() if gone else torch.empty(0, dtype=torch.long) for gone in removed]


def _bucket_changes(
    traced: Traced, rows: list[_Rows | None], ranks: list[torch.Tensor], k: int, targets: Sequence[int] | None
) -> torch.Tensor:
    """``(step, bucket, knockout)``: each bucket's first-order change under each knockout (backward per bucket)."""
    count = len(ranks)
    probs = [p.detach()[0] for p in traced.probs]
    features = [f.detach() for f in traced.deepstack]
    out = torch.zeros(traced.logits.shape[0], k + 1, count, dtype=torch.float64)
    for step, logits in enumerate(traced.logits):
        buckets = _buckets(logits, k, None if targets is None else targets[step])
        for b in range(k + 1):
            grads = torch.autograd.grad(
                buckets[b], traced.probs + traced.deepstack, retain_graph=True, allow_unused=True
            )
            change = torch.zeros(count, dtype=torch.float64)
            for r, p, g in zip(rows, probs, grads[: len(probs)], strict=True):
                if r is not None and g is not None:
                    change += _first_order(r, p, g[0], count).cpu()
            for f, g in zip(features, grads[len(probs) :], strict=True):
                if g is not None:  # withheld DeepStack features: -g . f at each removed vision row
                    gf = (g * f).sum(-1).double().cpu()
                    change -= torch.stack([gf[r].sum() for r in ranks])
            out[step, b] = change
    return out


def estimate(
    vl: VLModel,
    dec: DecoderInputs,
    plan: Any,
    values: Sequence[Intervention],
    read: Sequence[int],
    removed: Sequence[Sequence[int]] = (),
    targets: Sequence[int] | None = None,
) -> Estimates:
    """First-order KL and log-prob drop of each knockout in ``values`` at each read position (the steps).

    ``dec`` is the clean teacher-forced sequence (keys and values unused), ``plan`` the base's
    :class:`~vlmask.engine.state.PassPlan` over all of it (one row, from position 0), ``removed[i]``
    the vision positions whose DeepStack features knockout ``i`` withholds, ``targets`` (per step) the
    measured tokens where they are not the clean top ones (an answer's).

    Example:
        >>> from vlmask.engine.passes import NOTHING, PromptPasses
        >>> from vlmask.inputs.prompt import build_prompt
        >>> built = build_prompt(vl.processor, "what color is the circle ?", ["examples/shapes.png"], "auto")
        >>> ids = built.inputs["input_ids"]
        >>> passes = PromptPasses.of(vl, built, ids.shape[1])
        >>> clean = passes.clean_pass(ids, 1)
        >>> plan = passes.plan([NOTHING], ids.shape[1], [ids.shape[1] - 1], internals=False)
        >>> from interventions import BlockKeys
        >>> est = estimate(vl, clean.inputs, plan, [BlockKeys((3,)), BlockKeys((5,))], [ids.shape[1] - 1])
        >>> est.kl.shape, bool((est.kl >= 0).all())
        (torch.Size([2, 1]), True)
    """
    check_estimable(values, vl.num_layers)
    removed = list(removed) or [() for _ in values]
    traced = traced_forward(vl, dec, plan, read)
    edges = _edges(values, plan.allowed, dec.seq_len)
    rows = [None if e is None else _layer_rows(p.detach()[0], e) for p, e in zip(traced.probs, edges, strict=True)]
    k = min(TOP_K, traced.logits.shape[-1] - 1)
    changes = _bucket_changes(traced, rows, _deepstack_ranks(dec, removed), k, targets)
    picked = [None] * len(traced.logits) if targets is None else targets
    masses = torch.stack(
        [torch.softmax(_buckets(z.detach(), k, t).double(), 0) for z, t in zip(traced.logits, picked, strict=True)]
    ).cpu()
    mean = (masses[:, :, None] * changes).sum(1)  # (step, knockout)
    logprob = changes[:, 0] - mean
    kl = 0.5 * (masses[:, :, None] * (changes - mean[:, None]).square()).sum(1)
    saturated = torch.zeros(len(values), dtype=torch.long)
    for r in rows:
        if r is not None:
            saturated.index_add_(0, r.row_knockout.cpu(), (r.s >= SATURATED).sum(0).cpu())
    return Estimates(kl.T.contiguous(), -logprob.T.contiguous(), saturated)
