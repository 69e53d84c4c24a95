"""Look at a prompt before a sweep: the positions of its tokens, and its clean residual stream.

These give intervention values their numbers: ``BlockEdges`` needs the image and question
positions, ``PatchResidual`` a source (another prompt's residual stream, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from interventions._common import check_layers, check_positions, ints
from vlmask.engine.passes import NOTHING, PromptPasses
from vlmask.errors import VlmaskError
from vlmask.inputs.prompt import build_prompt
from vlmask.inputs.selection import parse_mask
from vlmask.model.load import VLModel


def positions(
    vl: VLModel,
    prompt: str,
    images: Sequence[str | Path] = (),
    which: str = "all",
    *,
    word: str | None = None,
    videos: Sequence[str | Path] = (),
    video_fps: float = 2.0,
    chat_template: str = "auto",
) -> list[int]:
    """The positions of the model input that ``which`` names, exactly as :func:`vlmask.sweep` will see them.

    ``which`` is ``text``, ``vision``, ``all`` (default) or positions and ranges like
    ``"18:24,30"``; ``word`` keeps only the tokens whose text is ``word`` (spaces ignored).

    Example:
        >>> import vlmask
        >>> vl = vlmask.load_model()
        >>> image = vlmask.positions(vl, "what color is the circle ?", ["examples/shapes.png"], "vision")
        >>> circle = vlmask.positions(vl, "what color is the circle ?", word="circle")
    """
    built = build_prompt(vl.processor, prompt, list(images), chat_template, list(videos), video_fps)
    chosen = parse_mask(which, built.tokens.kind, built.prompt_positions)
    if word is None:
        return chosen
    found = [p for p in chosen if built.tokens.text[p].strip() == word.strip()]
    if not found:
        raise VlmaskError(f"no token of the prompt is {word!r}: its tokens are {list(built.tokens.text)}")
    return found


def capture_residual(
    vl: VLModel,
    prompt: str,
    images: Sequence[str | Path] = (),
    *,
    layer: int,
    positions: Sequence[int],
    videos: Sequence[str | Path] = (),
    video_fps: float = 2.0,
    chat_template: str = "auto",
    vision_attention: str = "native",
) -> torch.Tensor:
    """The unmodified model's decoder-layer output at ``positions`` of ``prompt``: float32 ``(len(positions), hidden)``.

    It is what decoder layer ``layer`` returns there (before DeepStack's additions), in the
    order of ``positions`` — the ``source`` that :class:`~interventions.PatchResidual` expects.

    Example:
        >>> import vlmask
        >>> from interventions import PatchResidual
        >>> vl = vlmask.load_model()
        >>> source = vlmask.capture_residual(vl, "what color is the square ?", layer=1, positions=[5])
        >>> patch = PatchResidual(layer=1, positions=(5,), source=source)
    """
    built = build_prompt(vl.processor, prompt, list(images), chat_template, list(videos), video_fps)
    wanted = list(ints(positions, "positions", keep_order=True))
    check_positions(wanted, len(built.tokens), "position")
    check_layers((layer,), vl.num_layers)
    ids = built.inputs["input_ids"]
    vl.family.reset(vl.hf)
    done = PromptPasses.of(vl, built, ids.shape[1], vision_attention).model_pass(ids, [NOTHING], wanted)
    return done.readout.residual[0, layer]
