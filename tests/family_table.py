"""The correctness table every supported family passes, on a tiny random model of that family.

Each check takes ``(sdpa, eager, images)``: the same checkpoint loaded with both attention
implementations through ``vlmask.load_model``, and the session's test images (ignored by
text-only families). A family's test file runs every check in :data:`TABLE`.
"""

from __future__ import annotations

import pytest
import torch

import vlmask
from interventions import BlockKeys
from tests.reference import decoder_of, extended, greedy, hand_mask, hooked, reference_run
from vlmask.engine.passes import PromptPasses
from vlmask.inputs.prompt import build_prompt

PROMPT = "what color is the circle ?"


def _prompt(vl, images):
    files = [images["square"]] if vl.family.vision else []
    return files, build_prompt(vl.processor, PROMPT, files)


def _positions(built) -> list[int]:
    """First, a text token, a vision token (if any), the one before last and the last position."""
    kinds, n = built.tokens.kind, len(built.tokens)
    chosen = {0, kinds.index("text", 1), n - 2, n - 1}
    if "vision" in kinds:
        chosen |= {kinds.index("vision") + 1, kinds.index("text", kinds.index("vision"))}
    return sorted(chosen)


def knockout_equals_reference(sdpa, eager, images):
    """nnsight knockout (whole model, every position read) = plain-PyTorch hand-built-mask reference."""
    for vl in (sdpa, eager):
        _, built = _prompt(vl, images)
        seq = len(built.tokens)
        passes = PromptPasses.of(vl, built, seq)
        for p in _positions(built):
            out = passes.model_pass(built.inputs["input_ids"], [BlockKeys((p,))], list(range(seq))).readout
            want = reference_run(vl, built.inputs, {p})
            got = (out.residual[0], out.heads[0].flatten(-2), out.logits[0])
            for name, g, w in zip(("residual", "heads", "logits"), got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"{name} differs at p={p}")
            if p < seq - 1:
                clean = reference_run(vl, built.inputs, set())
                assert not torch.allclose(want[2][p + 1 :], clean[2][p + 1 :], atol=1e-4), f"p={p} changed nothing"


def positions_up_to_p_unchanged(sdpa, eager, images):
    """Blocking key p leaves every position <= p bit-identical, in one batch of knockouts."""
    for vl in (sdpa, eager):
        _, built = _prompt(vl, images)
        seq = len(built.tokens)
        ids = built.inputs["input_ids"]
        passes = PromptPasses.of(vl, built, seq)
        positions = _positions(built)[:-1]
        rows = [BlockKeys(()), *(BlockKeys((p,)) for p in positions)]  # the clean row in the same batch
        out = passes.model_pass(ids.expand(len(rows), -1), rows, list(range(seq))).readout
        for row, p in enumerate(positions, start=1):
            assert torch.equal(out.residual[row, :, : p + 1], out.residual[0, :, : p + 1]), f"p={p}"
            assert torch.equal(out.logits[row, : p + 1], out.logits[0, : p + 1]), f"p={p}"
            assert not torch.equal(out.logits[row, p + 1 :], out.logits[0, p + 1 :]), f"p={p} changed nothing"


def blocking_nothing_is_the_native_forward(sdpa, eager, images):
    _, built = _prompt(sdpa, images)
    seq = len(built.tokens)
    out = PromptPasses.of(sdpa, built, seq).model_pass(built.inputs["input_ids"], [BlockKeys(())], list(range(seq)))
    out = out.readout
    with torch.no_grad():
        native = sdpa.hf(**built.inputs).logits[0]
    torch.testing.assert_close(out.logits[0], native, atol=1e-5, rtol=1e-5)


def sdpa_equals_eager(sdpa, eager, images):
    files, _ = _prompt(sdpa, images)
    a, b = (vlmask.sweep(vl, PROMPT, files, mask="all", num_tokens=2, progress=False) for vl in (sdpa, eager))
    # residual and heads are distances between float32 vectors of norm up to ~30 (LLaVA-NeXT's): rounding
    # alone moves them by ~1e-5 there (measured: 1.34e-5 once attention ran per knockout), so 2e-5
    for name, atol in (("residual", 2e-5), ("heads", 2e-5), ("kl", 1e-5), ("logprob_drop", 1e-5)):
        torch.testing.assert_close(
            torch.from_numpy(a[name].values), torch.from_numpy(b[name].values), atol=atol, rtol=1e-4
        )


