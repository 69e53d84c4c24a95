"""The built-in default checkpoint, and the pieces to build small Qwen3-VL models.

Nothing here downloads: a word-level tokenizer is made with ``tokenizers``, and the
processor and model are real transformers classes, saved with ``save_pretrained`` and
loaded back with ``from_pretrained`` exactly like a hub checkpoint.

Example:
    >>> from vlmask.builtin import make_processor, tiny_config
    >>> processor = make_processor(["what", "color", "is", "the", "circle", "?"])
    >>> config = tiny_config(vocab_size=len(processor.tokenizer))
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

DEFAULT_MODEL_PATH = Path(__file__).parent / "shapes"
"""Where the default checkpoint lives (a directory made by ``save_pretrained``)."""

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)

# Qwen3-VL's chat layout, reduced to what a word-level tokenizer can carry: images and
# videos come first in the user turn, then the text; the assistant turn is opened when
# a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASE_WORDS = ("user", "assistant", "system")


def words_of(texts: Iterable[str]) -> list[str]:
    """The lower-cased words and punctuation marks of ``texts``, in first-seen order.

    Example:
        >>> words_of(["What's this?"])
        ['what', "'", 's', 'this', '?']
    """
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]+", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def make_processor(
    words: Iterable[str],
    *,
    chat_template: bool = True,
    min_pixels: int = 32 * 32,
    max_pixels: int = 32 * 32 * 256,
) -> Qwen3VLProcessor:
    """A real ``Qwen3VLProcessor`` around a word-level tokenizer over ``words``.

    Unknown words become ``<unk>``. Images are resized to multiples of 32 pixels
    (16-pixel patches, 2x2 merge), so a 128x128 image gives 16 vision tokens.

    Example:
        >>> processor = make_processor(["hello", "world"])
        >>> processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("hello there")["input_ids"])
        ['hello', '<unk>']
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in [*BASE_WORDS, *words]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:7]),
    )
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    video_processor = Qwen3VLVideoProcessor(
        size=size, patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def _text_config(vocab_size: int, hidden_size: int, layers: int, heads: int, kv_heads: int) -> dict:
    """The language decoder's settings: M-RoPE over a quarter/quarter/half split of each head's rotary pairs."""
    head_dim = hidden_size // heads
    quarter = head_dim // 2 // 4
    mrope = [head_dim // 2 - 2 * quarter, quarter, quarter]
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        },
    }


def _vision_config(vision_hidden: int, vision_depth: int, out_hidden: int) -> dict:
    """The vision encoder's settings: 16-pixel patches merged 2x2, DeepStack from its first (up to) 3 blocks."""
    return {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 2,
        "out_hidden_size": out_hidden,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": list(range(min(vision_depth, 3))),
    }


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    token_ids: dict[str, int] | None = None,
) -> Qwen3VLConfig:
    """A small ``Qwen3VLConfig`` (same architecture as Qwen3-VL, toy sizes).

    ``token_ids`` maps the processor's special tokens to ids; by default the ids of
    :data:`SPECIAL_TOKENS` as laid out by :func:`make_processor`.

    Example:
        >>> tiny_config(vocab_size=40, layers=3).text_config.num_hidden_layers
        3
    """
    ids = token_ids or {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    text = _text_config(vocab_size, hidden_size, layers, heads, kv_heads)
    text.update(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    return Qwen3VLConfig(
        text_config=text,
        vision_config=_vision_config(vision_hidden, vision_depth, hidden_size),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
