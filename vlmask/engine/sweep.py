"""The knockout sweep: one clean pass, then every knockout in packed batches, metrics streamed out.

The passes themselves, and what makes them fast without changing any number, are
:class:`vlmask.engine.passes.PromptPasses`; this module turns the options into knockouts and
the measurements into a labeled Dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from interventions import Intervention, ModelShape, compose
from vlmask.engine.backend import Backend
from vlmask.engine.budget import announce, check_length
from vlmask.engine.knockouts import Knockouts, knockouts_of
from vlmask.engine.labels import sweep_record
from vlmask.engine.passes import NOTHING, PromptPasses
from vlmask.engine.stages import stage
from vlmask.engine.state import PassPlan
from vlmask.engine.triage import check_estimable
from vlmask.engine.triage_run import Triaged, triage_measure
from vlmask.errors import VlmaskError, concerning
from vlmask.inputs.prompt import Prompt, build_prompt, tokenizer_of
from vlmask.inputs.selection import parse_indices, parse_mask
from vlmask.inputs.units import group_units
from vlmask.model.families import FAMILIES
from vlmask.model.load import VLModel
from vlmask.results.dataset import Measured, to_dataset
from vlmask.results.triage import with_triage
from vlmask.spec import SweepSpec

log = logging.getLogger(__name__)


def _knockouts(vl: VLModel, built: Prompt, spec: SweepSpec) -> Knockouts:
    """The sweep's :class:`~vlmask.engine.knockouts.Knockouts`: masked token units, or the values ``spec.over``."""
    layers = spec.layers
    with concerning("layers"):
        if isinstance(layers, str):
            among = f"the model has {vl.num_layers} decoder layers"
            layers = parse_indices(layers, vl.num_layers, "layer", among=among)
        if spec.over is not None:
            return knockouts_of(vl.num_layers, over=[compose(v) for v in spec.over], layers=layers)
    mask = "text" if spec.mask is None else spec.mask
    with concerning("mask"):
        text = mask if isinstance(mask, str) else ",".join(map(str, mask))  # a list is checked like its text
        positions = parse_mask(text, built.tokens.kind, built.prompt_positions)
    with concerning("mask_unit"):
        units = group_units(positions, built.tokens, spec.mask_unit)
    with concerning("layers"):
        return knockouts_of(vl.num_layers, units=units, layers=layers)


def _interventions(vl: VLModel, built: Prompt, spec: SweepSpec) -> tuple[Intervention, Knockouts]:
    """The sweep's base and knockouts, each checked against the prompt and the model."""
    knockouts = _knockouts(vl, built, spec)
    base: Intervention = NOTHING if spec.base is None else compose(spec.base)
    shape = ModelShape(vl.num_layers, vl.num_heads, vl.text_config.hidden_size)
    with concerning("base"):
        base.check(len(built.tokens), shape)
    with concerning("mask" if spec.over is None else "over"):
        for iv in knockouts.values:
            iv.check(len(built.tokens), shape)
    return base, knockouts


def _check_removal(vl: VLModel, built: Prompt, spec: SweepSpec, base: Intervention) -> None:
    """``vision_removal="full"`` needs a family with DeepStack, and a base that blocks no vision key."""
    if spec.vision_removal != "full":
        return
    with concerning("vision_removal"):
        if not vl.family.deepstack:
            having = ", ".join(f.name for f in FAMILIES if f.deepstack)
            raise VlmaskError(
                f"vision removal 'full' also withholds DeepStack features, which only {having} adds, and model "
                f"{vl.name!r} is {vl.family.name}: use vision removal 'keys'"
            )
        vision = [
            p
            for p in PassPlan.cut_keys([base], len(built.tokens), vl.num_layers)[0]
            if built.tokens.kind[p] == "vision"
        ]
        if vision:
            raise VlmaskError(
                f"vision removal 'full' applies to the knockouts, and the base blocks vision keys {vision}: "
                "block them in the knockouts, or use vision removal 'keys'"
            )


def _mask_text(spec: SweepSpec, knockouts: Knockouts) -> str:
    """What ``mask`` recorded: its word or its positions (empty for a sweep over interventions)."""
    if knockouts.dim != "token":
        return ""
    mask = "text" if spec.mask is None else spec.mask
    return mask if isinstance(mask, str) else ",".join(map(str, sorted(set(mask))))


def answer_ids(vl: VLModel, built: Prompt, answer: str) -> list[int]:
    """The token ids of ``answer`` as the tokenizer continues the model input with it (the assistant turn,
    with a chat template), with no special tokens added.

    The answer is the literal text after the model input: with a chat template the turn starts
    on a fresh line, so ``"red"`` is right; without one, a BPE tokenizer (Qwen's) needs the
    space a word after the prompt would have, ``" red"``. Where the answer's first characters
    would merge with the input's last token, the answer is tokenized alone.

    Example:
        >>> from vlmask.inputs.prompt import build_prompt
        >>> built = build_prompt(vl.processor, "what color is the circle ?", ["examples/shapes.png"])
        >>> vl.processor.tokenizer.convert_ids_to_tokens(answer_ids(vl, built, "red circle"))
        ['red', 'circle']
    """
    tokenizer = tokenizer_of(vl.processor)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    before, after = ids(built.text), ids(built.text + answer)
    found = after[len(before) :] if after[: len(before)] == before else ids(answer)
    if not found:
        raise VlmaskError(f"the answer {answer!r} has no tokens for this model's tokenizer: give some text")
    return found


