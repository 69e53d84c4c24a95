"""Triage: every knockout's effect estimated from one forward and a few backward passes (attribution patching).

One forward of the clean teacher-forced sequence (prompt plus clean continuation, under the
base intervention) runs with autograd on, through the model's own code, its own attention
function (transformers' ``ALL_ATTENTION_FUNCTIONS`` entry, ``sdpa`` or ``eager``) included. That
function is wrapped (:mod:`vlmask.engine.attention_calls`) so that each decoder layer's
attention output ``O`` is kept, and beside it, outside the graph, its probabilities
``A (batch, head, query, key)`` rebuilt from the model's own query and key with the pass's mask
(:mod:`vlmask.engine.attention_read`) and its values ``V``; triage refuses a model whose
``A @ V`` is not its own ``O`` (:data:`REPRODUCED`).

Blocking a key set ``U`` in query row ``q`` of a layer changes that row exactly to
``A' = A * [k not in U] / (1 - s_q)`` with ``s_q = sum_{j in U} A_qj`` (the renormalisation:
AtP*'s QK fix, exact at that layer for every row, saturated or not). With ``G = dM/dA`` the
first-order change of a quantity ``M`` is ``sum_{layer, head, q} (s_q r_q - t_q) / (1 - s_q)``
where ``t_q = sum_{j in U} A_qj G_qj`` and ``r_q = sum_k A_qk G_qk``. ``A`` reaches ``M`` only
through ``O = A @ V``, so ``G_qk = g_q . V_k`` with ``g = dM/dO``: the backward passes need the
gradient at each layer's output only (through the model's own attention backward), and
``r_q = g_q . O_q``. Each knockout's edges are its own ``blocked_pairs`` at each layer where it
acts (``BlockEdges``: those edges only; windows: their layers only); an edge the base or the
model already cuts has ``A = 0``.

The quantities ``M``, per step: the clean top-``TOP_K`` logits and the log-sum-exp of the
rest of the vocabulary (one bucket). Their first-order changes ``d_b`` give the log-prob drop of
the clean top token exactly at first order (the buckets partition the vocabulary), and the
Gauss-Newton (Fisher) form of the KL between the clean and the knocked-out distributions
coarse-grained to those ``TOP_K + 1`` buckets, ``0.5 sum_b P_b (d_b - sum_c P_c d_c)^2`` (a lower
bound of the full KL's quadratic form: coarse-graining never increases KL). KL has zero gradient
at the clean point, hence the quadratic form. Neither form changes when every ``d_b`` moves by
the same amount, so each step's one (batched) backward pass differentiates the ``TOP_K``
differences from the last bucket: ``TOP_K`` gradients, not ``TOP_K + 1``.

Under ``vision_removal="full"`` a knockout also withholds the DeepStack features of its
blocked vision positions: the first-order term ``-sum g . f`` over those features ``f`` is added.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions import Intervention
from vlmask.engine.attention_calls import model_function, swapping
from vlmask.engine.attention_read import attention_probabilities
from vlmask.engine.edge_weights import LayerEdges, cut_edges, keeper
from vlmask.engine.hooks_backend import installed, layer_hooks
from vlmask.engine.state import DecoderInputs
from vlmask.engine.steps import LayerSteps, layer_masks
from vlmask.errors import VlmaskError
from vlmask.model.load import VLModel

log = logging.getLogger(__name__)

TOP_K = 4
"""Vocabulary entries (the clean top ones) whose logit changes the KL estimate follows; the rest is one bucket.

Each adds a gradient to each step's batched backward pass. Measured on the benchmark model (S2, 196 vision
knockouts, two images), 4 and 8 put the exact top 10 inside the estimated top 20 (Spearman 0.94-0.98 against the
exact KL); 3 missed 2 of 10."""


CHECKED = 8
"""Triage compares ``A @ V`` with the model's own attention output on every this-many-th query row (and the last):
a sliding window, a softcap or sinks change rows throughout, so a sample finds them at an eighth of the work."""
REPRODUCED = (1e-3, 5e-2)
"""How far ``A @ V`` may be from the model's own attention output (float32/64, then 16-bit models) before
triage refuses the model: its attention then does more than a masked softmax (a sliding window, a
softcap, sinks), and the gradients would be another model's."""


