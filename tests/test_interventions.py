"""Intervention values against independent plain-PyTorch hook references, their invariants and JSON."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

import interventions
import vlmask
from interventions import (
    HOOKS,
    AblateHeads,
    At,
    BlockEdges,
    BlockKeys,
    Compose,
    Intervention,
    ModelShape,
    PatchResidual,
    compose,
    from_dict,
)
from tests.reference import edited_run, extended
from vlmask import VlmaskError
from vlmask.engine.passes import NOTHING, PromptPasses
from vlmask.inputs.prompt import build_prompt

PROMPT = "what color is the circle ?"


@pytest.fixture(scope="module")
def built(tiny, images):
    return build_prompt(tiny.processor, PROMPT, [images["square"]])


def _engine(vl, built, iv):
    """The engine's full-model pass under ``iv``, read at every position."""
    ids = built.inputs["input_ids"]
    passes = PromptPasses.of(vl, built, ids.shape[1])
    if iv.needs_head_means:
        passes = passes.with_head_means(ids)
    out = passes.model_pass(ids, [iv], list(range(ids.shape[1]))).readout
    return out.residual[0], out.heads[0].flatten(-2), out.logits[0]


def _close(got, want, atol=1e-5):
    for name, g, w in zip(("residual", "heads", "logits"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5, msg=f"{name} differs")


def _places(built):
    kinds = built.tokens.kind
    vision = [p for p, k in enumerate(kinds) if k == "vision"]
    question = [p for p, k in enumerate(kinds) if k == "text" and p > vision[-1]]
    return vision, question


def _edge_masks(vl, seq, sources, targets, layers):
    """Hand-built masks, explicit loops: query t may not read key s (t > s) at ``layers``."""
    implementation = vl.attn_implementation
    out = {}
    for layer in layers:
        allowed = [[k <= q and not (q in targets and k in sources and q > k) for k in range(seq)] for q in range(seq)]
        allowed = torch.tensor(allowed)[None, None]
        if implementation == "eager":
            allowed = torch.where(allowed, 0.0, torch.finfo(vl.dtype).min)
        out[layer] = allowed
    return out


def _zero_heads(heads, head_dim):
    def edit(x):
        for h in heads:
            x[..., h * head_dim : (h + 1) * head_dim] = 0
        return x

    return edit


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_block_edges_equals_hand_built_mask(tiny, tiny_eager, images, implementation):
    vl = tiny if implementation == "sdpa" else tiny_eager
    built = build_prompt(vl.processor, PROMPT, [images["square"]])
    vision, question = _places(built)
    seq = len(built.tokens)
    iv = BlockEdges(sources=vision[:8], targets=question, layers=(1, 2))
    got = _engine(vl, built, iv)
    want = edited_run(vl, built.inputs, _edge_masks(vl, seq, set(vision[:8]), set(question), (1, 2)))
    _close(got, want)
    clean = edited_run(vl, built.inputs)
    assert not torch.allclose(want[2][question[0] :], clean[2][question[0] :], atol=1e-4), "cut nothing"
    assert torch.equal(got[2][: question[0]], _engine(vl, built, NOTHING)[2][: question[0]])


def test_ablate_heads_zero_equals_zeroing_the_o_proj_input_slice(tiny, built):
    head_dim = tiny.text_config.head_dim
    got = _engine(tiny, built, AblateHeads(layer=1, heads=(0, 2)))
    want = edited_run(tiny, built.inputs, heads={1: _zero_heads((0, 2), head_dim)})
    _close(got, want)
    assert float(want[1][1][:, :head_dim].abs().max()) == 0.0
    assert not torch.allclose(want[2], edited_run(tiny, built.inputs)[2], atol=1e-4)


def test_ablate_heads_mean_uses_the_unmodified_prompt_mean(tiny, built):
    head_dim = tiny.text_config.head_dim
    plain_heads = edited_run(tiny, built.inputs)[1][2]  # layer 2's o_proj input (S, H*d)
    mean = plain_heads.mean(0)

    def to_mean(x):
        x[..., head_dim : 2 * head_dim] = mean[head_dim : 2 * head_dim]
        return x

    got = _engine(tiny, built, AblateHeads(layer=2, heads=(1,), mode="mean"))
    want = edited_run(tiny, built.inputs, heads={2: to_mean})
    _close(got, want)
    zeroed = _engine(tiny, built, AblateHeads(layer=2, heads=(1,)))
    assert not torch.allclose(got[2], zeroed[2], atol=1e-4)


def test_patch_residual_equals_a_plain_forward_hook(tiny, built):
    _, question = _places(built)
    targets = (question[1], question[3])
    source = vlmask.capture_residual(tiny, "describe the picture", layer=0, positions=[2, 1])
    plain_other = edited_run(tiny, build_prompt(tiny.processor, "describe the picture").inputs)[0][0]
    torch.testing.assert_close(source, plain_other[[2, 1]], atol=1e-6, rtol=1e-6)

    def patch(y):
        y[0, list(targets)] = source
        return y

    iv = PatchResidual(layer=0, positions=targets, source=source)
    got = _engine(tiny, built, iv)
    want = edited_run(tiny, built.inputs, outputs={0: patch})
    _close(got, want)
    torch.testing.assert_close(got[0][0, list(targets)], source)


CHANGES = [
    (BlockKeys((10,)), 11),
    (BlockKeys((10,), layers=(2,)), 11),
    (BlockEdges(sources=(3, 9), targets=(2, 7, 12)), 7),
    (BlockEdges(sources=(9, 11), targets=(2, 7, 12)), 12),
    (BlockEdges(sources=(9,), targets=(2, 7)), None),  # no target after a source: cuts nothing
    (AblateHeads(1, (0,)), 0),
    (PatchResidual(1, (14, 12), [[1.0] * 64, [2.0] * 64]), 12),
    (BlockKeys((15,)) & PatchResidual(0, (13,), [[0.5] * 64]), 13),
]


@pytest.mark.parametrize(("iv", "first"), CHANGES, ids=[type(c[0]).__name__ for c in CHANGES])
def test_positions_before_first_changed_are_bit_identical(tiny, built, iv, first):
    seq = len(built.tokens)
    assert iv.first_changed(seq, ModelShape(tiny.num_layers)) == (seq if first is None else first)
    clean, got = _engine(tiny, built, NOTHING), _engine(tiny, built, iv)
    stop = seq if first is None else first
    assert torch.equal(got[0][:, :stop], clean[0][:, :stop]) and torch.equal(got[1][:, :stop], clean[1][:, :stop])
    assert torch.equal(got[2][:stop], clean[2][:stop])
    if first is not None:
        assert not torch.equal(got[0][:, first], clean[0][:, first]), "the first changed position did not change"


def _kl(clean, masked):
    pc, pm = torch.softmax(clean.double(), -1), torch.softmax(masked.double(), -1)
    return float((pc * (pc.log() - pm.log())).sum())


def _edits(iv, head_dim, means=None):
    """The reference's hooks for a value: masks, o_proj pre-hooks and layer-output hooks (by hand)."""
    parts = iv.parts if isinstance(iv, Compose) else (iv,)
    masks, heads, outputs = {}, {}, {}
    for part in parts:
        if isinstance(part, AblateHeads):
            if part.mode == "zero":
                heads[part.layer] = _zero_heads(part.heads, head_dim)
            else:

                def to_mean(x, part=part):
                    for h in part.heads:
                        x[..., h * head_dim : (h + 1) * head_dim] = means[part.layer][h * head_dim : (h + 1) * head_dim]
                    return x

                heads[part.layer] = to_mean
        elif isinstance(part, PatchResidual):

            def patch(y, part=part):
                y[0, list(part.positions)] = torch.tensor(part.source)
                return y

            outputs[part.layer] = patch
        else:
            sources = set(part.positions) if isinstance(part, BlockKeys) else set(part.sources)
            targets = None if isinstance(part, BlockKeys) else set(part.targets)
            masks[part] = (sources, targets, part.layers)
    return masks, heads, outputs


def _reference(vl, inputs, iv, means=None):
    masks, heads, outputs = _edits(iv, vl.text_config.head_dim, means)
    seq = inputs["input_ids"].shape[1]
    cut = {layer: set() for layer in range(vl.num_layers)}
    for sources, targets, layers in masks.values():
        for layer in layers if layers is not None else range(vl.num_layers):
            cut[layer] |= {(q, k) for q in range(seq) for k in sources if q > k and (targets is None or q in targets)}
    hand = {}
    for layer, edges in cut.items():
        allowed = torch.tensor([[k <= q and (q, k) not in edges for k in range(seq)] for q in range(seq)])[None, None]
        hand[layer] = (
            allowed if vl.attn_implementation == "sdpa" else torch.where(allowed, 0.0, torch.finfo(vl.dtype).min)
        )
    return edited_run(vl, inputs, hand, heads, outputs)


def _reference_greedy(vl, inputs, n, iv):
    new = []
    for _ in range(n):
        new.append(int(_reference(vl, extended(inputs, new), iv)[2][-1].argmax()))
    return new


@pytest.mark.parametrize("which", ["heads", "edges", "patch"])
def test_base_and_knockout_equal_the_composed_reference(tiny, images, built, which):
    vision, question = _places(built)
    base = {
        "heads": AblateHeads(1, (3,)),
        "edges": BlockEdges(vision, question, layers=(0,)),
        "patch": PatchResidual(1, (question[1],), torch.full((1, 64), 0.7)),
    }[which]
    steps, chosen = 2, [vision[2], question[0], len(built.tokens) - 2]
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], mask=chosen, base=base, num_tokens=steps, progress=False)
    clean_ids = _reference_greedy(tiny, built.inputs, steps, base)
    assert ds["step_token_id"].values.tolist() == clean_ids
    forced = extended(built.inputs, clean_ids[:-1])
    n = built.inputs["input_ids"].shape[1]
    clean = _reference(tiny, forced, base)
    assert not torch.allclose(clean[2][n - 1 :], edited_run(tiny, forced)[2][n - 1 :], atol=1e-4), "base did nothing"
    for p in chosen:
        masked = _reference(tiny, forced, base & BlockKeys((p,)))
        for step in range(steps):
            pos, row = n - 1 + step, ds.sel(token=p, step=step)
            l2 = (masked[0][:, pos] - clean[0][:, pos]).norm(dim=-1)
            scale = float(clean[0][:, pos].norm(dim=-1).max())  # float32 rounding of the residual itself
            torch.testing.assert_close(
                torch.from_numpy(row["residual"].sel(metric="l2").values), l2, atol=max(1e-5, 1e-6 * scale), rtol=1e-4
            )
            assert float(row["kl"]) == pytest.approx(_kl(clean[2][pos], masked[2][pos]), abs=1e-5)
    base_back, knockouts = vlmask.interventions_of(ds)
    assert base_back == base and knockouts.sel(token=chosen[1]).item() == BlockKeys((chosen[1],))


