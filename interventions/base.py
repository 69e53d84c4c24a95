"""The base of every intervention value: hook points with no-op defaults, ``&``, JSON and registration.

An intervention is a frozen dataclass that subclasses :class:`Intervention` and overrides only
the hook methods it uses; the engine never looks at its type, only at these methods. The
engine passes context by name, as one :class:`At` (where a hook runs) or one
:class:`ModelShape` (what a value checks itself against); a value reads what it needs and
ignores the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from interventions._common import fields_of
from interventions.errors import VlmaskError

_METHODS = {"attention": "blocked_edges", "heads": "edit_heads", "mlp": "edit_mlp", "residual": "edit_residual"}
"""Each hook point and the method that implements it, in the order they run inside a decoder layer."""

HOOKS = tuple(_METHODS)
"""The points of a decoder layer an intervention can edit, in the order they run."""
_TYPES: dict[str, type[Intervention]] = {}  # type name (the JSON ``type``) -> class, filled by subclassing


@dataclass(frozen=True)
class ModelShape:
    """The size of the model a value runs on, for :meth:`Intervention.check` and :meth:`~Intervention.first_changed`.

    Attributes:
        num_layers: decoder layers (``0..num_layers-1``).
        num_heads: attention heads per layer, or None where unknown.
        hidden_size: width of the residual stream, or None where unknown.
    """

    num_layers: int
    num_heads: int | None = None
    hidden_size: int | None = None


@dataclass(frozen=True)
class At:
    """Where the engine calls a hook: decoder layer ``layer`` of a pass over a ``seq_len``-token sequence.

    Attributes:
        layer: the decoder layer the hook runs in.
        seq_len: positions of the sequence (prompt and the tokens generated so far), the keys there are.
        start: the first position the pass computes: an edited tensor holds positions ``start``,
            ``start + 1``, ... (one row each); earlier positions come from the clean run's cache.
        head_means: ``(head, head_dim)``, the unmodified model's mean head outputs at ``layer`` over
            the prompt, where some value of the pass :attr:`~Intervention.needs_head_means`; else None.
    """

    layer: int
    seq_len: int
    start: int = 0
    head_means: torch.Tensor | None = None


class Intervention:
    """The call contract of an intervention, with a default for every member.

    Hook points, in execution order inside decoder layer ``at.layer`` (the engine calls one
    only where :meth:`hooks` names it, once per batch row):

    1. ``"attention"`` — :meth:`blocked_edges`: the ``(query, key)`` edges to cut;
    2. ``"heads"`` — :meth:`edit_heads`: the ``o_proj`` input, each head's output side by side;
    3. ``"mlp"`` — :meth:`edit_mlp`: the MLP's output, before it joins the residual stream;
    4. ``"residual"`` — :meth:`edit_residual`: the decoder layer's output (before Qwen3-VL adds
       its DeepStack features).

    A subclass is a frozen dataclass: its fields, ``__post_init__`` validation, and the one or
    two hook methods it implements. :meth:`hooks` is derived from which of them it overrides
    (at the layers where :meth:`acts_at`); :meth:`to_dict` / :meth:`from_dict` from its
    fields; subclassing registers its class name as its JSON ``type``.

    Example:
        >>> import dataclasses, torch
        >>> @dataclasses.dataclass(frozen=True)
        ... class Scale(Intervention):
        ...     layer: int
        ...     factor: float
        ...
        ...     def acts_at(self, layer: int) -> bool:
        ...         return layer == self.layer
        ...
        ...     def edit_residual(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        ...         return hidden * self.factor
        >>> value = Scale(layer=1, factor=0.5)
        >>> sorted(value.hooks(1)), sorted(value.hooks(0)), value.to_dict()
        (['residual'], [], {'type': 'Scale', 'layer': 1, 'factor': 0.5})
        >>> from_dict(value.to_dict()) == value
        True
    """

    _hooks: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = Intervention.__dict__
        cls._hooks = frozenset(h for h, m in _METHODS.items() if getattr(cls, m) is not base[m])
        known = _TYPES.get(cls.__name__)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise VlmaskError(
                f"intervention type {cls.__name__!r} is already {known.__module__}.{known.__qualname__}:"
                f" give {cls.__module__}.{cls.__qualname__} another name"
            )
        _TYPES[cls.__name__] = cls

    # -- where it acts -------------------------------------------------------------------------

    def acts_at(self, layer: int) -> bool:
        """Whether this value changes anything at decoder layer ``layer`` (default: at every layer)."""
        return True

    def hooks(self, layer: int) -> frozenset[str]:
        """The hook points (some of :data:`HOOKS`) edited at ``layer``: those the class implements, where it acts."""
        return type(self)._hooks if self.acts_at(layer) else frozenset()

    def attention_key(self, layer: int) -> Hashable | None:
        """None where no edge is cut at ``layer``; elsewhere a key equal at two layers only if the edges are.

        Layers with equal keys share one mask tensor. The default, the layer itself, shares
        nothing; a value whose edges do not depend on the layer returns one constant.
        """
        return layer if "attention" in self.hooks(layer) else None

    # -- the hook points, in execution order ---------------------------------------------------

    def blocked_edges(self, at: At) -> torch.Tensor | None:
        """Boolean ``(seq_len, seq_len)``: True where query q may not read key k; None cuts nothing."""
        return None

    def blocked_pairs(self, at: At) -> torch.Tensor | None:
        """``(n, 2)`` long: each ``(query, key)`` edge :meth:`blocked_edges` cuts, once (None: it cuts none).

        The same edges as the mask, listed: override it where a list is cheaper to build than the
        ``(seq_len, seq_len)`` mask (triage reads it for thousands of knockouts). Default: the mask's nonzeros.
        """
        edges = self.blocked_edges(at)
        return None if edges is None else edges.nonzero()

    def edit_heads(self, heads: torch.Tensor, at: At) -> torch.Tensor:
        """``heads (pos, head, head_dim)``, positions ``at.start..``, edited (a new tensor); default: unchanged."""
        return heads

    def edit_mlp(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        """``hidden (pos, hidden_size)``, the MLP output at positions ``at.start..``, edited; default: unchanged."""
        return hidden

    def edit_residual(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        """``hidden (pos, hidden_size)``, the layer's output at positions ``at.start..``, edited; default: unchanged."""
        return hidden

    # -- questions about the whole value -------------------------------------------------------

    def first_changed(self, seq_len: int, shape: ModelShape) -> int:
        """The first position whose computation this changes (``seq_len`` if none).

        It must be exact: positions before it are reused from the clean run's cache. The
        default, 0 wherever the value acts at some layer of the model, is always safe.
        """
        return 0 if any(self.hooks(layer) for layer in range(shape.num_layers)) else seq_len

    @property
    def needs_head_means(self) -> bool:
        """Whether :meth:`edit_heads` reads ``at.head_means`` (default False)."""
        return False

    def check(self, seq_len: int, shape: ModelShape) -> None:
        """Raise :class:`VlmaskError` if the value does not fit a ``seq_len``-token prompt on this model."""

    def with_layers(self, layers: tuple[int, ...]) -> Intervention:
        """This value acting at ``layers`` instead (what layer windows use); by default it cannot."""
        raise VlmaskError(
            f"{self!r} acts at its own layer: layers and windows apply only to values with a layers field"
            " (BlockKeys, BlockEdges and compositions holding them)"
        )

    def __and__(self, other: Intervention) -> Intervention:
        return compose(self, other)

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict: ``type`` (the class name) and each field, as :meth:`encode` writes it."""
        fields = {f.name: self.encode(f.name, getattr(self, f.name)) for f in _fields(self)}
        return {"type": type(self).__name__, **fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intervention:
        """Rebuild from :meth:`to_dict` output, refusing unknown and missing fields."""
        fields = _fields(cls)
        required = tuple(
            f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        optional = tuple(f.name for f in fields if f.name not in required)
        given = fields_of(data, cls.__name__, required, optional)
        return cls(**{name: cls.decode(name, value) for name, value in given.items()})

    def encode(self, name: str, value: Any) -> Any:
        """Field ``name``'s JSON form: tuples as lists, interventions as their dicts (override to change one)."""
        return _plain(value)

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        """Field ``name`` from its JSON form, as the constructor takes it (default: as it is)."""
        return value


def _fields(value: Any) -> tuple[dataclasses.Field, ...]:
    if not dataclasses.is_dataclass(value):
        name = value.__name__ if isinstance(value, type) else type(value).__name__
        raise VlmaskError(f"{name} is not a dataclass: decorate it with @dataclasses.dataclass(frozen=True)")
    return tuple(f for f in dataclasses.fields(value) if f.init)


def _plain(value: Any) -> Any:
    if isinstance(value, Intervention):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def from_dict(data: dict[str, Any]) -> Intervention:
    """Rebuild an intervention from its ``to_dict()`` output, by its ``type`` (any registered subclass).

    Example:
        >>> from_dict({"type": "BlockKeys", "positions": [3], "layers": None})
        BlockKeys(positions=(3,), layers=None)
        >>> from_dict({"type": "AblateHeads", "layer": 1, "heads": [0]})
        AblateHeads(layer=1, heads=(0,), mode='zero')
    """
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in _TYPES:
        _import_built_ins()
    if kind not in _TYPES:
        shown = kind if isinstance(data, dict) else data
        raise VlmaskError(f"unknown intervention type {shown!r}: expected one of {sorted(_TYPES)}")
    return _TYPES[kind].from_dict(data)


def _import_built_ins() -> None:
    """Import every built-in value's module (``interventions`` loads them on first use), so that their types
    are registered before one is asked for by name."""
    import interventions

    for name in interventions.__all__:
        getattr(interventions, name)


@dataclass(frozen=True)
class Compose(Intervention):
    """All of ``parts`` at once; ``Compose([])`` does nothing.

    Edges cut by any part are cut. Activation edits run in the order of ``parts`` at each
    hook point (a later part sees what an earlier one wrote). Nested compositions are
    flattened, so ``(a & b) & c == Compose([a, b, c])``.

    Example:
        >>> from interventions import AblateHeads, BlockKeys
        >>> both = BlockKeys((4,), layers=(0,)) & AblateHeads(1, (2,))
        >>> sorted(both.hooks(0)), sorted(both.hooks(1)), both.first_changed(9, ModelShape(num_layers=2))
        (['attention'], ['heads'], 0)
    """

    parts: tuple[Intervention, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.parts, (str, bytes, dict)) or not isinstance(self.parts, Iterable):
            raise VlmaskError(f"Compose takes a list of interventions, got {self.parts!r}")
        flat = []
        for part in self.parts:
            if not isinstance(part, Intervention):
                raise VlmaskError(
                    f"Compose parts must be interventions (subclasses of interventions.Intervention), got {part!r}"
                )
            flat.extend(part.parts if isinstance(part, Compose) else (part,))
        object.__setattr__(self, "parts", tuple(flat))

    def _at(self, layer: int, hook: str) -> list[Intervention]:
        return [part for part in self.parts if hook in part.hooks(layer)]

    def acts_at(self, layer: int) -> bool:
        """Whether any part edits anything at ``layer``."""
        return bool(self.hooks(layer))

    def hooks(self, layer: int) -> frozenset[str]:
        """The hook points any part edits at ``layer``."""
        return frozenset().union(*(part.hooks(layer) for part in self.parts))

    def attention_key(self, layer: int) -> Hashable | None:
        """Each part's key at ``layer`` (None if no part cuts an edge there)."""
        keys = tuple(part.attention_key(layer) if "attention" in part.hooks(layer) else None for part in self.parts)
        return None if all(k is None for k in keys) else keys

    def blocked_edges(self, at: At) -> torch.Tensor | None:
        """The union of the parts' blocked edges (None if no part cuts one)."""
        edges = None
        for part in self._at(at.layer, "attention"):
            cut = part.blocked_edges(at)
            if cut is not None:
                edges = cut if edges is None else edges | cut
        return edges

    def edit_heads(self, heads: torch.Tensor, at: At) -> torch.Tensor:
        """Each head-editing part's edit, in order."""
        for part in self._at(at.layer, "heads"):
            heads = part.edit_heads(heads, at)
        return heads

    def edit_mlp(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        """Each MLP-editing part's edit, in order."""
        for part in self._at(at.layer, "mlp"):
            hidden = part.edit_mlp(hidden, at)
        return hidden

    def edit_residual(self, hidden: torch.Tensor, at: At) -> torch.Tensor:
        """Each residual-editing part's edit, in order."""
        for part in self._at(at.layer, "residual"):
            hidden = part.edit_residual(hidden, at)
        return hidden

    def first_changed(self, seq_len: int, shape: ModelShape) -> int:
        """The earliest position any part changes."""
        return min((part.first_changed(seq_len, shape) for part in self.parts), default=seq_len)

    @property
    def needs_head_means(self) -> bool:
        """Whether any part mean-ablates heads."""
        return any(part.needs_head_means for part in self.parts)

    def check(self, seq_len: int, shape: ModelShape) -> None:
        """Check every part against the prompt and model."""
        for part in self.parts:
            part.check(seq_len, shape)

    def with_layers(self, layers: tuple[int, ...]) -> Intervention:
        """Each part that takes layers at ``layers``, the others as they are (refused if no part takes them)."""
        takes = [type(part).with_layers is not Intervention.with_layers for part in self.parts]
        if not any(takes):
            return super().with_layers(layers)
        return Compose(tuple(p.with_layers(layers) if t else p for p, t in zip(self.parts, takes, strict=True)))

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        """``parts`` from a list of intervention dicts."""
        if not isinstance(value, list):
            raise VlmaskError(f"Compose parts must be a list of intervention dicts, got {value!r}")
        return tuple(from_dict(part) for part in value)


def compose(*values: Intervention) -> Intervention:
    """``values`` applied together: a single value stays itself, empty compositions vanish.

    Example:
        >>> from interventions import BlockKeys
        >>> compose(Compose(), BlockKeys((1,)))
        BlockKeys(positions=(1,), layers=None)
    """
    parts = Compose(values).parts
    return parts[0] if len(parts) == 1 else Compose(parts)
