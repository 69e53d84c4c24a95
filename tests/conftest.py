"""Tiny random Qwen3-VL models built from configs with a fixed seed: no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from vlmask import VLModel
from vlmask.builtin import make_processor, tiny_config, words_of
from vlmask.model.families import family_of

PROMPTS = ["what is in this image ?", "what color is the circle ?", "describe the picture", "test"]


def _picture(path: Path, size: tuple[int, int], seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Qwen3-VL checkpoint (3 layers, GQA, DeepStack), loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-qwen3vl")
    processor = make_processor(words_of(PROMPTS))
    config = tiny_config(len(processor.tokenizer), layers=3, heads=4, kv_heads=2)
    config.text_config.initializer_range = 0.2  # peaky logits, so knockouts move the top token
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _load(path: Path, implementation: str) -> VLModel:
    hf = Qwen3VLForConditionalGeneration.from_pretrained(path, attn_implementation=implementation).eval()
    processor = AutoProcessor.from_pretrained(path)
    return VLModel(hf=hf, processor=processor, name=str(path), builtin=False, family=family_of(hf.config))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> VLModel:
    return _load(tiny_dir, "sdpa")


@pytest.fixture(scope="session")
def tiny_eager(tiny_dir: Path) -> VLModel:
    return _load(tiny_dir, "eager")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {
        "square": _picture(root / "square.png", (128, 128), 1),
        "wide": _picture(root / "wide.png", (192, 96), 2),
        "other": _picture(root / "other.png", (128, 128), 3),
    }


def family_models(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[VLModel, VLModel]:
    """Family ``name``'s tiny random checkpoint, loaded by ``vlmask.load_model`` with sdpa and with eager."""
    import vlmask
    from tests.families import save_tiny

    path = save_tiny(name, tmp_path_factory.mktemp(name), words_of(PROMPTS))
    return vlmask.load_model(path), vlmask.load_model(path, attn_implementation="eager")
