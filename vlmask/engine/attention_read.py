"""The clean attention readout: each decoder layer's attention probabilities at the read positions.

sdpa returns no weights, and forcing eager on a user would change the model they asked
for. So a pass that reads attention reads the attention function's call itself (transformers'
``ALL_ATTENTION_FUNCTIONS`` entry of the implementation, ``sdpa`` or ``eager``, which every
pass swaps: :mod:`vlmask.engine.attention_calls`): every decoder layer's self-attention hands
it its own ``query`` and ``key`` (after the model's rotary embedding and any query/key norm),
the pass's mask (so the base intervention and ``vision_attention`` included) and its
``scaling``; the reader computes the probabilities of the read query rows exactly as
transformers' ``eager_attention_forward`` does (GQA keys shared by their query heads, the
mask added, a float32 softmax), then the model's own function runs, its output used
unchanged. The backends attach nothing for it: it works the same under nnsight and plain
hooks.

The value-weighted attention of Kobayashi et al. (2020), ``||a_qk v_k W_O,h||``, is the
probability times ``||v_k W_O,h||`` (:func:`value_norms`), which does not depend on the query:
it is computed once per sweep from the clean run's cached values.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmask.model.load import VLModel


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dtype: torch.dtype = torch.float32,
    key_major: bool = False,
) -> torch.Tensor:
    """``(batch, head, query, key)`` softmax in ``dtype`` of ``query (batch, head, q, d) . key (batch, kv_head, k, d)``.

    Each key head serves ``head / kv_head`` consecutive query heads (GQA). ``mask`` is the
    pass's 4D mask ``(batch, 1, q, k)``: boolean (True = may attend) or additive float.
    ``key_major``: laid out ``(batch, head, key, query)`` in memory (the same values; each key's column
    is contiguous, as triage gathers them), the view returned.

    Example:
        >>> q, k = torch.ones(1, 2, 1, 4), torch.ones(1, 1, 3, 4)
        >>> mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)
        >>> attention_probabilities(q, k, mask, 0.5)[0, :, 0].tolist()
        [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]
        >>> by_key = attention_probabilities(q, k, mask, 0.5, key_major=True)
        >>> torch.equal(by_key, attention_probabilities(q, k, mask, 0.5)), by_key.transpose(-1, -2).is_contiguous()
        (True, True)
    """
    key = key.to(dtype).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    query = query.to(dtype)
    if key_major:  # computed transposed; the softmax over keys is then over dim -2
        scores, mask = torch.matmul(key, query.transpose(2, 3)), None if mask is None else mask.transpose(-1, -2)
    else:
        scores = torch.matmul(query, key.transpose(2, 3))
    scores.mul_(scaling)
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores.add_(mask.to(dtype))
    return torch.softmax(scores, dim=-2).transpose(-1, -2) if key_major else torch.softmax(scores, dim=-1)


class AttentionReader:
    """Reads each decoder layer's attention probabilities at the query rows ``index`` during a pass.

    The pass's :class:`~vlmask.engine.attention_calls.AttentionCalls` hands it each layer's
    call (:meth:`read`); :attr:`probs` ``[layer]`` then holds ``(batch, head, read, key)``
    float32 on CPU.
    """

    def __init__(self, vl: VLModel, index: torch.Tensor) -> None:
        self.index = index
        self.probs: list[torch.Tensor | None] = [None] * vl.num_layers

    def read(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: Any) -> None:
        """Read ``layer``'s call: its ``query``, ``key``, the pass's ``mask`` and the module's ``scaling``."""
        rows = self.index.to(query.device)
        mask = None if mask is None else mask[:, :, rows]
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        probs = attention_probabilities(query[:, :, rows], key, mask, scale)
        self.probs[layer] = probs.cpu()

    def stacked(self) -> torch.Tensor:
        """``(batch, layer, read, head, key)``: every layer's read probabilities."""
        missing = [i for i, p in enumerate(self.probs) if p is None]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not call the attention function: nothing was read")
        return torch.stack(self.probs, dim=1).transpose(2, 3)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """``module``'s weight (float32), loaded for the moment where a device map offloaded it (accelerate's hook)."""
    if getattr(module, "_hf_hook", None) is None:
        return module.weight.detach().float()
    from accelerate.utils import align_module_device  # a device map implies accelerate

    with align_module_device(module):
        return module.weight.detach().float().clone()


def value_norms(vl: VLModel, values: list[torch.Tensor]) -> torch.Tensor:
    """``(layer, head, seq)``: ``||v_k W_O,h||`` of each key, from each layer's cached ``values (1, kv_head, seq, d)``.

    ``W_O,h`` are the columns of ``o_proj`` that read head ``h``; the norm is taken as
    ``sqrt(v^T W_O,h^T W_O,h v)``, so no ``(head, seq, hidden)`` tensor is made.

    Example:
        >>> norms = value_norms(vl, [torch.ones(1, vl.text_config.num_key_value_heads, 3, 16)] * vl.num_layers)
        >>> norms.shape == (vl.num_layers, vl.num_heads, 3)
        True
    """
    out = []
    for layer, v in zip(vl.decoder.layers, values, strict=True):
        weight = _weight(layer.self_attn.o_proj)  # (hidden, head * d)
        w = weight.unflatten(1, (vl.num_heads, -1)).transpose(0, 1)  # (head, hidden, d)
        gram = w.transpose(1, 2) @ w  # (head, d, d)
        v = v[0].float().repeat_interleave(vl.num_heads // v.shape[1], dim=0)  # (head, seq, d)
        squared = ((v @ gram.to(v.device)) * v).sum(-1)  # (head, seq)
        out.append(squared.clamp_min(0).sqrt().cpu())
    return torch.stack(out)