def fast_equals_naive(sdpa, eager, images):
    """The shipped sweep (vision once, clean prefix reused, packed passes) = full reruns with hand-built masks."""
    steps = 2
    files, built = _prompt(sdpa, images)
    ds = vlmask.sweep(sdpa, PROMPT, files, mask="all", num_tokens=steps, batch_size=4, progress=False)
    clean_ids = greedy(sdpa, built.inputs, steps)
    assert ds["step_token_id"].values.tolist() == clean_ids
    forced = extended(built.inputs, clean_ids[:-1])
    n = len(built.tokens)
    clean = reference_run(sdpa, forced, set())
    for p in _positions(built):
        masked = reference_run(sdpa, forced, {p})
        for step in range(steps):
            pos, row = n - 1 + step, ds.sel(token=p, step=step)
            l2 = (masked[0][:, pos] - clean[0][:, pos]).norm(dim=-1)
            torch.testing.assert_close(
                torch.from_numpy(row["residual"].sel(metric="l2").values), l2, atol=1e-4, rtol=1e-4
            )
            lc, lm = (torch.log_softmax(x[2][pos].double(), -1) for x in (clean, masked))
            assert float(row["kl"]) == pytest.approx(float((lc.exp() * (lc - lm)).sum()), abs=1e-5)
            top = int(lc.argmax())
            assert float(row["logprob_drop"]) == pytest.approx(float(lc[top] - lm[top]), abs=1e-5)
        assert ds["masked_token_id"].sel(token=p).values.tolist() == greedy(sdpa, built.inputs, steps, {p})


def eager_attentions(eager, inputs: dict, read: list[int], **mask) -> torch.Tensor:
    """transformers' own ``output_attentions=True`` of the eager model at the query rows ``read``:
    ``(layer, read, head, key)``; ``mask`` (``blocked``, ``bidirectional``) is a hand-built mask handed to
    every layer, as in :func:`tests.reference.reference_run`."""
    seq = inputs["input_ids"].shape[1]
    hand = hand_mask(seq, set(mask.get("blocked", ())), "eager", eager.dtype, list(mask.get("bidirectional", ())))
    layers = range(decoder_of(eager.hf).config.num_hidden_layers)
    with torch.no_grad(), hooked(eager.hf, dict.fromkeys(layers, hand)):
        out = eager.hf(**inputs, output_attentions=True)
    return torch.stack([a[0][:, read].transpose(0, 1) for a in out.attentions]).float()


def attention_readout_error(vl, eager, images, backend: str, steps: int = 2) -> float:
    """Largest difference of ``vl``'s clean attention readout (``steps`` steps) from eager ``output_attentions``."""
    _, built = _prompt(vl, images)
    ids = built.inputs["input_ids"]
    passes = PromptPasses.of(vl, built, ids.shape[1] + steps - 1, backend=backend)
    clean = passes.clean_pass(ids, steps, attention=True)
    read = list(range(ids.shape[1] - 1, ids.shape[1] + steps - 1))
    want = eager_attentions(eager, extended(built.inputs, clean.tokens[:-1].tolist()), read)
    got = clean.readout.attention[0]
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
    return float((got - want).abs().max())


def attention_readout_equals_eager(sdpa, eager, images):
    """The clean attention readout (sdpa and eager models, both backends) = transformers' eager output_attentions."""
    for vl in (sdpa, eager):
        for backend in ("nnsight", "hooks"):
            error = attention_readout_error(vl, eager, images, backend)
            assert error <= 1e-5, f"{vl.attn_implementation}/{backend}: attention differs by {error:.2e}"


TABLE = (
    knockout_equals_reference,
    positions_up_to_p_unchanged,
    blocking_nothing_is_the_native_forward,
    sdpa_equals_eager,
    fast_equals_naive,
    attention_readout_equals_eager,
)
