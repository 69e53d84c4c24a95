"""What a knockout sweep costs at the least: the benchmark's "ideal" and "needed" prices.

Both are measured on the model being benchmarked, with its own kernels (see benchmarks/sweep.py):

- ideal: one clean pass of the whole model, plus, for each knockout, the positions after the
  blocked one at the language decoder's cost per position in the clean pass.
- needed: the work itself. The prompt's forward; each knockout's teacher-forced positions, up to
  where its own continuation leaves the clean one, at their linear layers' cost (the decoder's
  cost per position with its attention kernel's time taken out) plus attention over only the
  query-key pairs the knockout allows (the kernel's measured cost per pair); and, greedy decoding
  being sequential, one raw cached step per further token, over the clean continuation's row and
  every knockout that has left by then (each of those needs its own next position; a step cannot
  share a pass with the next one, and the knockouts still on the clean tokens are in the
  teacher-forced positions already).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vlmask.engine import steps as engine_steps  # its shared_cache at call time: a --before engine may lack it
from vlmask.engine.passes import NOTHING, PromptPasses
from vlmask.inputs.prompt import build_prompt
from vlmask.model.attention import attention_mask


def sync(vl) -> None:
    if vl.device.type == "cuda":
        torch.cuda.synchronize()


def left_at(masked_ids: list[list[int]], clean_ids: list[int]) -> list[int | None]:
    """Each knockout's first step whose greedy token is not the clean one's (None: it never leaves).

    Example:
        >>> left_at([[5, 6, 7], [5, 9, 9], [5, 6, 7]], [5, 6, 7])
        [None, 1, None]
    """
    firsts = ([s for s, (a, b) in enumerate(zip(own, clean_ids, strict=True)) if a != b] for own in masked_ids)
    return [steps[0] if steps else None for steps in firsts]


def rows_per_step(left: list[int | None], steps: int) -> list[int]:
    """For steps 1..steps-1, how many knockouts have left before it (each needs its own new position).

    Example:
        >>> rows_per_step([None, 1, 0], steps=4)  # step 1: the one that left at 0; steps 2, 3: both
        [1, 2, 2]
    """
    return [sum(t is not None and t < s for t in left) for s in range(1, steps)]


def allowed_pairs(positions: list[int], seq: int, stops: list[int] | None = None) -> int:
    """Query-key pairs a sweep must compute per layer: knockout ``p`` recomputes queries ``p+1..stop-1``
    (``stop`` = ``seq`` unless ``stops`` gives it), each over its causal keys but ``p``.

    Example:
        >>> allowed_pairs([2], seq=4)  # queries 3 (keys 0,1,3: query 3 sees 4 keys, 1 blocked)
        3
        >>> allowed_pairs([1, 1], seq=4, stops=[4, 3])  # (2 + 3) + 2
        7
    """
    stops = stops or [seq] * len(positions)
    return sum(q for p, stop in zip(positions, stops, strict=True) for q in range(p + 1, stop))


def with_types(inputs: dict, ids: torch.Tensor) -> dict:
    out = {**inputs, "input_ids": ids}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, ids.shape[1] - types.shape[1])], 1)
    return out


def _timed(vl, fn, repeats: int = 3) -> float:
    fn()  # warm-up
    sync(vl)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(vl)
    return (time.perf_counter() - start) / repeats


def clean_forward(vl, prompt, images, steps) -> tuple[float, float, float]:
    """Seconds for one forward of the whole final sequence (vision encoder included), of the language
    decoder alone over it (what a recomputed position costs), and of the whole model over the prompt alone."""
    built = build_prompt(vl.processor, prompt, images)
    inputs = {k: v.to(vl.device) for k, v in built.inputs.items() if k != "attention_mask"}
    extra = torch.zeros(1, steps - 1, dtype=inputs["input_ids"].dtype, device=vl.device)
    full = with_types(inputs, torch.cat([inputs["input_ids"], extra], 1))
    seen: dict = {}
    decoder = vl.hf.model.language_model
    hook = decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.inference_mode():
        vl.hf.model.rope_deltas = None
        vl.hf(**full)
        hook.remove()
        decoder_only = {k: seen[k] for k in ("inputs_embeds", "position_ids", "visual_pos_masks") if k in seen}
        decoder_only["deepstack_visual_embeds"] = seen.get("deepstack_visual_embeds")
        whole = _timed(vl, lambda: vl.hf(**full))
        alone = _timed(vl, lambda: vl.hf.lm_head(decoder(**decoder_only).last_hidden_state))
        vl.hf.model.rope_deltas = None
        prompt_only = _timed(vl, lambda: vl.hf(**inputs))
    return whole, alone, prompt_only


def attention_seconds(vl, seq: int) -> float:
    """Seconds for one layer's attention kernel over ``seq`` queries and keys, as the model runs it."""
    config = vl.text_config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, k, v = (torch.randn(1, heads, seq, head_dim, dtype=vl.dtype, device=vl.device) for _ in range(3))
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=vl.device).tril()[None, None]
    mask = allowed if vl.attn_implementation == "sdpa" else attention_mask(allowed[0], "eager", vl.dtype)
    if vl.attn_implementation == "sdpa":
        run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    else:
        run = lambda: torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5 + mask, -1) @ v  # noqa: E731
    with torch.inference_mode():
        return _timed(vl, run, repeats=5)


def _once(vl, fn) -> float:
    """Seconds of one call of ``fn`` (the device synchronized at both ends)."""
    sync(vl)
    start = time.perf_counter()
    fn()
    sync(vl)
    return time.perf_counter() - start