@dataclass(frozen=True)
class Estimates:
    """First-order estimates per knockout and step: ``kl``, ``logprob_drop`` ``(knockout, step)`` (float64);
    ``saturated (knockout,)`` how many (layer, head, query) rows lost at least
    :data:`~vlmask.engine.edge_weights.SATURATED` of their attention."""

    kl: torch.Tensor
    logprob_drop: torch.Tensor
    saturated: torch.Tensor


class _Tap:
    """While in :meth:`tapping`, each decoder layer's attention output (the model's own, in the graph) is kept, with
    ``keep(layer, A)`` of its probabilities ``A`` (``A`` itself by default: each layer's is ``head x seq^2``, so
    :func:`estimate` keeps only what it needs of it) and values ``V`` (detached, rebuilt from the model's query and
    key); ``difference`` is the largest gap between ``A @ V`` and the model's own output, on the last query row and
    every :data:`CHECKED`-th before it."""

    def __init__(self, vl: VLModel, keep: Callable[[int, torch.Tensor], Any] | None = None) -> None:
        self.vl = vl
        self.keep = keep or (lambda layer, probs: probs)
        self.layers = {id(layer.self_attn): i for i, layer in enumerate(vl.decoder.layers)}
        self.seen: set[int] = set()
        self.mixed: list[torch.Tensor | None] = [None] * len(self.layers)  # float32 A @ V of a 16-bit model
        self.kept: list[Any] = [None] * len(self.layers)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.values: list[torch.Tensor | None] = [None] * len(self.layers)
        self.difference = 0.0  # the largest |A @ V - model's own output| seen
        self.causal: dict[int, tuple[torch.Tensor, bool]] = {}  # id(mask): (mask, whether plain causal)

    def _attend(self, module: Any, own: torch.Tensor, query, key, value, mask, scaling) -> torch.Tensor:
        with torch.no_grad():
            dtype = torch.promote_types(query.dtype, torch.float32)
            rep = query.shape[1] // key.shape[1]
            scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
            mask = None if mask is None else mask[..., : key.shape[-2]]
            probs = attention_probabilities(query, key, mask, scale, dtype, key_major=True)  # gathered by key
            values = value.to(dtype).repeat_interleave(rep, 1)
            layer = self.layers[id(module)]
            # a 16-bit output is too coarse for r where a row loses most of its attention: A @ V kept, every row;
            # else the model's own output is A @ V, checked on the last row and every CHECKED-th
            coarse = own.dtype.itemsize < 4
            rows = slice(None) if coarse else torch.arange(query.shape[-2] - 1, -1, -CHECKED, device=probs.device)
            mixed = probs[:, :, rows] @ values  # (1, head, row, head_dim), in float32 at least
            self.difference = max(self.difference, float((mixed.transpose(1, 2) - own[:, rows]).abs().max()))
            if coarse:
                self.mixed[layer] = mixed
            self.kept[layer] = self.keep(layer, probs)
        self.seen.add(layer)
        outputs = own.transpose(1, 2)  # what the layer reads on: the gradient's way to this layer's output
        self.outputs[layer], self.values[layer] = outputs, values
        return outputs.transpose(1, 2)

    def _causal(self, mask: Any, query: torch.Tensor, key: torch.Tensor) -> bool:
        """Whether boolean ``mask`` lets each query see exactly the keys up to its own (queries and keys the same)."""
        seq = query.shape[-2]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or key.shape[-2] != seq or seq < 2:
            return False
        if mask.shape[-2:] != (seq, seq) or mask.numel() != seq * seq:
            return False
        if id(mask) not in self.causal:  # layers share their masks: each one compared once
            plain = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril_()
            self.causal[id(mask)] = (mask, torch.equal(mask.reshape(seq, seq), plain))
        return self.causal[id(mask)][1]

    def tapping(self) -> contextlib.AbstractContextManager[None]:
        """While in the block, each decoder layer's attention is the model's own, its probabilities in the graph."""
        implementation = self.vl.attn_implementation

        def wrapper(before: Any, module: Any, query, key, value, mask: Any, **kw: Any):
            # a plain causal mask goes to transformers' own sdpa as none: its causal kernel (about half the work,
            # forward and backward), for the decoder's layers only, where the module is causal
            bare = implementation == "sdpa" and before is None and id(module) in self.layers and "is_causal" not in kw
            bare = bare and getattr(module, "is_causal", True) and self._causal(mask, query, key)
            given = None if bare else mask
            own, weights = model_function(module, implementation, before)(module, query, key, value, given, **kw)
            if id(module) in self.layers:
                own = self._attend(module, own, query, key, value, mask, kw.get("scaling"))
            return own, weights

        return swapping(implementation, wrapper)