def test_sweep_over_a_list_of_interventions_matches_the_reference(tiny, images, built):
    vision, question = _places(built)
    seq = len(built.tokens)
    means = edited_run(tiny, built.inputs)[1].mean(1)  # (layer, H*d), the unmodified prompt means
    source = torch.randn(1, tiny.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    over = [
        BlockEdges(sources=vision, targets=question),
        AblateHeads(2, (1, 3), mode="mean"),
        PatchResidual(1, (question[1],), source),
        BlockKeys((question[0],)) & AblateHeads(0, (0,)),
    ]
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], over=over, num_tokens=1, batch_size=3, progress=False)
    assert ds["kl"].dims == ("step", "intervention")
    assert ds["intervention_type"].values.tolist() == ["BlockEdges", "AblateHeads", "PatchResidual", "Compose"]
    clean = edited_run(tiny, built.inputs)
    for i, iv in enumerate(over):
        masked = _reference(tiny, built.inputs, iv, means)
        assert float(ds["kl"].sel(step=0, intervention=i)) == pytest.approx(
            _kl(clean[2][seq - 1], masked[2][seq - 1]), abs=1e-5
        ), f"intervention {i}"
        assert from_dict(json.loads(ds["intervention_json"].values[i])) == iv
        assert float(ds["kl"].sel(step=0, intervention=i)) > 0, f"intervention {i} changed nothing"


