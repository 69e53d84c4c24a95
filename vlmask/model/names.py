"""The names :func:`vlmask.load_model` accepts for its options, importable without torch.

The command line lists them in ``--help`` and checks them while parsing, before torch loads.
"""

from __future__ import annotations

import re

from vlmask.errors import VlmaskError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The ``dtype`` names: the torch dtypes of the same names."""

MASK_FORMATS = {"sdpa": "boolean (True = may attend)", "eager": "additive float (0 or the dtype's minimum)"}
"""The attention implementations vlmask can intervene on, and the mask format each expects."""

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The device-map strategies of accelerate / transformers; a JSON file maps module names to devices instead."""

DEVICES = ("cpu", "cuda", "cuda:N", "mps")
"""The devices a model can be loaded on (``N`` a GPU's index)."""


def check_device(name: str) -> str:
    """``name`` if it names a device of :data:`DEVICES`; else a :class:`VlmaskError` that lists them.

    Example:
        >>> check_device("cuda:1")
        'cuda:1'
        >>> check_device("tpu")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: device 'tpu' is not known: expected one of cpu, cuda, cuda:N, mps
    """
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise VlmaskError(f"device {name!r} is not known: expected one of {', '.join(DEVICES)}", option="device")
    return name
