"""The passes over one prompt: head means, the clean pass, packed knockout passes, masked generation.

:class:`PromptPasses` is their one home; it runs them through a
:class:`~vlmask.engine.backend.Backend` only. What makes a sweep fast, without changing any
number:

- the vision encoder runs once per sweep and its output is reused by every pass;
- teacher forcing makes the ``step`` dimension cheap: the clean continuation is generated
  first, then step ``s`` is read at position ``L-1+s`` of prompt + continuation (causality
  makes it equal to the last position of the sequence at step ``s``);
- a knockout of key ``p`` changes nothing before position ``p + 1`` (each intervention says
  where it starts changing things: ``first_changed``): knockouts run on the decoder only,
  each from the first position it changes, on the clean pass's keys and values before it;
- knockouts run in packed passes: the positions each knockout recomputes are laid end to
  end in one sequence, whose attention mask keeps the knockouts apart, so a pass computes
  no position that a knockout does not need; only the metrics are kept.

A ``base`` intervention changes the clean run itself: the clean pass runs with it (so the
reused prefix is the base's), and every knockout runs as ``base & knockout``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from interventions import Compose, Intervention, compose
from vlmask.engine.attention_read import value_norms
from vlmask.engine.backend import Backend, DecoderPass, ModelPass
from vlmask.engine.masks import allowed_edges
from vlmask.engine.packing import packed_cap, pass_bytes, plan_batches
from vlmask.engine.stages import stage
from vlmask.engine.state import DecoderInputs, ModelInputs, PassPlan, Readout
from vlmask.inputs.prompt import Prompt
from vlmask.model.load import VLModel
from vlmask.results.dataset import Measured
from vlmask.results.metrics import logit_metrics, vector_distances
from vlmask.spec import SweepSpec

NOTHING = Compose()


@dataclass(frozen=True)
class CleanRun:
    """The clean pass: its greedy ``tokens (step,)``, its ``readout`` at positions ``L-1 .. L+n-2`` and
    the decoder ``inputs`` of the prompt plus the first ``n - 1`` tokens (the teacher-forced sequence)."""

    tokens: torch.Tensor
    readout: Readout
    inputs: DecoderInputs


@dataclass(frozen=True)
class PromptPasses:
    """The passes over one prompt, and what they share: the model, the per-prompt inputs, the vision
    encoder's outputs, the edges ``unmodified (seq, seq)`` the unmodified model allows, the backend, and
    (for mean ablation) the unmodified model's mean head outputs ``(layer, head, head_dim)``."""

    vl: VLModel
    extra: dict[str, torch.Tensor]
    encoder: dict[str, Any]
    unmodified: torch.Tensor
    backend: Backend
    head_means: torch.Tensor | None = None
    removable: frozenset[int] | None = None

    @staticmethod
    def of(
        vl: VLModel,
        built: Prompt,
        max_len: int,
        vision_attention: str = "native",
        backend: str | Backend = "nnsight",
        vision_removal: str = "keys",
    ) -> PromptPasses:
        """The passes over ``built``, for sequences up to ``max_len`` tokens, run by ``backend`` (a name or one).

        ``vision_removal="full"``: a knockout that blocks a vision key also adds no DeepStack
        features at that position (``removable``: the vision positions; None under ``"keys"``).
        """
        inputs = built.inputs
        unmodified = allowed_edges(max_len, built.tokens.vision_ranges, vision_attention)
        with stage("vision encoder"):
            extra, encoder = vl.family.prompt_inputs(inputs), vl.family.encode_vision(vl.hf, inputs)
        vision = frozenset(p for p, kind in enumerate(built.tokens.kind) if kind == "vision")
        removable = vision if vision_removal == "full" else None
        return PromptPasses(vl, extra, encoder, unmodified, Backend.named(backend), removable=removable)

    def removed(self, interventions: Sequence[Intervention], seq_len: int) -> list[tuple[int, ...]]:
        """Per intervention, the vision positions that get no DeepStack features (none under ``"keys"``)."""
        if self.removable is None:
            return [() for _ in interventions]
        cut = PassPlan.cut_keys(interventions, seq_len, self.vl.num_layers)
        return [tuple(p for p in keys if p in self.removable) for keys in cut]

    def plan(self, interventions: Sequence[Intervention], seq_len: int, read: Sequence[int], **kw: Any) -> PassPlan:
        """What a pass over positions ``start..seq_len-1`` does, row ``i`` under ``interventions[i]``.

        ``kw``: ``start``, ``starts`` (a packed decoder pass: row ``i`` computes positions
        ``starts[i]..``), ``internals`` and ``attention`` (see :meth:`PassPlan.build`).
        """
        removed = self.removed(interventions, seq_len)
        return PassPlan.build(
            self.unmodified,
            interventions,
            self.vl.num_layers,
            seq_len,
            read,
            head_means=self.head_means,
            removed=removed,
            **kw,
        )

    def model_pass(
        self,
        ids: torch.Tensor,
        interventions: Sequence[Intervention],
        read: Sequence[int],
        *,
        internals: bool = True,
        capture: bool = False,
        mean_heads: bool = False,
        attention: bool = False,
    ) -> ModelPass:
        """The whole model on ``ids (batch, seq)``, row ``i`` under ``interventions[i]``, reading ``read``
        (and each layer's attention there, with ``attention``)."""
        seq_len = ids.shape[1]
        inputs = ModelInputs(ids, self.vl.family.extend_inputs(self.extra, seq_len), self.encoder)
        todo = self.plan(interventions, seq_len, read, internals=internals, attention=attention)
        if any(todo.removed):
            raise ValueError("a whole-model pass cannot withhold DeepStack features: run the knockout on the decoder")
        return self.backend.run_model(self.vl, inputs, todo, capture=capture, mean_heads=mean_heads)

    def decoder_pass(
        self,
        dec: DecoderInputs,
        interventions: Sequence[Intervention],
        read: Sequence[int],
        *,
        starts: Sequence[int] = (),
        extend: bool = False,
        keep: bool = False,
        internals: bool = True,
        attention: bool = False,
    ) -> DecoderPass:
        """The decoder on captured ``dec``, row ``i`` under ``interventions[i]``, reading ``read``.

        With ``starts``, one packed pass over one sequence: row ``i`` recomputes only
        positions ``starts[i]..``, on ``dec``'s keys and values before them (which must
        compute under ``interventions[i]`` exactly as in the pass that made ``dec``); every
        start must be at most the first read position. Without, ``dec`` holds one sequence
        per row and each row computes the positions past its cache. ``extend``, ``keep``: see
        :meth:`~vlmask.engine.backend.Backend.run_decoder`. ``internals``: read layer and
        head outputs too, else logits only; ``attention``: each layer's attention at ``read`` too
        (one row).
        """
        start = dec.keys[0].shape[2]
        kw = {"start": start, "starts": starts, "internals": internals, "attention": attention}
        todo = self.plan(interventions, dec.seq_len, read, **kw)
        return self.backend.run_decoder(self.vl, dec, todo, extend=extend, keep=keep)

    def with_head_means(self, prompt_ids: torch.Tensor) -> PromptPasses:
        """These passes, plus the unmodified model's head outputs averaged over the prompt's positions."""
        self.vl.family.reset(self.vl.hf)
        last = [prompt_ids.shape[1] - 1]
        done = self.model_pass(prompt_ids, [NOTHING], last, internals=False, mean_heads=True)
        return dataclasses.replace(self, head_means=done.head_means)

    def clean_pass(
        self,
        prompt_ids: torch.Tensor,
        n: int,
        base: Intervention = NOTHING,
        *,
        attention: bool = False,
        forced: Sequence[int] = (),
    ) -> CleanRun:
        """Continuation of exactly ``n`` tokens under ``base``, read at each step's last position: the tokens
        ``forced`` for the steps they cover (an answer's), greedy after them.

        The prompt runs through the whole model once (capturing the decoder's inputs and
        cache); each further step feeds one continuation token to the decoder. ``attention``:
        also read each layer's attention probabilities at each step's last position.
        """

        def pick(logits: torch.Tensor, step: int) -> int:
            return int(forced[step]) if step < len(forced) else int(logits[0, -1].argmax())

        self.vl.family.reset(self.vl.hf)
        last = [prompt_ids.shape[1] - 1]
        first = self.model_pass(prompt_ids, [base], last, capture=True, attention=attention)
        out, dec = first.readout, first.inputs
        readouts, tokens = [out], [pick(out.logits, 0)]
        for _ in range(n - 1):
            dec = dec.append_text(self.vl, tokens[-1])
            pos = dec.seq_len - 1
            step = self.decoder_pass(dec, [base], [pos], starts=[pos], extend=True, attention=attention)
            out, dec = step.readout, step.inputs
            readouts.append(out)
            tokens.append(pick(out.logits, len(tokens)))
        return CleanRun(torch.tensor(tokens, dtype=prompt_ids.dtype), Readout.concat(readouts), dec)

    def masked_generation(
        self,
        dec: DecoderInputs,
        clean: torch.Tensor,
        forced_top: torch.Tensor,
        interventions: Sequence[Intervention],
        starts: Sequence[int],
        packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Greedy continuations under each knockout, ``(batch, steps)``.

        Teacher-forced argmaxes ``forced_top (batch, steps)`` are the free-running continuation
        up to the first step where a knockout's top token leaves the ``clean (steps,)`` one;
        only from there on is it generated afresh, on the decoder alone. Up to that step the
        knockout's own keys and values are those of its packed pass over ``dec`` (row ``i``
        recomputed from ``starts[i]``): ``packed``, as :meth:`knockout_pass` kept them (None:
        one such pass is run here). The knockouts that have left by a step then advance
        together, one new position per step (the same position for all), each on its own
        cache, written in place into buffers made as rows join. ``dec`` is the clean
        teacher-forced sequence (prompt plus ``steps - 1`` clean tokens).
        """
        vl, steps = self.vl, clean.shape[0]
        prompt_len = dec.seq_len - (steps - 1)
        out = forced_top.clone()
        left_at: dict[int, list[int]] = {}
        for row in range(len(interventions)):
            differs = (forced_top[row] != clean).nonzero()
            if len(differs) and int(differs[0]) < steps - 1:
                left_at.setdefault(int(differs[0]), []).append(row)
        if left_at and packed is None:
            read = [dec.seq_len - 1]
            packed = self.decoder_pass(dec, interventions, read, starts=starts, keep=True, internals=False).packed
        group, rows = None, []
        for step in range(min(left_at, default=steps) + 1, steps):
            joining = left_at.get(step - 1, [])
            if joining:  # their own keys and values up to the step they left, then the token they left with
                own = dec.packed_rows(vl, packed, starts, joining, prompt_len + step - 1)
                own = own.append_text(vl, forced_top[joining, step - 1].tolist())
                group, rows = (
                    DecoderInputs.stacked([p for p in (group, own) if p is not None], dec.seq_len),
                    rows + joining,
                )
            done = self.decoder_pass(
                group, [interventions[r] for r in rows], [group.seq_len - 1], extend=True, internals=False
            )
            out[rows, step] = done.readout.logits[:, -1].argmax(-1)
            if step + 1 < steps:
                group = done.inputs.append_text(vl, out[rows, step].tolist())
        return out

    def starts(self, knockouts: Sequence[Intervention], seq_len: int, first_read: int) -> tuple[list[int], list[int]]:
        """Per knockout, the first position it changes, and the first its pass computes (at most ``first_read``)."""
        firsts = PassPlan.first_changed(knockouts, seq_len, self.vl.num_layers)
        # a position without its DeepStack features changes itself: recompute from there
        firsts = [min([f, *gone]) for f, gone in zip(firsts, self.removed(knockouts, seq_len), strict=True)]
        firsts = self.reached(firsts, seq_len)
        return firsts, [min(f, first_read) for f in firsts]  # a pass computes at least the positions it reads

    def reached(self, firsts: Sequence[int], seq_len: int) -> list[int]:
        """``firsts`` moved back to the first position a change there can reach: where the unmodified mask lets
        a query read a later key (``vision_attention="bidirectional"``: an image's tokens read each other), a
        change at that key reaches the query at the next layer. Under a causal mask, ``firsts`` as they are.

        Example (positions 1-3 an image read bidirectionally; a change at 2 reaches 1):
            >>> from vlmask.engine.masks import allowed_edges
            >>> passes = PromptPasses(None, {}, {}, allowed_edges(5, [(1, 4)], "bidirectional"), None)
            >>> passes.reached([0, 2, 4, 5], 5)
            [0, 1, 4, 5]
        """
        allowed = self.unmodified[:seq_len, :seq_len]
        if not allowed.triu(1).any():
            return list(firsts)
        reader = allowed.int().argmax(0)  # each key's first reader (the key itself at the latest)
        back = reader.flip(0).cummin(0).values.flip(0).tolist()  # the first reader of any key from here on
        out = []
        for f in firsts:
            while f < seq_len and back[f] < f:
                f = back[f]
            out.append(f)
        return out

    def knockout_pass(
        self,
        clean: CleanRun,
        rows: Sequence[Intervention],
        read: Sequence[int],
        starts: Sequence[int],
        firsts: Sequence[int],
        target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """One packed pass of knockouts ``rows``, row ``i`` from ``starts[i]`` on ``clean``'s teacher-forced sequence:
        their residual, head and logit metrics at ``read`` against the clean run, their argmaxes ``(row, read)``, and
        the pass's keys and values (for :meth:`masked_generation`).

        Read positions before a row's first changed position (``firsts[i]``) are the clean values, exactly;
        ``target (read,)``: the measured tokens where they are not the clean top ones (an answer's).
        """
        with stage("packed passes"):
            done = self.decoder_pass(clean.inputs, rows, read, starts=starts, keep=True)
            out = done.readout
            unchanged = torch.tensor([[r < f for r in read] for f in firsts])  # (row, pos)
            out = out.select(unchanged, clean.readout)
            residual = vector_distances(clean.readout.residual, out.residual)
            heads = vector_distances(clean.readout.heads, out.heads)
            logits = logit_metrics(clean.readout.logits, out.logits, target)
            return residual, heads, logits, out.logits.argmax(-1), done.packed

    def fits(self, seq_len: int, reads: int, budget: int) -> Callable[[int, int], bool]:
        """Whether a packed pass of ``positions`` recomputed positions and ``count`` knockouts over ``seq_len``
        positions, reading ``reads``, is within :func:`packed_cap` and ``budget`` bytes: ``fits(positions, count)``."""
        cap, config, itemsize = packed_cap(seq_len), self.vl.text_config, self.vl.dtype.itemsize
        return lambda positions, count: (
            positions <= cap and pass_bytes(config, seq_len, positions, count, reads, itemsize) <= budget
        )

    def measure(
        self,
        prompt_ids: torch.Tensor,
        num_tokens: int,
        base: Intervention,
        knockouts: Sequence[Intervention],
        *,
        batch_size: int | None = None,
        budget: int = 2**31,
        progress: bool = False,
        attention: bool = True,
        answer: Sequence[int] = (),
        clean: CleanRun | None = None,
    ) -> Measured:
        """The clean pass under ``base``, then every knockout (as ``base & knockout``) in packed passes:
        the clean continuation, and per knockout the metrics against the clean run and its greedy continuation.

        ``answer``: token ids forced as the clean continuation, and measured, for the steps they cover.
        Knockouts share packed passes of at most ``batch_size`` knockouts (None: no limit)
        whose estimated memory fits ``budget`` bytes; read positions before a knockout's
        first changed position are the clean values, exactly. ``attention``: also read the
        clean pass's attention at each step (:func:`clean_attention`). ``clean``: that clean pass, already run (by
        these passes, with the same arguments): reused.
        """
        vl, prompt_len = self.vl, prompt_ids.shape[1]
        with stage("clean pass"):
            means = PassPlan.needs_head_means([base, *knockouts]) and self.head_means is None
            passes = self.with_head_means(prompt_ids) if means else self
            if clean is None:
                clean = passes.clean_pass(prompt_ids, num_tokens, base, attention=attention, forced=answer)
        full_len, read = prompt_len + num_tokens - 1, list(range(prompt_len - 1, prompt_len + num_tokens - 1))
        target = clean.tokens if answer else None  # the measured tokens: the answer's, else the clean top ones
        firsts, starts = passes.starts(knockouts, full_len, read[0])
        rows = [compose(base, iv) for iv in knockouts]
        measured, generated = [], []
        bar = tqdm(total=len(rows), desc="knockouts", unit="knockout", disable=not progress)
        for batch in plan_batches(starts, full_len, batch_size, self.fits(full_len, len(read), budget)):
            *metrics, top, packed = passes.knockout_pass(clean, rows[batch], read, starts[batch], firsts[batch], target)
            measured.append(metrics)
            with stage("generation"):
                generated.append(
                    passes.masked_generation(clean.inputs, clean.tokens, top, rows[batch], starts[batch], packed)
                )
            del packed  # the pass's keys and values, kept for its continuations only
            bar.update(len(top))
        bar.close()
        with stage("assembly"):
            probs, weighted = clean_attention(vl, clean, prompt_len) if attention else (None, None)
        residual, heads, logits = (torch.cat(m) for m in zip(*measured, strict=True))
        return Measured(
            clean_ids=clean.tokens.tolist(),
            clean_top_logprob=_measured_logprob(clean.readout.logits[0], target),
            residual=residual,
            heads=heads,
            logits=logits,
            masked_ids=torch.cat(generated),
            attention=probs,
            attention_norm=weighted,
        )

    def measure_spec(
        self,
        prompt_ids: torch.Tensor,
        spec: SweepSpec,
        base: Intervention,
        knockouts: Sequence[Intervention],
        *,
        progress: bool = False,
        answer: Sequence[int] = (),
        clean: CleanRun | None = None,
    ) -> Measured:
        """:meth:`measure` with ``spec``'s steps, batch size, memory budget and attention readout."""
        return self.measure(
            prompt_ids,
            spec.num_tokens,
            base,
            knockouts,
            batch_size=spec.batch_size,
            budget=spec.max_memory,
            progress=progress,
            attention=spec.attention,
            answer=answer,
            clean=clean,
        )


def _measured_logprob(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``(step,)``: the clean log-probability of each step's measured token (``target``, else the top one)."""
    logprobs = torch.log_softmax(logits, -1)
    return logprobs.max(-1).values if target is None else logprobs.gather(-1, target[:, None]).squeeze(-1)


def clean_attention(vl: VLModel, clean: CleanRun, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean run's attention at each step, and its value-weighted form, to the prompt's positions:
    each ``(step, seq, layer, head)``.

    Value-weighted: the probability times ``||v_k W_O,h||`` of the key (the clean values).
    """
    probs = clean.readout.attention[0]  # (layer, step, head, key)
    weighted = probs * value_norms(vl, clean.inputs.values)[:, None]
    return tuple(x[..., :prompt_len].permute(1, 3, 0, 2).contiguous() for x in (probs, weighted))
