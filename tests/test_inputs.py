"""Prompt formatting, vision token detection and input errors."""

from __future__ import annotations

import pytest

from vlmask import VlmaskError
from vlmask.inputs.media import read_image
from vlmask.inputs.prompt import build_prompt
from vlmask.inputs.selection import parse_mask


def test_128px_image_gives_16_contiguous_vision_tokens(tiny, images):
    built = build_prompt(tiny.processor, "what is in this image ?", [images["square"]])
    vision = [i for i, kind in enumerate(built.tokens.kind) if kind == "vision"]
    assert built.tokens.vision_ranges == [(3, 19)]
    assert vision == list(range(3, 19))
    assert all(built.tokens.ids[i] == tiny.hf.config.image_token_id for i in vision)
    assert built.tokens.text[2] == "<|vision_start|>" and built.tokens.text[19] == "<|vision_end|>"
    assert {built.tokens.image_index[i] for i in vision} == {0}


def test_non_square_and_two_images(tiny, images):
    built = build_prompt(tiny.processor, "describe the picture", [images["wide"], images["square"]])
    # 192x96 -> 6x3 merged cells (18 tokens); 128x128 -> 16
    ranges = built.tokens.vision_ranges
    assert [end - start for start, end in ranges] == [18, 16]
    assert [built.tokens.image_index[start] for start, _ in ranges] == [0, 1]


def test_text_only_prompt_has_no_vision_tokens(tiny):
    built = build_prompt(tiny.processor, "what is in this image ?")
    assert "vision" not in built.tokens.kind
    assert built.tokens.vision_ranges == []
    assert "pixel_values" not in built.inputs


@pytest.mark.parametrize(("mode", "templated"), [("auto", True), ("on", True), ("off", False)])
def test_chat_template_modes(tiny, mode, templated):
    built = build_prompt(tiny.processor, "test", chat_template=mode)
    assert built.chat_template is templated
    assert ("<|im_start|>" in built.tokens.text) is templated
    assert built.tokens.text[-1] == ("assistant" if templated else "test")


def test_chat_template_on_without_a_template(tiny):
    processor = type(tiny.processor)(
        image_processor=tiny.processor.image_processor,
        tokenizer=tiny.processor.tokenizer,
        video_processor=tiny.processor.video_processor,
        chat_template=None,
    )
    assert build_prompt(processor, "test").chat_template is False
    with pytest.raises(VlmaskError, match="has no chat template"):
        build_prompt(processor, "test", chat_template="on")


def test_token_kinds(tiny, images):
    built = build_prompt(tiny.processor, "what is in this image ?", [images["square"]])
    table = dict(zip(built.tokens.text, built.tokens.kind, strict=True))
    assert table["<|im_start|>"] == "special" and table["what"] == "text" and table["<|image_pad|>"] == "vision"


def test_image_errors(tmp_path):
    with pytest.raises(VlmaskError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(VlmaskError, match="is not an image"):
        read_image(fake)


def test_empty_prompt(tiny):
    with pytest.raises(VlmaskError, match="prompt is empty"):
        build_prompt(tiny.processor, "   ")


def test_image_hash_is_recorded(tiny, images):
    import hashlib

    built = build_prompt(tiny.processor, "test", [images["square"]])
    assert built.images[0].sha256 == hashlib.sha256(images["square"].read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("pictures", [0, 2])
def test_prompt_positions_are_the_prompts_words_only(tiny, images, mode, pictures):
    chosen = [images["square"], images["wide"]][:pictures]
    built = build_prompt(tiny.processor, "what is in this image ?", chosen, chat_template=mode)
    words = [built.tokens.text[p] for p in built.prompt_positions]
    assert words == ["what", "is", "in", "this", "image", "?"]
    # the template's own text tokens are not the prompt's, even when they spell the same word
    user = build_prompt(tiny.processor, "user", chosen, chat_template=mode)
    assert [user.tokens.text[p] for p in user.prompt_positions] == ["user"]
    after = user.tokens.text[user.prompt_positions[0] + 1 :]
    assert after == (("<|im_end|>", "<|im_start|>", "assistant") if mode == "auto" else ())
    assert parse_mask("prompt", built.tokens.kind, built.prompt_positions) == list(built.prompt_positions)
    assert parse_mask("text", built.tokens.kind) != list(built.prompt_positions) or mode == "off"