def _spec(prompt: SweepSpec | str, images: Sequence[str | Path], options: dict[str, Any]) -> SweepSpec:
    """The sweep's spec: the one given, or one built from the prompt, its images and its options."""
    if not isinstance(prompt, SweepSpec):
        return SweepSpec(prompt, images, **options)
    if images or options:
        raise VlmaskError("pass a SweepSpec alone, or a prompt with its images and options, not both")
    return prompt


def _prepared(vl: VLModel, spec: SweepSpec) -> tuple[Prompt, Intervention, Knockouts, list[int]]:
    """The prompt of ``spec``, its base, its knockouts and its answer's token ids, after every check that needs
    no forward pass (the prompt's length, DeepStack removal, what triage can estimate); large exact work is
    announced before it starts."""
    built = build_prompt(
        vl.processor, spec.prompt, list(spec.images), spec.chat_template, list(spec.videos), spec.video_fps
    )
    check_length(vl, built.inputs["input_ids"].shape[1], spec.num_tokens)
    base, knockouts = _interventions(vl, built, spec)
    _check_removal(vl, built, spec, base)
    with concerning("answer"):
        answer = [] if spec.answer is None else answer_ids(vl, built, spec.answer)
    if spec.triage is None:
        announce(vl, built.inputs, knockouts.values, spec.num_tokens)
    else:  # the exact part is the top K and the audit: small
        with concerning("triage"):
            check_estimable(knockouts.values, vl.num_layers)
    return built, base, knockouts, answer


def _measure(
    passes: PromptPasses,
    prompt_ids: Any,
    spec: SweepSpec,
    base: Intervention,
    knockouts: Knockouts,
    progress: bool,
    answer: list[int],
) -> tuple[Measured, Triaged | None]:
    """Every knockout run exactly; or, with ``spec.triage``, estimated and run exactly where triage chose."""
    if spec.triage is not None:
        triaged = triage_measure(passes, prompt_ids, spec, base, knockouts.values, progress, answer)
        return triaged.measured, triaged
    measured = passes.measure_spec(prompt_ids, spec, base, knockouts.values, progress=progress, answer=answer)
    return measured, None


def _result(
    vl: VLModel,
    built: Prompt,
    spec: SweepSpec,
    base: Intervention,
    knockouts: Knockouts,
    measured: Measured,
    triaged: Triaged | None,
    answer: list[int],
) -> xr.Dataset:
    """The sweep's Dataset: what was measured, labeled, with its provenance (and triage's estimates)."""
    record = sweep_record(
        vl,
        built,
        knockouts,
        measured,
        spec.video_fps,
        base=None if base == NOTHING else base.to_dict(),
        mask=_mask_text(spec, knockouts),
        mask_unit=spec.mask_unit if knockouts.dim == "token" else "",
        vision_attention=spec.vision_attention,
        vision_removal=spec.vision_removal,
        answer=spec.answer or "",
        answer_ids=answer,
    )
    ds = to_dataset(record)
    if triaged is None:
        return ds
    est = triaged.estimates
    return with_triage(
        ds, est.kl.numpy(), est.logprob_drop.numpy(), triaged.confirmed, triaged.audited, triaged.figures
    )


def sweep(
    vl: VLModel,
    prompt: SweepSpec | str,
    images: Sequence[str | Path] = (),
    *,
    progress: bool = True,
    backend: str | Backend = "nnsight",
    **options: Any,
) -> xr.Dataset:
    """Knock out each chosen token (or each intervention of ``over``) in turn and measure what changes.

    Takes a :class:`~vlmask.spec.SweepSpec`, or the prompt, its images and any of its options by
    name (``mask``, ``over``, ``base``, ``layers``, ``num_tokens``, ...: each field's help says what
    it does). Each masked unit (default: every text token) is blocked at ``layers``: dimension
    ``token``; ``over`` knocks out each of its interventions instead: dimension ``intervention``;
    ``layers=vlmask.windows(k)`` adds ``window``. ``base`` applies to the clean run and every
    knockout alike. Measured at the last position of each teacher-forced step, against the clean
    run, on its top token (or the ``answer``'s). ``backend`` runs the passes (``"nnsight"``, or
    ``"hooks"``: plain PyTorch hooks, the same numbers); ``progress`` switches the progress bar.

    Example:
        >>> import vlmask
        >>> vl = vlmask.load_model()
        >>> ds = vlmask.sweep(vl, "what color is the circle ?", ["examples/shapes.png"], progress=False)
        >>> sorted(ds["residual"].dims)
        ['layer', 'metric', 'step', 'token']
        >>> spec = vlmask.SweepSpec("what color is the circle ?", images=["examples/shapes.png"], mask="vision")
        >>> vlmask.sweep(vl, spec, progress=False).sizes["token"]
        16
    """
    spec = _spec(prompt, images, options)
    built, base, knockouts, answer = _prepared(vl, spec)
    max_len = built.inputs["input_ids"].shape[1] + spec.num_tokens - 1
    passes = PromptPasses.of(vl, built, max_len, spec.vision_attention, backend, spec.vision_removal)
    measured, triaged = _measure(passes, built.inputs["input_ids"], spec, base, knockouts, progress, answer)
    with stage("assembly"):
        return _result(vl, built, spec, base, knockouts, measured, triaged, answer)
