"""Load a checkpoint of a supported family (hub id, directory, or GGUF file)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from vlmask.builtin import DEFAULT_MODEL_PATH
from vlmask.errors import VlmaskError
from vlmask.model.attention import check_attention_implementation
from vlmask.model.devices import device_map_of, execution_device, max_memory_of
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
    _placed: tuple[Any, tuple[torch.device, list[torch.device]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

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
        """Where inputs go: the device the input embeddings run on (with a device map, not necessarily the others')."""
        return self._placement()[0]

    @property
    def layer_devices(self) -> list[torch.device]:
        """The device each decoder layer runs on (all :attr:`device` without a device map)."""
        return list(self._placement()[1])

    def _placement(self) -> tuple[torch.device, list[torch.device]]:
        """:attr:`device` and :attr:`layer_devices`, found again only when the input embeddings' weight moves or the
        model's device map changes (finding them walks every layer's modules: a tenth of a millisecond, each pass)."""
        weight = getattr(self.decoder.embed_tokens, "weight", None)
        moved = (next(self.hf.parameters()) if weight is None else weight).device
        key = moved, id(getattr(self.hf, "hf_device_map", None))
        if self._placed is None or self._placed[0] != key:
            layers = [execution_device(layer, self.hf) for layer in self.decoder.layers]
            self._placed = key, (execution_device(self.decoder.embed_tokens, self.hf), layers)
        return self._placed[1]


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


def _placement(device: str, device_map: Any, max_memory: Any, offload_folder: Any) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments: none (the model moves to ``device``), or a device map's."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise VlmaskError("max_memory and offload_folder place a model by a device map: give device_map too")
        return {}
    if device != "cpu":
        raise VlmaskError(f"give either device ({device!r}) or device_map ({device_map!r}), not both")
    folder = offload_folder or tempfile.mkdtemp(prefix="vlmask-offload-")
    return {"device_map": device_map_of(device_map), "max_memory": max_memory_of(max_memory), "offload_folder": folder}


def _check_gguf(source: str) -> None:
    """Refuse a missing GGUF file, or a GGUF file without the packages transformers reads it with."""
    if not Path(source).is_file():
        raise VlmaskError(f"GGUF file '{source}' does not exist: pass the path of a .gguf checkpoint file")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise VlmaskError(
            f"GGUF file '{source}' needs the {' and '.join(missing)} package(s), which are not installed: "
            'install vlmask\'s gguf extra (pip install -e ".[gguf]") or pip install gguf accelerate'
        )


def _gguf_config(folder: str, name: str) -> Any:
    """The config of a GGUF file; for an architecture transformers cannot read, a stand-in naming it (which
    :func:`family_of` refuses with the usual message)."""
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as err:
        unread = re.match(r"GGUF model with architecture (\S+) is not supported", str(err))
        if unread is None:
            raise
        return SimpleNamespace(model_type=unread.group(1))


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """While loading one GGUF file, parse it once and build each tensor-name table once.

    transformers parses the file anew for the config, the tokenizer and the weights, and builds
    gguf's tensor-name table once per module (397 times for a Llama); both are pure-Python loops
    (about 20 s per parse on two cores for SmolLM2-135M). transformers imports both names from
    ``gguf`` at call time, so memoising them on the module for the duration is enough; the parsed
    reader is read-only.
    """
    import gguf  # only here: the extra is optional

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def read(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = os.path.abspath(path)
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _from_pretrained(
    source: str, dtype: torch.dtype, attn_implementation: str, placement: dict[str, Any]
) -> tuple[Family, Any, Any]:
    """The family, processor and model of ``source``: a directory or hub id, or a GGUF file (dequantized to
    ``dtype``, its tokenizer read from the same file); ``placement``: a device map's arguments, or none."""
    if not source.endswith(".gguf"):
        family = family_of(AutoConfig.from_pretrained(source))
        processor = AutoProcessor.from_pretrained(source)
        hf = family.auto_class().from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **placement
        )
        return family, processor, hf
    folder, name = os.path.split(os.path.abspath(source))
    with _gguf_read_once():
        config = _gguf_config(folder, name)
        family = family_of(config)
        processor = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf = family.auto_class().from_pretrained(
            folder, gguf_file=name, config=config, dtype=dtype, attn_implementation=attn_implementation, **placement
        )
    return family, processor, hf


def load_model(
    model: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, str] | None = None,
    offload_folder: str | Path | None = None,
) -> VLModel:
    """Load a checkpoint with ``from_pretrained``.

    ``model`` is a hub id (``Qwen/Qwen3-VL-2B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct``,
    ``Qwen/Qwen3-0.6B``, ...: see :data:`vlmask.model.families.FAMILIES`), a local directory, or a
    ``.gguf`` file (tokenizer and weights from the one file, dequantized; its architecture picks the
    family; needs the ``gguf`` extra); None loads the checkpoint shipped with vlmask.
    ``attn_implementation`` must be ``sdpa`` or ``eager``: FlashAttention treats the mask as padding
    only and cannot block a key.

    A model larger than one device: ``device_map`` (``auto``, ``balanced``, ``sequential``, or a
    module-to-device mapping or JSON file; ``disk`` offloads weights to ``offload_folder``, a
    temporary folder by default) and ``max_memory`` (``0=20GiB,cpu=60GiB``) go to accelerate
    through ``from_pretrained``, instead of ``device``; each layer then computes on its own device.

    Example:
        >>> vl = load_model()  # the built-in toy checkpoint
        >>> vl.attn_implementation
        'sdpa'
    """
    check_attention_implementation(attn_implementation)
    builtin = model is None
    source = str(DEFAULT_MODEL_PATH if builtin else model)
    placement = _placement(device, device_map, max_memory, offload_folder)
    torch_dtype = _dtype(dtype, "cuda" if device_map is not None and torch.cuda.is_available() else device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VlmaskError(f"device {device!r} was asked for, but no CUDA device is available: use device 'cpu'")
    if source.endswith(".gguf"):
        _check_gguf(source)
    elif not builtin:
        _check_reachable(source)
    try:
        family, processor, hf = _from_pretrained(source, torch_dtype, attn_implementation, placement)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "local directory" if Path(source).exists() else "local directory or reachable hub id"
        kind = "GGUF file" if source.endswith(".gguf") else kind
        raise VlmaskError(f"model {source!r} could not be loaded as a {kind}: {reason}") from None
    hf = (hf if placement else hf.to(device)).eval()
    check_attention_implementation(family.decoder(hf).config._attn_implementation)
    _check_full_attention(source, family.decoder(hf).config)
    where = f"device map {getattr(hf, 'hf_device_map', device_map)}" if placement else device
    log.info("loaded %s (%s, %s, %s, %s attention)", source, family.name, torch_dtype, where, attn_implementation)
    return VLModel(hf=hf, processor=processor, name=source, builtin=builtin, family=family)
