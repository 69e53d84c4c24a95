"""Head ablation: replace chosen attention heads' outputs at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interventions._common import check_layers, ints, one_int
from interventions.base import At, Intervention, ModelShape
from interventions.errors import VlmaskError

MODES = ("zero", "mean")


@dataclass(frozen=True)
class AblateHeads(Intervention):
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
    for it (``first_changed`` is 0, the default).

    Example:
        >>> AblateHeads(layer=1, heads=(0, 2)).edit_heads(torch.ones(2, 3, 1), At(layer=1, seq_len=2))[:, :, 0].tolist()
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

    def acts_at(self, layer: int) -> bool:
        """Whether ``layer`` is the ablated layer."""
        return layer == self.layer

    def edit_heads(self, heads: torch.Tensor, at: At) -> torch.Tensor:
        """``heads (pos, head, head_dim)`` with the ablated heads replaced (by ``at.head_means`` for "mean")."""
        out = heads.clone()
        index = list(self.heads)
        if self.mode == "zero":
            out[:, index] = 0
        elif at.head_means is None:
            raise VlmaskError("AblateHeads(mode='mean') needs the unmodified model's mean head outputs; none given")
        else:
            out[:, index] = at.head_means[index].to(out.dtype).to(out.device)
        return out

    @property
    def needs_head_means(self) -> bool:
        """Whether the mode is "mean"."""
        return self.mode == "mean"

    def check(self, seq_len: int, shape: ModelShape) -> None:
        """Refuse a layer or a head the model does not have."""
        check_layers((self.layer,), shape.num_layers)
        for head in self.heads:
            if shape.num_heads is not None and head >= shape.num_heads:
                raise VlmaskError(
                    f"head {head} is out of range: layer {self.layer} has {shape.num_heads} heads"
                    f" (0-{shape.num_heads - 1})"
                )
