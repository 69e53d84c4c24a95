"""Where a model computes: accelerate device maps (strategies, JSON files, memory caps) and each module's device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmask.errors import VlmaskError
from vlmask.model.names import DEVICE_MAPS


def execution_device(module: Any, model: Any) -> torch.device:
    """The device ``module`` computes on: accelerate's hook's execution device when offloaded or dispatched by a
    device map, else its parameters' device (``model``'s first parameter's for a module without any)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        where = getattr(h, "execution_device", None)
        if where is not None:
            return torch.device(where)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return next(model.parameters()).device


def device_map_of(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """``value`` as ``from_pretrained`` takes it: a strategy name, or the module-to-device mapping of a JSON file.

    Devices are ``cpu``, ``disk``, ``cuda:N`` or ``N``; ``disk`` offloads a module's weights to a folder.

    Example:
        >>> device_map_of("auto"), device_map_of({"model": "cpu"})
        ('auto', {'model': 'cpu'})
    """
    if isinstance(value, dict):
        return value
    if value in DEVICE_MAPS:
        return value
    path = Path(value)
    if path.suffix != ".json" or not path.is_file():
        raise VlmaskError(
            f"device map {value!r} is neither a strategy ({', '.join(DEVICE_MAPS)}) nor an existing .json file "
            "mapping module names to devices"
        )
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VlmaskError(f"device map file '{path}' is not readable JSON: {err}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise VlmaskError(f"device map file '{path}' must hold one object of module name -> device")
    return mapping


def max_memory_of(text: str | dict[Any, str] | None) -> dict[Any, str] | None:
    """``0=20GiB,1=20GiB,cpu=60GiB`` (or a dict) as ``from_pretrained``'s ``max_memory``.

    Example:
        >>> max_memory_of("0=20GiB,cpu=60GiB")
        {0: '20GiB', 'cpu': '60GiB'}
    """
    if text is None or isinstance(text, dict):
        return text
    out: dict[Any, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, amount = part.partition("=")
        if not sep or not amount.strip() or not device.strip():
            raise VlmaskError(f"max memory {part!r} must be DEVICE=AMOUNT, like 0=20GiB or cpu=60GiB")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = amount.strip()
    return out