def test_patches_recomputed_from_a_later_position_match_the_reference(tiny, images, built):
    _, question = _places(built)
    g = torch.Generator().manual_seed(1)
    over = [
        PatchResidual(1, (question[2],), torch.randn(1, 64, generator=g)),
        PatchResidual(0, (question[4], question[1]), torch.randn(2, 64, generator=g)),
    ]
    steps = 2
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], over=over, num_tokens=steps, batch_size=1, progress=False)
    forced = extended(built.inputs, ds["step_token_id"].values.tolist()[:-1])
    clean, n = edited_run(tiny, forced), len(built.tokens)
    for i, iv in enumerate(over):
        masked = _reference(tiny, forced, iv)
        for step in range(steps):
            pos = n - 1 + step
            got = float(ds["kl"].sel(step=step, intervention=i))
            assert got == pytest.approx(_kl(clean[2][pos], masked[2][pos]), abs=1e-5) and got > 0


def test_layer_windows_add_a_window_dimension(tiny, images, built):
    vision, question = _places(built)
    chosen = [vision[0], question[0]]
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], mask=chosen, layers=vlmask.windows(k=3), progress=False)
    assert ds["residual"].dims == ("step", "token", "window", "layer", "metric")
    assert ds["masked_token_id"].dims == ("token", "window", "step")
    assert ds["window"].values.tolist() == [0, 1, 2]
    assert ds["window_start"].values.tolist() == [0, 0, 1] and ds["window_end"].values.tolist() == [1, 2, 2]
    for centre, layers in ((0, [0, 1]), (1, [0, 1, 2]), (2, [1, 2])):
        alone = vlmask.sweep(tiny, PROMPT, [images["square"]], mask=chosen, layers=layers, progress=False)
        for name in ("residual", "kl", "logprob_drop"):
            np.testing.assert_allclose(ds[name].sel(window=centre).values, alone[name].values, atol=1e-5, rtol=1e-5)
    _, knockouts = vlmask.interventions_of(ds)
    assert knockouts.sel(token=chosen[1], window=2).item() == BlockKeys((chosen[1],), layers=(1, 2))
    assert {"window", "window_start", "window_end"} <= set(vlmask.long_table(ds).columns)
    with pytest.raises(VlmaskError, match="select one window first"):
        vlmask.heatmap(ds)

    flow = BlockEdges(sources=vision, targets=question)
    windowed = vlmask.sweep(
        tiny, PROMPT, [images["square"]], over=[flow], layers=vlmask.windows(k=1, centres=[2]), progress=False
    )
    assert windowed["kl"].dims == ("step", "intervention", "window")
    assert vlmask.interventions_of(windowed)[1].item() == BlockEdges(vision, question, layers=(2,))
    with pytest.raises(VlmaskError, match="acts at its own layer"):
        vlmask.sweep(tiny, PROMPT, [images["square"]], over=[AblateHeads(0, (1,))], layers=[0], progress=False)


