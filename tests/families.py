"""Tiny random checkpoints of every supported family, saved like hub checkpoints (no downloads).

Each builder writes a ``save_pretrained`` directory that ``vlmask.load_model`` loads through
the same ``from_pretrained`` path a hub id takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLForConditionalGeneration,
)

from vlmask.builtin import CHAT_TEMPLATE, SPECIAL_TOKENS, make_processor, tiny_config

IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,  # peaky logits, so knockouts move the top token
    "pad_token_id": IDS["<|endoftext|>"],
    "eos_token_id": IDS["<|im_end|>"],
    "bos_token_id": None,
}
VISION_TOKENS = {
    "image_token_id": IDS["<|image_pad|>"],
    "video_token_id": IDS["<|video_pad|>"],
    "vision_start_token_id": IDS["<|vision_start|>"],
    "vision_end_token_id": IDS["<|vision_end|>"],
    "tie_word_embeddings": False,
}
PLACEHOLDERS = [IDS["<|image_pad|>"], IDS["<|video_pad|>"]]


def _qwen2_processor(cls, words):
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}
    kwargs = dict(
        size=size, patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    tokenizer = make_processor(words).tokenizer
    return cls(
        image_processor=Qwen2VLImageProcessor(**kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kwargs),
        chat_template=CHAT_TEMPLATE,
    )


def _mrope(vocab: int) -> dict:
    return {
        **TEXT,
        "vocab_size": vocab,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    }


def qwen2_vl(words):
    processor = _qwen2_processor(Qwen2VLProcessor, words)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=_mrope(len(processor.tokenizer)), vision_config=vision, **VISION_TOKENS)
    return Qwen2VLForConditionalGeneration(config), processor


def qwen2_5_vl(words):
    processor = _qwen2_processor(Qwen2_5_VLProcessor, words)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(text_config=_mrope(len(processor.tokenizer)), vision_config=vision, **VISION_TOKENS)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def qwen3_vl(words):
    processor = make_processor(words)
    config = tiny_config(len(processor.tokenizer), layers=3, heads=4, kv_heads=2)
    config.text_config.initializer_range = 0.2
    return Qwen3VLForConditionalGeneration(config), processor


def _text_tokenizer(words):
    tokenizer = make_processor(words).tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen3(words):
    tokenizer = _text_tokenizer(words)
    config = Qwen3Config(**{**TEXT, "vocab_size": len(tokenizer)}, head_dim=16, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config), tokenizer


def llama(words):
    tokenizer = _text_tokenizer(words)
    return LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": len(tokenizer)})), tokenizer


# LLaVA's chat layout ("USER: <image>\n... ASSISTANT:"), for a word-level tokenizer.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
LLAVA_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
LLAVA_VISION = {  # a CLIP vision tower: 56-pixel inputs cut into 14-pixel patches (4 x 4, plus CLS)
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 32,
}
PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # LLaVA-NeXT's any-resolution canvases, in 56-pixel tiles


def _llava_tokenizer(words):
    """A Llama-like word-level tokenizer with LLaVA's ``<image>`` placeholder (no Qwen tokens)."""
    vocab = {token: i for i, token in enumerate(LLAVA_SPECIAL)}
    for word in ["user", "assistant", ":", *words]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def _llava_config(cls, tokenizer, **kwargs):
    text = {**TEXT, "model_type": "llama", "vocab_size": len(tokenizer)}
    text.update(pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    image = tokenizer.convert_tokens_to_ids("<image>")
    return cls(vision_config=LLAVA_VISION, text_config=text, image_token_id=image, tie_word_embeddings=False, **kwargs)


def _clip_kwargs() -> dict:
    return {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "crop_size": {"height": 56, "width": 56}}


def llava(words):
    tokenizer = _llava_tokenizer(words)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, **_clip_kwargs())
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return LlavaForConditionalGeneration(_llava_config(LlavaConfig, tokenizer, image_seq_length=16)), processor


def llava_next(words):
    tokenizer = _llava_tokenizer(words)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 56}, image_grid_pinpoints=PINPOINTS, **_clip_kwargs()
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = _llava_config(LlavaNextConfig, tokenizer, image_grid_pinpoints=PINPOINTS, image_seq_length=16)
    return LlavaNextForConditionalGeneration(config), processor


BUILDERS = {
    "qwen3_vl": qwen3_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen2_vl": qwen2_vl,
    "qwen3": qwen3,
    "llama": llama,
    "llava": llava,
    "llava_next": llava_next,
}


def save_tiny(name: str, root: Path, words, seed: int = 0) -> Path:
    """Build family ``name``'s tiny random model with a fixed seed and save it with its processor under ``root``."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[name](words)
    if name in ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next"):
        # A random model may pick a vision placeholder as its next token, which no real model
        # does and which the model's own forward then refuses (more placeholders than features).
        with torch.no_grad():
            model.lm_head.weight[PLACEHOLDERS if name.startswith("qwen") else [model.config.image_token_id]] = 0.0
    model.eval().save_pretrained(root)
    processor.save_pretrained(root)
    return root
