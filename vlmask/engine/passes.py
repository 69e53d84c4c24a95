"""The passes of a sweep over one prompt: the clean pass, packed knockout passes, masked generation.

A ``base`` intervention changes the clean run itself: the clean pass runs with it (so the
reused prefix is the base's), and every knockout runs as ``base & knockout``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions import At, Compose, Intervention, ModelShape
from vlmask.engine import trace as _trace
from vlmask.engine.masks import base_allowed
from vlmask.inputs.prompt import Prompt
from vlmask.model.load import VLModel

log = logging.getLogger(__name__)

NOTHING = Compose()


def first_changed(intervention: Intervention, seq_len: int, num_layers: int) -> int:
    """The first position whose computation ``intervention`` changes (``seq_len`` if none)."""
    return intervention.first_changed(seq_len, ModelShape(num_layers))


@dataclass(frozen=True)
class Context:
    """What every pass over one prompt shares."""

    vl: VLModel
    extra: dict[str, torch.Tensor]
    encoder: dict[str, Any]
    base: torch.Tensor  # (seq, seq) edges the unmodified model allows
    head_means: torch.Tensor | None = None  # (layer, head, head_dim), the unmodified model's, for mean ablation

    def allowed(self, interventions: Sequence[Any], seq_len: int, start: int = 0) -> list[torch.Tensor]:
        """Per layer, the ``(batch, seq_len - start, seq_len)`` edges left once each intervention cut its own.

        Layers where every intervention has the same ``attention_key`` share one tensor, so
        memory does not grow with depth.
        """
        base = self.base[start:seq_len, :seq_len]
        shared: dict[tuple[Any, ...], torch.Tensor] = {}
        per_layer = []
        for layer in range(self.vl.num_layers):
            keys = tuple(iv.attention_key(layer) for iv in interventions)
            if keys not in shared:
                cuts = [
                    None if key is None else iv.blocked_edges(At(layer, seq_len, start))
                    for iv, key in zip(interventions, keys, strict=True)
                ]
                rows = [base if cut is None else base & ~cut[start:] for cut in cuts]
                shared[keys] = torch.stack(rows)
            per_layer.append(shared[keys])
        return per_layer

    def plan(
        self, interventions: Sequence[Any], seq_len: int, start: int = 0, starts: Sequence[int] = ()
    ) -> _trace.Plan:
        """What a pass over positions ``start..seq_len-1`` does, row ``i`` under ``interventions[i]``.

        ``starts`` makes it a packed decoder pass: row ``i`` computes positions ``starts[i]..``.
        """
        rows = tuple(interventions)
        start = min(starts) if starts else start
        return _trace.Plan(self.allowed(rows, seq_len, start), rows, start, self.head_means, tuple(starts))

    def _extra(self, seq_len: int) -> dict[str, torch.Tensor]:
        """Per-prompt inputs for the prompt followed by generated text tokens, ``seq_len`` in all."""
        extra = dict(self.extra)
        if "mm_token_type_ids" in extra:
            types = extra["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, seq_len - types.shape[1])], dim=1)
        return extra

    def run(
        self,
        ids: torch.Tensor,
        interventions: Sequence[Any],
        read: list[int],
        *,
        internals: bool = True,
        capture: bool = False,
    ) -> tuple[_trace.Readout, _trace.DecoderInputs | None]:
        """The whole model on ``ids (batch, seq)``, row ``i`` under ``interventions[i]``, reading ``read``."""
        seq_len = ids.shape[1]
        todo = self.plan(interventions, seq_len)
        return _trace.run_model(self.vl, ids, self._extra(seq_len), self.encoder, todo, read, internals, capture)

    def run_fast(
        self, dec: _trace.DecoderInputs, interventions: Sequence[Any], read: list[int], starts: Sequence[int]
    ) -> _trace.Readout:
        """Like :meth:`run` on the captured sequence, row ``i`` recomputing only positions ``starts[i]..``.

        Positions before ``starts[i]`` must compute under ``interventions[i]`` exactly as in the pass that made
        ``dec``, and every start must be at most the first read position.
        """
        seq_len = dec.embeds.shape[1]
        return _trace.run_decoder(self.vl, dec, self.plan(interventions, seq_len, starts=starts), read)[0]

    def with_head_means(self, prompt_ids: torch.Tensor) -> Context:
        """This context, plus the unmodified model's head outputs averaged over the prompt's positions."""
        self.vl.family.reset(self.vl.hf)
        means: list[torch.Tensor] = []
        todo = self.plan([NOTHING], prompt_ids.shape[1])
        extra = self._extra(prompt_ids.shape[1])
        last = [prompt_ids.shape[1] - 1]
        _trace.run_model(self.vl, prompt_ids, extra, self.encoder, todo, last, internals=False, means=means)
        stacked = torch.stack([m[0] for m in means]).unflatten(-1, (self.vl.num_heads, -1))
        return dataclasses.replace(self, head_means=stacked)

    def clean_pass(
        self, prompt_ids: torch.Tensor, n: int, base: Any = NOTHING
    ) -> tuple[torch.Tensor, _trace.Readout, _trace.DecoderInputs]:
        """Greedy continuation of exactly ``n`` tokens under ``base``, read at each step's last position.

        The prompt runs through the whole model once (capturing the decoder's inputs and
        cache); each further step feeds one generated token to the decoder. Returns the
        tokens, the readout at positions ``L-1 .. L+n-2``, and the decoder inputs of the
        prompt plus the first ``n - 1`` tokens (the teacher-forced sequence).
        """
        self.vl.family.reset(self.vl.hf)
        last = prompt_ids.shape[1] - 1
        out, dec = self.run(prompt_ids, [base], [last], capture=True)
        readouts = [out]
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            dec = dec.append_text(self.vl, tokens[-1])
            pos = dec.embeds.shape[1] - 1
            out, dec = _trace.run_decoder(self.vl, dec, self.plan([base], pos + 1, starts=[pos]), [pos], extend=True)
            readouts.append(out)
            tokens.append(int(out.logits[0, -1].argmax()))
        clean = _trace.Readout(
            *(
                torch.cat([getattr(r, f) for r in readouts], dim=1 if f == "logits" else 2)
                for f in ("residual", "heads", "logits")
            )
        )
        return torch.tensor(tokens, dtype=prompt_ids.dtype), clean, dec


def context(vl: VLModel, built: Prompt, max_len: int, vision_attention: str = "native") -> Context:
    """Everything the passes over ``built`` share, for sequences up to ``max_len`` tokens."""
    inputs = built.inputs
    extra = {k: inputs[k] for k in vl.family.extra_keys if k in inputs}
    base = base_allowed(max_len, built.tokens.vision_ranges, vision_attention)
    return Context(vl, extra, vl.family.encode_vision(vl.hf, inputs), base)


def _masked_generation(
    ctx: Context,
    dec: _trace.DecoderInputs,
    clean: torch.Tensor,
    forced_top: torch.Tensor,
    interventions: Sequence[Any],
    starts: Sequence[int],
) -> torch.Tensor:
    """Greedy continuations under each knockout, ``(batch, steps)``.

    Teacher-forced argmaxes are the free-running continuation up to the first step where a
    knockout's top token leaves the clean one; only from there on is it generated afresh,
    on the decoder alone: one pass per knockout recomputes its own positions
    (``starts[i]..``, on the clean keys and values before them) with its new token, then the
    knockouts that left at the same step advance together, one position per step, each on
    its own cache. ``dec`` is the clean teacher-forced sequence (prompt plus ``steps - 1``
    clean tokens).
    """
    vl, steps = ctx.vl, clean.shape[0]
    prompt_len = dec.embeds.shape[1] - (steps - 1)
    out = forced_top.clone()
    left_at: dict[int, list[int]] = {}
    for row in range(len(interventions)):
        differs = (forced_top[row] != clean).nonzero()
        if len(differs) and int(differs[0]) < steps - 1:
            left_at.setdefault(int(differs[0]), []).append(row)
    for first, rows in left_at.items():
        owns = []
        for row in rows:
            own = dec.prefix(vl, prompt_len + first).append_text(vl, int(forced_top[row, first]))
            seq = own.embeds.shape[1]
            todo = ctx.plan([interventions[row]], seq, starts=[starts[row]])  # starts are in the prompt
            readout, own = _trace.run_decoder(vl, own, todo, [seq - 1], extend=True)
            out[row, first + 1] = readout.logits[0, -1].argmax()
            owns.append(own)
        group, knockouts = _trace.DecoderInputs.stacked(owns), [interventions[r] for r in rows]
        for step in range(first + 2, steps):
            group = group.append_text(vl, out[rows, step - 1].tolist())
            seq = group.embeds.shape[1]
            readout, group = _trace.run_decoder(vl, group, ctx.plan(knockouts, seq, start=seq - 1), [seq - 1], True)
            out[rows, step] = readout.logits[:, -1].argmax(-1)
    return out


def _pin_unchanged(out: _trace.Readout, clean: _trace.Readout, firsts: list[int], read: list[int]) -> _trace.Readout:
    """Read positions before a knockout's first changed position are the clean values, exactly."""
    keep = torch.tensor([[r < f for r in read] for f in firsts])  # (batch, pos)
    if not keep.any():
        return out
    residual = torch.where(keep[:, None, :, None], clean.residual, out.residual)
    heads = torch.where(keep[:, None, :, None, None], clean.heads, out.heads)
    logits = torch.where(keep[:, :, None], clean.logits, out.logits)
    return _trace.Readout(residual, heads, logits)
