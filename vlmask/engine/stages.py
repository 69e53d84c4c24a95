"""Where a sweep's time goes: each stage's seconds, logged at DEBUG on the ``vlmask.stages`` logger.

The stages are :data:`STAGES`: the vision encoder (once per sweep), the clean pass (and the
mean head outputs where mean ablation needs them), the packed knockout passes (with their
metrics), the masked generation of continuations that leave the clean one, and the assembly
of the Dataset. Each timed block logs one record, whose ``stage`` and ``seconds`` attributes
a handler can sum (the benchmark does); with DEBUG off for that logger, nothing is timed.
On a GPU the device is synchronized at each block's ends, so the time is the stage's own.

Example:
    >>> import logging
    >>> seen = []
    >>> handler = logging.Handler()
    >>> handler.emit = lambda record: seen.append(record.stage)
    >>> log.addHandler(handler); log.setLevel(logging.DEBUG)
    >>> with stage("assembly"):
    ...     pass
    >>> log.removeHandler(handler); log.setLevel(logging.NOTSET)
    >>> seen
    ['assembly']
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch

log = logging.getLogger("vlmask.stages")

STAGES = ("vision encoder", "clean pass", "packed passes", "generation", "assembly")
"""A sweep's stages, in the order they first run."""


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` (one of :data:`STAGES`), where the ``vlmask.stages`` logger logs DEBUG."""
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not one of {list(STAGES)}")
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        seconds = time.perf_counter() - start
        log.debug("%s: %.4f s", name, seconds, extra={"stage": name, "seconds": seconds})
