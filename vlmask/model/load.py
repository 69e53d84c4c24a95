"""Load a checkpoint of a supported family (hub id or directory)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers import AutoConfig, AutoProcessor

from vlmask.builtin import DEFAULT_MODEL_PATH
from vlmask.errors import VlmaskError
from vlmask.model.attention import check_attention_implementation
from vlmask.model.families import Family, family_of
from vlmask.model.names import DTYPE_NAMES

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class VLModel:
    """A loaded model: the transformers module, its processor, and its family's adapter.

    ``backend_state`` is opaque: what an engine backend keeps per model (the nnsight
    backend's wrapper), filled on first use.
    """

    hf: Any
    processor: Any
    name: str
    builtin: bool
    family: Family
    backend_state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def decoder(self) -> Any:
        """The language decoder (``Qwen3VLTextModel``, ``LlamaModel``, ...)."""
        return self.family.decoder(self.hf)

    @property
    def text_config(self) -> Any:
        return self.decoder.config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise VlmaskError(f"dtype {name!r} is not supported: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _check_reachable(source: str) -> None:
    """Fail fast, with one clear line, when ``source`` is neither a local checkpoint, cached, nor on the hub."""
    if Path(source).exists():
        if not (Path(source) / "config.json").exists():
            raise VlmaskError(f"model directory '{source}' has no config.json: pass a save_pretrained directory")
        return
    try:
        if os.environ.get("HF_HUB_OFFLINE") or huggingface_hub.try_to_load_from_cache(source, "config.json"):
            return
        huggingface_hub.HfApi().model_info(source, timeout=20)
    except Exception as err:  # the hub client raises many types: network, HTTP, validation
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VlmaskError(
            f"model {source!r} is not a local directory, not in the hub cache, and the hub did not answer: {reason}"
        ) from None


def _check_full_attention(source: str, config: Any) -> None:
    """Refuse decoders with sliding-window layers: vlmask's masks are full causal, which would silently widen them."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise VlmaskError(
            f"model {source!r} has {sorted(kinds - {'full_attention'})} decoder layers: vlmask builds full causal "
            "masks and would widen their windows; load a checkpoint whose layers all use full attention"
        )


def load_model(
    model: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
) -> VLModel:
    """Load a checkpoint with ``from_pretrained``.

    ``model`` is a hub id (``Qwen/Qwen3-VL-2B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct``,
    ``Qwen/Qwen3-0.6B``, ...: see :data:`vlmask.model.families.FAMILIES`) or a local directory;
    None loads the checkpoint shipped with vlmask. ``attn_implementation`` must be ``sdpa``
    or ``eager``: FlashAttention treats the mask as padding only and cannot block a key.

    Example:
        >>> vl = load_model()  # the built-in toy checkpoint
        >>> vl.attn_implementation
        'sdpa'
    """
    check_attention_implementation(attn_implementation)
    builtin = model is None
    source = str(DEFAULT_MODEL_PATH if builtin else model)
    torch_dtype = _dtype(dtype, device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VlmaskError(f"device {device!r} was asked for, but no CUDA device is available: use device 'cpu'")
    if not builtin:
        _check_reachable(source)
    try:
        family = family_of(AutoConfig.from_pretrained(source))
        processor = AutoProcessor.from_pretrained(source)
        hf = family.auto_class().from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "local directory" if Path(source).exists() else "local directory or reachable hub id"
        raise VlmaskError(f"model {source!r} could not be loaded as a {kind}: {reason}") from None
    hf = hf.to(device).eval()
    check_attention_implementation(family.decoder(hf).config._attn_implementation)
    _check_full_attention(source, family.decoder(hf).config)
    log.info("loaded %s (%s, %s, %s, %s attention)", source, family.name, torch_dtype, device, attn_implementation)
    return VLModel(hf=hf, processor=processor, name=source, builtin=builtin, family=family)
