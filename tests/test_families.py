"""Family lookup: supported families by model type, and clear errors for the rest."""

from __future__ import annotations

import pytest
from transformers import GPT2Config

import vlmask
from tests.conftest import family_models
from vlmask.model.families import FAMILIES, family_of


def test_each_family_is_found_by_its_model_type():
    from transformers import AutoConfig

    for family in FAMILIES:
        for model_type in family.model_types:
            assert family_of(AutoConfig.for_model(model_type)) is family


def test_an_unsupported_architecture_names_the_supported_families_and_what_an_adapter_needs(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(vlmask.VlmaskError) as err:
        vlmask.load_model(tmp_path)
    message = str(err.value)
    assert "'gpt2' is not supported" in message
    for family in FAMILIES:
        assert family.name in message
    assert "adapter" in message and "self_attn" in message


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return family_models("llama", tmp_path_factory)[0]


def test_a_text_only_model_refuses_images_with_one_clear_line(llama, images):
    with pytest.raises(vlmask.VlmaskError, match="reads text only"):
        vlmask.sweep(llama, "what color is the circle ?", [images["square"]], progress=False)


def test_a_text_only_result_is_labeled_and_round_trips(llama, tmp_path):
    import xarray as xr

    ds = vlmask.sweep(llama, "what color is the circle ?", mask="prompt", num_tokens=2, progress=False)
    assert ds.attrs["model_family"] == "Llama"
    assert ds["token_text"].values.tolist() == ["what", "color", "is", "the", "circle", "?"]
    assert set(ds["seq_kind"].values) <= {"text", "special"}
    path = vlmask.save_results(ds, tmp_path / "llama.nc")
    with vlmask.open_results(path) as back:
        xr.testing.assert_identical(back.load(), ds)


def test_sliding_window_layers_are_refused_not_silently_widened(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.families import _text_tokenizer

    config = Qwen3Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    _text_tokenizer(["hello"]).save_pretrained(tmp_path)
    with pytest.raises(vlmask.VlmaskError, match="sliding_attention"):
        vlmask.load_model(tmp_path)
