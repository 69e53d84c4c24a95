"""Pure functions: masks, mask specifications, metrics, and the BlockKeys value."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interventions import At, BlockKeys, ModelShape, from_dict
from vlmask import VlmaskError
from vlmask.engine.masks import allowed_edges
from vlmask.inputs.selection import parse_indices, parse_mask
from vlmask.model.attention import attention_mask, check_attention_implementation
from vlmask.results.metrics import logit_metrics, vector_distances


def test_mask_formats_per_implementation():
    allowed = allowed_edges(3)[None]
    sdpa = attention_mask(allowed, "sdpa", torch.bfloat16)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 3, 3)
    eager = attention_mask(allowed, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16
    assert eager[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min and eager[0, 0, 1, 0] == 0


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_masks_that_cannot_block_are_refused(name):
    with pytest.raises(VlmaskError, match=f"'{name}' cannot block a key.*sdpa"):
        check_attention_implementation(name)


def test_block_keys_table():
    edges = BlockKeys((1, 3)).blocked_edges(At(layer=0, seq_len=5))
    expected = [[q > k and k in (1, 3) for k in range(5)] for q in range(5)]
    assert edges.tolist() == expected
    assert BlockKeys((1,), layers=(2,)).blocked_edges(At(layer=0, seq_len=5)) is None  # cuts nothing at layer 0
    assert BlockKeys((1,), layers=(2,)).acts_at(2) and not BlockKeys((1,), layers=(2,)).acts_at(0)


def test_block_keys_validation_and_json():
    with pytest.raises(VlmaskError, match="non-negative integers"):
        BlockKeys((-1,))
    with pytest.raises(VlmaskError, match="key position 9 is out of range: the prompt has 5 tokens"):
        BlockKeys((9,)).check(5, ModelShape(num_layers=2))
    with pytest.raises(VlmaskError, match="layer 4 is out of range"):
        BlockKeys((1,), layers=(4,)).check(5, ModelShape(num_layers=2))
    value = BlockKeys((3, 1), layers=(0,))
    assert from_dict(json.loads(json.dumps(value.to_dict()))) == value
    with pytest.raises(VlmaskError, match="unknown intervention type"):
        from_dict({"type": "Nope"})


def test_parse_mask_specs():
    kinds = ["special", "text", "vision", "vision", "text"]
    assert parse_mask("text", kinds) == [1, 4]
    assert parse_mask("vision", kinds) == [2, 3]
    assert parse_mask("all", kinds) == [0, 1, 2, 3, 4]
    assert parse_mask("1:3, 4", kinds) == [1, 2, 4]
    with pytest.raises(VlmaskError, match="needs vision tokens"):
        parse_mask("vision", ["text"])
    with pytest.raises(VlmaskError, match="key position 7 is out of range: the prompt has 5 tokens"):
        parse_mask("7", kinds)
    with pytest.raises(VlmaskError, match="not understood"):
        parse_mask("banana", kinds)
    assert parse_indices("0:2", 3, "layer") == [0, 1]


def test_vector_distances_by_hand():
    clean, masked = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    l2, cos, rel = vector_distances(clean, masked)[0].tolist()
    assert l2 == pytest.approx(math.sqrt(5)) and cos == pytest.approx(1.0) and rel == pytest.approx(math.sqrt(5))


def test_logit_metrics_by_hand():
    clean = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    masked = torch.log(torch.tensor([0.25, 0.5, 0.25]))
    kl, drop, pct, changed = logit_metrics(clean, masked).tolist()
    assert kl == pytest.approx(0.5 * math.log(2) + 0.3 * math.log(0.6) + 0.2 * math.log(0.8), abs=1e-6)
    assert drop == pytest.approx(math.log(2), abs=1e-6)
    assert pct == pytest.approx(-50.0, abs=1e-4)
    assert changed == 1.0


@pytest.mark.parametrize("scale", [1e-3, 1.0, 37.5, 1e4])
def test_identical_vectors_are_exactly_zero_apart_and_cosine_is_never_negative(scale):
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(64, 9, 4096, generator=g) * scale
    assert torch.equal(vector_distances(clean, clean.clone()), torch.zeros(64, 9, 3))
    near = clean + torch.randn(clean.shape, generator=g) * scale * 1e-3
    cosine = vector_distances(clean, near)[..., 1]
    assert (cosine >= 0).all()
    want = 1 - torch.nn.functional.cosine_similarity(clean.double(), near.double(), dim=-1)
    torch.testing.assert_close(cosine.double(), want, atol=1e-9, rtol=1e-2)
