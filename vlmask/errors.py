"""The one exception type vlmask raises for user mistakes (defined with the interventions, below vlmask)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from interventions.errors import VlmaskError

__all__ = ["VlmaskError", "concerning"]


@contextlib.contextmanager
def concerning(option: str) -> Iterator[None]:
    """Inside, a :class:`VlmaskError` that names no option yet is about ``option``, for the edge to name.

    Example:
        >>> with concerning("mask"):
        ...     try:
        ...         raise VlmaskError("key position 9 is out of range")
        ...     except VlmaskError as err:
        ...         caught = err
        ...         raise
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: key position 9 is out of range
        >>> caught.option
        'mask'
    """
    try:
        yield
    except VlmaskError as err:
        if err.option is None:
            err.option = option
        raise
