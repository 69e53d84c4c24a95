"""Rows a layer's modules need not compute in a pass, skipped with forward hooks (values unchanged).

Two facts of a decoder pass, each made into one context manager over a module list:

- past the last layer's keys and values only the read positions are read (:func:`read_rows_only`);
- in a packed pass, every row's first-layer input is the clean one at its position, so the first
  layer's projections need each position once, not once per row (:func:`shared_rows`).

The read rows' values are those of the full computation, up to the matrix kernels' rounding on
fewer rows (tested against the unnarrowed pass, the plain-PyTorch reference and eager attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlmask.model.load import VLModel


@contextlib.contextmanager
def hooked(modules: Sequence[torch.nn.Module], trim: Any, after: Any) -> Iterator[None]:
    """While in the block, ``trim`` is each module's forward pre-hook and ``after`` its forward hook.

    Example:
        >>> proj = torch.nn.Linear(2, 2)
        >>> with hooked([proj], lambda m, args: (torch.zeros_like(args[0]),), lambda m, args, y: y - m.bias):
        ...     y = proj(torch.ones(1, 2))
        >>> y.tolist(), len(proj._forward_hooks)
        ([[0.0, 0.0]], 0)
    """
    handles = [h for m in modules for h in (m.register_forward_pre_hook(trim), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_projections(vl: VLModel) -> list[torch.nn.Module]:
    """The first decoder layer's query, key and value projections (those that are linear layers).

    Example:
        >>> [type(m).__name__ for m in first_projections(vl)]
        ['Linear', 'Linear', 'Linear']
    """
    attention = vl.decoder.layers[0].self_attn
    named = (getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    return [m for m in named if isinstance(m, torch.nn.Linear)]


@contextlib.contextmanager
def shared_rows(modules: Sequence[torch.nn.Module], rows: slice, gather: torch.Tensor) -> Iterator[None]:
    """While in the block, each of ``modules`` computes only the ``rows`` of its input ``(batch, pos, features)``
    and gives position ``i`` the output of row ``gather[i]`` among them: right where every input row
    equals that row (a packed pass's first layer, where the pack repeats the clean positions).

    Example:
        >>> proj = torch.nn.Linear(2, 3)
        >>> x = torch.tensor([[[1.0, 2], [3, 4], [1, 2]]])  # rows 0 and 2 are the same
        >>> with shared_rows([proj], slice(0, 2), torch.tensor([0, 1, 0])):
        ...     y = proj(x)
        >>> torch.allclose(y, proj(x))
        True
    """

    def trim(module: Any, args: tuple) -> tuple | None:
        x = args[0]
        return (x[:, rows], *args[1:]) if x.shape[1] == len(gather) else None

    def after(module: Any, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
        return y[:, gather.to(y.device)] if y.shape[1] == rows.stop - rows.start != len(gather) else None

    with hooked(modules, trim, after):
        yield


def spread(y: torch.Tensor, length: int, index: torch.Tensor) -> torch.Tensor:
    """``y``'s rows (dimension 1) at positions ``index`` of ``length`` positions, zero elsewhere.

    Example:
        >>> spread(torch.ones(1, 1, 2), 3, torch.tensor([2])).tolist()
        [[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]]
    """
    index = index.to(y.device)
    return y.new_zeros(y.shape[0], length, *y.shape[2:]).index_copy(1, index, y)


@contextlib.contextmanager
def read_rows_only(modules: Sequence[torch.nn.Module], index: torch.Tensor) -> Iterator[None]:
    """While in the block, each of ``modules`` (the last decoder layer's) computes only the rows ``index`` of its
    input ``(batch, pos, features)``; its output is zero at the other positions.

    Past the last layer's keys and values nothing reads another position: the residual stream,
    the final norm and the logits are read at the read positions only. So a pass that recomputes
    many positions to read a few skips most of the last layer's work on the rest: its MLP, its
    query and output projections (these hooks) and its attention rows (the pass's
    :class:`~vlmask.engine.attention_calls.AttentionCalls`). The read rows' values are the same,
    up to the matrix kernels' rounding on fewer rows.

    Example:
        >>> mlp = torch.nn.Linear(2, 2)
        >>> with read_rows_only([mlp], torch.tensor([1])):
        ...     y = mlp(torch.ones(1, 3, 2))
        >>> bool((y[0, 1] == mlp(torch.ones(2))).all()), y[0, [0, 2]].abs().sum().item()
        (True, 0.0)
    """
    shapes: dict[int, list[torch.Size | None]] = {id(m): [] for m in modules}

    def trim(module: Any, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] <= len(index):
            shapes[id(module)].append(None)  # not the call it expects: computed as it is
            return None
        shapes[id(module)].append(x.shape)
        return (x[:, index.to(x.device)], *args[1:])

    def scatter(module: Any, args: tuple, y: Any) -> torch.Tensor | None:
        shape = shapes[id(module)].pop()
        if shape is None:
            return None
        if not isinstance(y, torch.Tensor):
            kind = type(y).__name__
            raise TypeError(f"{type(module).__name__} returned {kind}: expected one tensor (batch, pos, features)")
        return spread(y, shape[1], index)

    with hooked(modules, trim, scatter):
        yield
