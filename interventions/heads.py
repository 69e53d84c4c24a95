"""Head ablation: replace chosen attention heads' outputs at one layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from interventions._common import check_layers, fields_of, ints, one_int
from interventions.compose import compose
from interventions.errors import VlmaskError

MODES = ("zero", "mean")


@dataclass(frozen=True)
class AblateHeads:
    """Replace the outputs of ``heads`` at decoder layer ``layer``, at every position.

    A head's output is its slice of the ``o_proj`` input (``head_dim`` values, head ``h``
    at ``h * head_dim``), before ``o_proj`` mixes the heads. ``mode``:

    - ``"zero"``: the slice is set to 0;
    - ``"mean"``: the slice is set to that head's mean output over the prompt's positions
      (every position of the model input, none of the generated ones) in a run of the
      **unmodified** model on the same prompt: no base, no knockout. The mean is taken
      in float32 and cast to the model's dtype. The same vector goes to every position
      and step.

    Everything from position 0 on can change, so the engine recomputes every position
    for it (``first_changed`` is 0).

    Example:
        >>> AblateHeads(layer=1, heads=(0, 2)).edit_heads(1, torch.ones(2, 3, 1), 0, None)[:, :, 0].tolist()
        [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    """

    layer: int
    heads: tuple[int, ...]
    mode: str = "zero"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", one_int(self.layer, "AblateHeads layer"))
        object.__setattr__(self, "heads", ints(self.heads, "AblateHeads heads"))
        if not self.heads:
            raise VlmaskError("AblateHeads heads is empty: name at least one head, like heads=(3,)")
        if self.mode not in MODES:
            raise VlmaskError(f"AblateHeads mode {self.mode!r} is not known: expected one of {MODES}")

    def __and__(self, other: Any) -> Any:
        return compose(self, other)

    def hooks(self, layer: int) -> frozenset[str]:
        """``{"heads"}`` at its layer."""
        return frozenset({"heads"}) if layer == self.layer else frozenset()

    def acts_on(self, layer: int) -> bool:
        """Whether ``layer`` is the ablated layer."""
        return layer == self.layer

    def attention_key(self, layer: int) -> None:
        """Cuts no attention edge."""
        return None

    def edit_heads(self, layer: int, heads: torch.Tensor, start: int, means: torch.Tensor | None) -> torch.Tensor:
        """``heads (pos, head, head_dim)`` with the ablated heads replaced; ``means (head, head_dim)`` for "mean"."""
        out = heads.clone()
        index = list(self.heads)
        if self.mode == "zero":
            out[:, index] = 0
        elif means is None:
            raise VlmaskError("AblateHeads(mode='mean') needs the unmodified model's mean head outputs; none given")
        else:
            out[:, index] = means[index].to(out.dtype).to(out.device)
        return out

    def first_changed(self, seq_len: int, num_layers: int) -> int:
        """0: every position's head output is replaced."""
        return 0 if self.layer < num_layers else seq_len

    @property
    def needs_head_means(self) -> bool:
        return self.mode == "mean"

    def check(
        self, seq_len: int, num_layers: int, num_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        """Raise :class:`VlmaskError` if the layer or a head is out of range for this model."""
        check_layers((self.layer,), num_layers)
        for head in self.heads:
            if num_heads is not None and head >= num_heads:
                raise VlmaskError(
                    f"head {head} is out of range: layer {self.layer} has {num_heads} heads (0-{num_heads - 1})"
                )

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready dict; :func:`interventions.from_dict` rebuilds the value."""
        return {"type": "AblateHeads", "layer": self.layer, "heads": list(self.heads), "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblateHeads:
        """Rebuild from :meth:`to_dict` output."""
        fields = fields_of(data, "AblateHeads", ("layer", "heads"), ("mode",))
        return cls(fields["layer"], fields["heads"], fields.get("mode", "zero"))