def test_results_record_exactly_what_was_applied(tiny, images, built, tmp_path):
    vision, question = _places(built)
    base = AblateHeads(0, (2,), mode="mean")
    over = [BlockEdges(vision, question), PatchResidual(2, (question[0],), torch.ones(1, 64))]
    ds = vlmask.sweep(tiny, PROMPT, [images["square"]], over=over, base=base, progress=False)
    again = vlmask.open_results(vlmask.save_results(ds, tmp_path / "r.nc"))
    xr.testing.assert_identical(again, ds)
    base_back, knockouts = vlmask.interventions_of(again)
    assert base_back == base and knockouts.values.tolist() == over
    assert json.loads(again.attrs["base"]) == base.to_dict() and again.attrs["over"] == "intervention"


def _random_value(rng: random.Random, depth: int = 0):
    def some(n=4):
        return tuple(rng.sample(range(40), rng.randint(0, n)))

    kind = rng.choice(["keys", "edges", "heads", "patch", "compose"] if depth < 2 else ["keys", "edges", "heads"])
    layers = rng.choice([None, tuple(rng.sample(range(8), rng.randint(1, 3)))])
    if kind == "keys":
        return BlockKeys(some(), layers=layers)
    if kind == "edges":
        return BlockEdges(some(), some(), layers=layers)
    if kind == "heads":
        return AblateHeads(rng.randrange(8), some(3) or (0,), mode=rng.choice(["zero", "mean"]))
    if kind == "patch":
        positions = tuple(rng.sample(range(40), rng.randint(1, 3)))
        return PatchResidual(rng.randrange(8), positions, [[rng.uniform(-3, 3) for _ in range(5)] for _ in positions])
    return Compose([_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))])


