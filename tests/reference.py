"""An independent knockout reference: plain PyTorch hooks on the transformers model.

It shares no code with vlmask's engine: the 4D mask is built with explicit loops and
handed to every decoder layer's self-attention by a forward pre-hook; the model runs
its normal forward (vision encoder included).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def hand_mask(
    seq_len: int, blocked: set[int], implementation: str, dtype: torch.dtype, bidirectional: list[tuple[int, int]] = ()
) -> torch.Tensor:
    allowed = [[k <= q for k in range(seq_len)] for q in range(seq_len)]
    for start, end in bidirectional:
        for q in range(start, end):
            for k in range(start, end):
                allowed[q][k] = True
    for q in range(seq_len):
        for k in blocked:
            if q > k:
                allowed[q][k] = False
    allowed = torch.tensor(allowed)[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def decoder_of(hf):
    """The language decoder, found by its own attribute path (not through vlmask's families)."""
    model = hf.model
    return model.language_model if hasattr(model, "language_model") else model


@contextmanager
def hooked(hf, masks: dict[int, torch.Tensor]):
    """Give layer ``i``'s self-attention ``masks[i]``; collect layer outputs and o_proj inputs."""
    seen = {"residual": {}, "heads": {}}
    handles = []
    for i, layer in enumerate(decoder_of(hf).layers):
        if i in masks:

            def pre(module, args, kwargs, mask=masks[i]):
                return args, {**kwargs, "attention_mask": mask}

            handles.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, args, i=i: seen["heads"].__setitem__(i, args[0][0].detach().clone())
            )
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, args, out, i=i: seen["residual"].__setitem__(i, out[0].detach().clone())
            )
        )
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def reference_run(vl, inputs: dict, blocked: set[int], layers=None, bidirectional=()):
    """Full forward of ``inputs`` (batch 1) with ``blocked`` keys: residual (L,S,D), heads (L,S,H*d), logits (S,V)."""
    hf = vl.hf
    seq_len = inputs["input_ids"].shape[1]
    implementation = decoder_of(hf).config._attn_implementation
    mask = hand_mask(seq_len, blocked, implementation, hf.dtype, list(bidirectional))
    n = decoder_of(hf).config.num_hidden_layers
    plain = hand_mask(seq_len, set(), implementation, hf.dtype, list(bidirectional))
    masks = {i: mask if layers is None or i in layers else plain for i in range(n)}
    with torch.no_grad(), hooked(hf, masks) as seen:
        logits = hf(**inputs).logits[0]
    residual = torch.stack([seen["residual"][i] for i in range(n)])
    heads = torch.stack([seen["heads"][i] for i in range(n)])
    return residual.float(), heads.float(), logits.float()


def extended(inputs: dict, new_ids: list[int]) -> dict:
    """``inputs`` with ``new_ids`` appended as text tokens."""
    out = dict(inputs)
    extra = torch.tensor([new_ids], dtype=inputs["input_ids"].dtype)
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return out


def greedy(vl, inputs: dict, n: int, blocked: set[int] = frozenset()) -> list[int]:
    """Naive greedy generation: a full forward per new token, knockout by hand-built mask."""
    new: list[int] = []
    for _ in range(n):
        _, _, logits = reference_run(vl, extended(inputs, new), blocked)
        new.append(int(logits[-1].argmax()))
    return new


def edited_run(vl, inputs: dict, masks: dict[int, torch.Tensor] | None = None, heads=None, outputs=None):
    """Full forward (batch 1) with ``masks[layer]`` for self-attention, ``heads[layer](x)`` editing the
    o_proj input ``(1, S, H*d)`` and ``outputs[layer](y)`` editing the layer output ``(1, S, D)``, by plain
    hooks registered before the recording ones: residual (L,S,D), heads (L,S,H*d), logits (S,V) as seen after
    the edits.
    """
    hf = vl.hf
    seq_len = inputs["input_ids"].shape[1]
    implementation = decoder_of(hf).config._attn_implementation
    n = decoder_of(hf).config.num_hidden_layers
    plain = hand_mask(seq_len, set(), implementation, hf.dtype)
    masks = {i: (masks or {}).get(i, plain) for i in range(n)}
    handles = []
    for i, layer in enumerate(decoder_of(hf).layers):
        if i in (heads or {}):
            handles.append(
                layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, f=heads[i]: (f(args[0].clone()),))
            )
        if i in (outputs or {}):
            handles.append(layer.register_forward_hook(lambda m, args, out, f=outputs[i]: f(out.clone())))
    try:
        with torch.no_grad(), hooked(hf, masks) as seen:
            logits = hf(**inputs).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    residual = torch.stack([seen["residual"][i] for i in range(n)])
    heads_seen = torch.stack([seen["heads"][i] for i in range(n)])
    return residual.float(), heads_seen.float(), logits.float()