@dataclass(frozen=True)
class Traced:
    """The autograd forward: ``logits (read, vocab)``; per layer its attention output ``outputs (1, head, seq,
    head_dim)`` (the model's own, in the graph: ``dM/dA = (dM/d outputs) V^T``), and, detached, ``kept``
    (``keep(layer, A)`` of the probabilities ``A (1, head, seq, seq)``: ``A`` by default), ``values`` ``V`` (one
    per query head), ``mixed`` (a 16-bit model's ``A @ V`` in float32, else None: its own output is ``A @ V``); the
    DeepStack features ``deepstack[level] (vision, hidden)`` (leaves; empty without) and ``difference`` (see
    :class:`_Tap`)."""

    logits: torch.Tensor
    outputs: list[torch.Tensor]
    kept: list[Any]
    values: list[torch.Tensor]
    mixed: list[torch.Tensor | None]
    deepstack: list[torch.Tensor]
    difference: float


def traced_forward(
    vl: VLModel,
    dec: DecoderInputs,
    plan: Any,
    read: Sequence[int],
    keep: Callable[[int, torch.Tensor], Any] | None = None,
    every_row: bool = False,
) -> Traced:
    """The decoder on the whole sequence ``dec`` under ``plan`` (one row: the base), in the autograd graph; of each
    layer's probabilities, ``keep(layer, A)`` is kept (``A`` itself without ``keep``).

    The last layer computes only the ``read`` query rows (nothing else reaches the logits), as a pass does where
    it can (:class:`~vlmask.engine.steps.LayerSteps`): its ``A``, output and values are those rows' (``A (1, head,
    len(read), seq)``), unless ``every_row`` or the base edits that layer."""
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
    steps = LayerSteps(vl, plan, layer_masks(vl, plan.allowed), index, narrow_attention=not every_row)
    tap = _Tap(vl, keep)
    # the tap outside: the pass's call hands the base's mask to it, then to the model's own function
    with torch.enable_grad(), _frozen(vl.hf), tap.tapping(), steps.attending(), installed(layer_hooks(vl, steps)):
        hidden = vl.decoder(inputs_embeds=embeds, position_ids=clone(positions), use_cache=False, **extra)
        logits = vl.hf.lm_head(hidden.last_hidden_state[0, index])
    missing = sorted(set(range(len(tap.layers))) - tap.seen)
    if missing:
        raise RuntimeError(f"decoder layers {missing} did not call the attention function: triage cannot read them")
    tolerance = REPRODUCED[0] if vl.dtype.itemsize >= 4 else REPRODUCED[1]
    if tap.difference > tolerance:  # e.g. a sliding window, a softcap or attention sinks, which A @ V leaves out
        raise VlmaskError(
            f"triage's attention A @ V differs from this model's own attention output by {tap.difference:.3g} "
            f"(more than {tolerance:g}): the model's attention does more than a masked softmax, so the "
            "estimates would be for another model; run the exact sweep (no triage)"
        )
    return Traced(logits, list(tap.outputs), tap.kept, list(tap.values), tap.mixed, deepstack, tap.difference)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradient for the weights while in the block (the backward passes need the activations' only).

    Restored by name: a device map's offload hooks replace a layer's weights as it runs (their placeholders are
    made again from the frozen ones, some in an earlier pass's inference mode, where theirs is restored).
    """
    wanted = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in wanted:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in wanted and not p.requires_grad:
                with torch.inference_mode(p.is_inference()):
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


def _deepstack_index(dec: DecoderInputs, removed: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepStack rows (indices among the vision positions) that knockouts withhold, and each one's knockout."""
    visual = dec.extra.get("visual")
    if visual is None or not any(removed):
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    rank = (visual[0].long().cumsum(0) - 1).cpu()
    knockout = torch.cat([torch.full((len(gone),), i, dtype=torch.long) for i, gone in enumerate(removed)])
    return torch.cat([rank[list(gone)] for gone in removed if gone]), knockout


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``d outputs[b] / d inputs`` for every ``b``, stacked on a new first dimension (one batched backward pass).

    Falls back to one backward per output where the graph has an operation autograd cannot batch.
    """
    eye = torch.eye(len(outputs), dtype=outputs.dtype, device=outputs.device)
    try:
        return list(
            torch.autograd.grad(outputs, inputs, eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
        )
    except RuntimeError as error:  # e.g. an operation with no batching rule (vmap)
        log.info("triage: one backward pass per bucket, the batched one failed (%s)", error)
    each = [torch.autograd.grad(o, inputs, retain_graph=True, allow_unused=True) for o in outputs]
    return [None if g[0] is None else torch.stack(g) for g in zip(*each, strict=True)]


def _bucket_changes(
    traced: Traced,
    layers: list[LayerEdges | None],
    withheld: tuple[torch.Tensor, torch.Tensor],
    k: int,
    count: int,
    targets: Sequence[int] | None,
) -> torch.Tensor:
    """``(step, bucket, knockout)``: each bucket's first-order change under each knockout, less the last bucket's
    (one batched backward per step, of the ``k`` differences)."""
    mixed = [(o.detach() if m is None else m)[0] for o, m in zip(traced.outputs, traced.mixed, strict=True)]
    values = [v[0] for v in traced.values]
    rank, owner = withheld
    withholding = traced.deepstack if len(rank) else []  # features no knockout withholds: no gradient wanted
    features = [f.detach() for f in withholding]
    out = torch.zeros(traced.logits.shape[0], k + 1, count, dtype=torch.float64)
    for step, logits in enumerate(traced.logits):
        buckets = _buckets(logits, k, None if targets is None else targets[step])
        # each bucket's change less the last one's: the KL and log-prob forms do not see a shift of every bucket
        grads = _grads(buckets[:-1] - buckets[-1], traced.outputs + withholding)
        change = torch.zeros(k, count, dtype=torch.float64, device=logits.device)
        for layer, o, v, g in zip(layers, mixed, values, grads[: len(mixed)], strict=True):
            if layer is not None and g is not None:
                change += layer.changes(g[:, 0], o, v, count).to(change.device)
        for f, g in zip(features, grads[len(mixed) :], strict=True):
            if g is not None:  # withheld DeepStack features: -g . f at each removed vision row
                gf = (g * f).sum(-1).double()[:, rank.to(g.device)]  # (bucket, withheld row)
                change.index_add_(1, owner.to(change.device), -gf.to(change.device))
        out[step, :k] = change.cpu()  # the last bucket's row stays 0
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
    traced = traced_forward(vl, dec, plan, read, keeper(cut_edges(values, plan.allowed, dec.seq_len), read))
    layers = traced.kept
    k = min(TOP_K, traced.logits.shape[-1] - 1)
    changes = _bucket_changes(traced, layers, _deepstack_index(dec, removed), k, len(values), targets)
    picked = [None] * len(traced.logits) if targets is None else targets
    masses = torch.stack(
        [torch.softmax(_buckets(z.detach(), k, t).double(), 0) for z, t in zip(traced.logits, picked, strict=True)]
    ).cpu()
    mean = (masses[:, :, None] * changes).sum(1)  # (step, knockout)
    logprob = changes[:, 0] - mean
    kl = 0.5 * (masses[:, :, None] * (changes - mean[:, None]).square()).sum(1)
    saturated = torch.zeros(len(values), dtype=torch.long)
    for layer in layers:
        if layer is not None:
            rows = layer.saturated.long().cpu()
            saturated.index_add_(0, layer.index.row_knockout.cpu(), rows)
    return Estimates(kl.T.contiguous(), -logprob.T.contiguous(), saturated)