@pytest.mark.parametrize("seed", range(40))
def test_json_round_trip(seed):
    value = _random_value(random.Random(seed))
    data = value.to_dict()
    text = json.dumps(data)
    back = from_dict(json.loads(text))
    assert back == value and hash(back) == hash(value) and back.to_dict() == data
    extra = BlockKeys((1,))
    parts = (*(value.parts if isinstance(value, Compose) else (value,)), extra)
    both = value & extra
    assert (both.parts if isinstance(both, Compose) else (both,)) == parts  # flattened, in order, value first
    assert both.to_dict()["type"] == ("BlockKeys" if len(parts) == 1 else "Compose")
    assert from_dict(both.to_dict()) == both


def test_composition_flattens_and_combines():
    a, b, c = BlockKeys((1,)), AblateHeads(0, (1,)), BlockEdges((0,), (5,), layers=(2,))
    assert (a & b) & c == a & (b & c) == Compose([a, b, c])
    assert Compose() & a == a and (a & b).parts == (a, b)
    both = a & c
    at = At(layer=2, seq_len=6)
    assert both.blocked_edges(at).tolist() == (a.blocked_edges(at) | c.blocked_edges(at)).tolist()
    assert both.blocked_edges(At(layer=0, seq_len=6)).tolist() == a.blocked_edges(At(layer=0, seq_len=6)).tolist()
    assert both.attention_key(0) != both.attention_key(2) and both.attention_key(0) is not None
    assert Compose([b]).attention_key(0) is None and not Compose().acts_at(0)
    assert Compose([b]).blocked_edges(At(layer=0, seq_len=6)) is None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: BlockEdges((1,), ("x",)), "non-negative integers"),
        (lambda: AblateHeads(0, ()), "heads is empty"),
        (lambda: AblateHeads(0, (1,), mode="half"), r"mode 'half' is not known: expected one of \('zero', 'mean'\)"),
        (lambda: AblateHeads(-1, (1,)), "layer must be a non-negative integer, got -1"),
        (lambda: PatchResidual(0, (1, 2), [[1.0, 2.0]]), "1 rows but there are 2 positions"),
        (lambda: PatchResidual(0, (1,), [1.0, 2.0]), "must be 2D"),
        (lambda: PatchResidual(0, (1, 1), [[1.0], [2.0]]), "must be distinct"),
        (lambda: Compose([BlockKeys((1,)), "x"]), "Compose parts must be interventions"),
        (lambda: from_dict({"type": "BlockEdges", "sources": [1]}), "needs the field 'targets'"),
        (lambda: from_dict({"type": "BlockKeys", "positions": [1], "layer": 2}), "has no field 'layer'"),
        (lambda: from_dict({"type": "Nope"}), "unknown intervention type 'Nope'"),
        (lambda: vlmask.windows(k=4), "positive odd number"),
        (lambda: AblateHeads(0, (5,)).check(10, ModelShape(3, num_heads=4)), "head 5 is out of range: layer 0 has 4"),
        (lambda: PatchResidual(0, (1,), [[1.0]]).check(10, ModelShape(3, hidden_size=64)), "hidden size is 64"),
        (lambda: BlockEdges((1,), (12,)).check(10, ModelShape(3)), "target position 12 is out of range"),
    ],
)
def test_validation_messages(make, match):
    with pytest.raises(VlmaskError, match=match):
        make()