class Steps:
    """One decoder pass of one position per row (a generation step, logits only) after a prompt:
    through vlmask, and as the raw model's own cached step (its decoder and lm_head) over ``rows`` rows."""

    def __init__(self, vl, prompt, images) -> None:
        self.vl = vl
        built = build_prompt(vl.processor, prompt, images)
        ids = built.inputs["input_ids"]
        self.passes = PromptPasses.of(vl, built, ids.shape[1] + 1)
        self.dec = self.passes.clean_pass(ids, 1, attention=False).inputs.append_text(vl, 5)
        self.pos = self.dec.seq_len - 1

    def ours(self) -> None:
        self.passes.decoder_pass(self.dec, [NOTHING], [self.pos], starts=[self.pos], extend=True, internals=False)

    def raw(self, rows: int = 1):
        """The raw step over ``rows`` copies of the prompt's cache (made before the clock starts)."""
        dec, pos, vl = self.dec, self.pos, self.vl
        keys, values = ([t.expand(rows, -1, -1, -1) for t in states] for states in (dec.keys, dec.values))
        cache = engine_steps.shared_cache(vl, keys, values)
        embeds = dec.embeds[:, pos:].expand(rows, -1, -1)
        positions = None
        if dec.position_ids is not None:
            positions = dec.position_ids[..., pos:]
            positions = positions.expand(*positions.shape[:-2], rows, positions.shape[-1])
        return lambda: (
            vl.hf.lm_head(
                vl.decoder(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
            )
            .float()
            .cpu()
        )

    def one_position(self, repeats: int = 15) -> tuple[float, float]:
        """Median seconds of one position through vlmask and of the raw model's step, interleaved."""
        times: dict = {"vlmask": [], "raw": []}
        with torch.inference_mode():
            for _ in range(repeats + 2):  # the first two of each: warm-up
                for name in times:
                    times[name].append(_once(self.vl, self.raw() if name == "raw" else self.ours))
        return float(np.median(times["vlmask"][2:])), float(np.median(times["raw"][2:]))

    def raw_seconds(self, rows: int, repeats: int = 7) -> float:
        """Median seconds of the raw cached step over ``rows`` rows (each run on a fresh cache)."""
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                times.append(_once(self.vl, self.raw(rows)))
        return float(np.median(times[1:]))


def needed_figures(run: dict, vl, prompt, images, steps: int, tokens: int) -> dict:
    """What the worker records for the ideals (vlmask's own run: its positions and continuations)."""
    positions, seq = run["positions"], tokens + steps - 1
    left = left_at(run["masked_ids"], run["clean_ids"])
    stops = [seq if t is None else tokens + t for t in left]  # past that, the knockout's own tokens
    timer = Steps(vl, prompt, images)
    rows = rows_per_step(left, steps)
    out: dict = {"left_rows_per_step": rows}
    out["one_position_s"], out["raw_one_position_s"] = timer.one_position()
    out["raw_step_s"] = {str(n): timer.raw_seconds(n) for n in sorted({1 + n for n in rows})}
    out["clean_forward_s"], out["clean_decoder_s"], out["prompt_forward_s"] = clean_forward(vl, prompt, images, steps)
    out["attention_layer_s"] = attention_seconds(vl, seq)
    out["layers"] = vl.num_layers
    out["allowed_pairs"] = allowed_pairs(positions, seq)
    out["needed_pairs"] = allowed_pairs(positions, seq, stops)
    out["needed_positions"] = sum(stop - p - 1 for p, stop in zip(positions, stops, strict=True))
    return out


def ideals(runs: list[dict], median: dict[str, float]) -> dict:
    """The two ideals (per position, and by the work strictly needed), from vlmask's own measurements.

    "needed (no steps)" is the earlier, looser figure: the clean continuation teacher-forced in one
    forward and no sequential steps for the knockouts that leave (a lower bound, kept for comparison).
    Step ``s``'s one pass: the clean row and the ``rows_per_step`` knockouts that have left.
    """
    med = lambda key: float(np.median([r[key] for r in runs]))  # noqa: E731
    forward, decoder, attention, prompt_only = (
        med(k) for k in ("clean_forward_s", "clean_decoder_s", "attention_layer_s", "prompt_forward_s")
    )
    fast = runs[0]
    per_position = decoder / fast["seq"]
    linear = max(decoder - fast["layers"] * attention, 0.0) / fast["seq"]
    per_pair = attention / fast["seq"] ** 2  # the kernel computes every pair, masked or not
    raw_step = {n: float(np.median([r["raw_step_s"][n] for r in runs])) for n in fast["raw_step_s"]}
    generated = sum(raw_step[str(1 + n)] for n in fast["left_rows_per_step"])  # steps 1..steps-1
    ideal = forward + fast["recomputed"] * per_position
    loose = forward + fast["recomputed"] * linear + fast["layers"] * fast["allowed_pairs"] * per_pair
    pairs = fast["layers"] * fast["needed_pairs"] * per_pair
    needed = prompt_only + fast["needed_positions"] * linear + pairs + generated
    return {
        "ideal_s": round(ideal, 3),
        "ideal_speedup": round(median["naive"] / ideal, 2),
        "vlmask_efficiency": round(ideal / median["vlmask"], 3),
        "needed_s": round(needed, 3),
        "needed_speedup": round(median["naive"] / needed, 2),
        "vlmask_vs_needed": round(needed / median["vlmask"], 3),
        "needed_sequential_s": round(generated, 3),
        "left_rows_per_step": fast["left_rows_per_step"],
        "needed_no_steps_s": round(loose, 3),
        "vlmask_vs_needed_no_steps": round(loose / median["vlmask"], 3),
        "attention_share_of_decoder": round(fast["layers"] * attention / decoder, 3),
    }