def test_sweep_refuses_mask_with_over(tiny):
    with pytest.raises(VlmaskError, match="not both"):
        vlmask.sweep(tiny, "test", mask="text", over=[BlockKeys((0,))], progress=False)
    with pytest.raises(VlmaskError, match="head 9 is out of range"):
        vlmask.sweep(tiny, "test", base=AblateHeads(0, (9,)), progress=False)


@dataclasses.dataclass(frozen=True)
class ScaleResidual(Intervention):
    """A user-defined value: decoder layer ``layer``'s output scaled by ``factor`` at every position."""

    layer: int
    factor: float

    def acts_at(self, layer: int) -> bool:
        return layer == self.layer

    def edit_residual(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        return hidden * self.factor


def test_a_subclass_registers_itself_and_runs_through_sweep(images):
    vl = vlmask.load_model()  # the built-in model
    built = build_prompt(vl.processor, PROMPT, [images["square"]])
    value = ScaleResidual(layer=1, factor=0.25)
    assert value.to_dict() == {"type": "ScaleResidual", "layer": 1, "factor": 0.25}
    assert from_dict(json.loads(json.dumps(value.to_dict()))) == value
    ds = vlmask.sweep(vl, PROMPT, [images["square"]], over=[value, value & BlockKeys((2,))], progress=False)
    assert ds["intervention_type"].values.tolist() == ["ScaleResidual", "Compose"]
    assert vlmask.interventions_of(ds)[1].values.tolist() == [value, value & BlockKeys((2,))]
    seq = len(built.tokens)
    clean = edited_run(vl, built.inputs)[2][seq - 1]
    scaled = edited_run(vl, built.inputs, outputs={1: lambda y: y * 0.25})[2][seq - 1]
    got = float(ds["kl"].sel(step=0, intervention=0))
    assert got == pytest.approx(_kl(clean, scaled), abs=1e-5) and got > 0


def test_hooks_are_derived_from_the_methods_a_subclass_overrides():
    @dataclasses.dataclass(frozen=True)
    class Nothing(Intervention):
        pass

    @dataclasses.dataclass(frozen=True)
    class HeadsAndResidual(Intervention):
        layer: int = 0

        def acts_at(self, layer: int) -> bool:
            return layer == self.layer

        def edit_residual(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
            return hidden

        def edit_heads(self, heads: torch.Tensor, at: At) -> torch.Tensor:
            return heads

    @dataclasses.dataclass(frozen=True)
    class Cut(Intervention):
        def blocked_edges(self, at: At) -> torch.Tensor:
            return torch.ones(at.seq_len, at.seq_len, dtype=torch.bool).tril(-1)

    assert HOOKS == ("attention", "heads", "mlp", "residual")
    nothing, both, cut = Nothing(), HeadsAndResidual(layer=2), Cut()
    assert nothing.hooks(0) == frozenset() and nothing.attention_key(0) is None
    assert nothing.first_changed(7, ModelShape(4)) == 7 and not nothing.needs_head_means
    assert both.hooks(2) == {"heads", "residual"} and both.hooks(1) == frozenset()
    assert both.first_changed(7, ModelShape(4)) == 0 and both.first_changed(7, ModelShape(2)) == 7
    assert cut.hooks(3) == {"attention"} and cut.attention_key(3) == 3 and cut.attention_key(0) != 3
    assert (both & cut).hooks(2) == {"attention", "heads", "residual"} and (both & cut).hooks(0) == {"attention"}
    x = torch.randn(3, 2)
    assert torch.equal(Intervention.edit_residual(nothing, x, At(0, 3)), x) and nothing.blocked_edges(At(0, 3)) is None
    assert nothing.check(5, ModelShape(1)) is None and nothing.to_dict() == {"type": "Nothing"}
    assert from_dict({"type": "HeadsAndResidual", "layer": 2}) == both


def test_with_layers_moves_only_values_that_take_layers():
    keys, heads, patch = BlockKeys((1,)), AblateHeads(0, (1,)), PatchResidual(0, (1,), [[1.0]])
    assert keys.with_layers((2, 3)) == BlockKeys((1,), layers=(2, 3))
    assert BlockEdges((0,), (4,)).with_layers((1,)) == BlockEdges((0,), (4,), layers=(1,))
    assert (keys & heads).with_layers((2,)) == BlockKeys((1,), layers=(2,)) & heads
    for value in (heads, patch, heads & patch, Compose(), ScaleResidual(0, 2.0)):
        with pytest.raises(VlmaskError, match="acts at its own layer: layers and windows apply only to"):
            value.with_layers((0,))


def test_a_type_name_is_taken_once_and_values_must_be_dataclasses():
    with pytest.raises(VlmaskError, match=r"'BlockKeys' is already interventions\.block_keys\.BlockKeys"):
        type("BlockKeys", (Intervention,), {})
    assert from_dict(BlockKeys((1,)).to_dict()) == BlockKeys((1,))  # the built-in is still the one registered

    class NotADataclass(Intervention):
        pass

    with pytest.raises(VlmaskError, match="NotADataclass is not a dataclass"):
        NotADataclass().to_dict()
    assert compose(NotADataclass()).hooks(0) == frozenset()
    assert set(interventions.__all__) >= {"At", "Intervention", "ModelShape", "from_dict"}


def test_a_new_hook_point_the_mlp_output_runs_on_both_backends():
    """The worked example of adding a hook point: ``edit_mlp`` on the base, its use in the engine."""
    import dataclasses

    from interventions import Intervention

    @dataclasses.dataclass(frozen=True)
    class ScaleMLP(Intervention):
        layer: int
        factor: float

        def acts_at(self, layer: int) -> bool:
            return layer == self.layer

        def edit_mlp(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
            return hidden * self.factor

    vl = vlmask.load_model()
    over = [ScaleMLP(1, 1.0), ScaleMLP(1, 0.0)]
    # text only; a prompt whose answer is not saturated (the retrained model answers "what color is the
    # circle ?" without an image at p = 0.9999, and zeroing layer 1's MLP there costs only 9e-5 nats)
    prompt = "what is the red shape ?"
    kls = [vlmask.sweep(vl, prompt, over=over, progress=False, backend=b) for b in ("nnsight", "hooks")]
    for ds in kls:
        assert float(ds["kl"].sel(step=0, intervention=0)) < 1e-6
        assert float(ds["kl"].sel(step=0, intervention=1)) > 1e-3
    torch.testing.assert_close(torch.from_numpy(kls[0]["kl"].values), torch.from_numpy(kls[1]["kl"].values))
    from vlmask.inputs.prompt import build_prompt  # an independent reference: a plain hook on the full forward

    inputs = build_prompt(vl.processor, prompt, []).inputs
    with torch.no_grad():
        clean = torch.log_softmax(vl.hf(**inputs).logits[0, -1].double(), -1)
        handle = vl.decoder.layers[1].mlp.register_forward_hook(lambda module, args, y: y * 0.0)
        try:
            masked = torch.log_softmax(vl.hf(**inputs).logits[0, -1].double(), -1)
        finally:
            handle.remove()
    want = float((clean.exp() * (clean - masked)).sum())
    assert float(kls[0]["kl"].sel(step=0, intervention=1)) == pytest.approx(want, abs=1e-5)


def test_from_dict_knows_every_built_in_type_in_a_fresh_process():
    """The built-in values' modules load on first use; rebuilding one by name (a JSON ``--base``, a batch file's
    ``base:``, a saved result's interventions) must not depend on what the process imported before."""
    code = (
        "import json, vlmask\n"
        "from interventions import from_dict\n"
        "for d in [{'type': 'AblateHeads', 'layer': 1, 'heads': [2]}, {'type': 'BlockKeys', 'positions': [3]},\n"
        "          {'type': 'BlockEdges', 'sources': [1], 'targets': [4]},\n"
        "          {'type': 'PatchResidual', 'layer': 0, 'positions': [1], 'source': [[0.0] * 4]}]:\n"
        "    assert from_dict(d).to_dict()['type'] == d['type']\n"
        "    assert vlmask.SweepSpec('hi', base=json.dumps(d)).base.to_dict()['type'] == d['type']\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
