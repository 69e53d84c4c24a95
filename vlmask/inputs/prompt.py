"""Turn a prompt and images into model inputs, and say what each position is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmask.errors import VlmaskError
from vlmask.inputs.grid import Grid, Layout, coordinates
from vlmask.inputs.layout import layout_of
from vlmask.inputs.media import ImageFile, processor_pixel_cap, read_image
from vlmask.inputs.video import VideoFile, read_video, video_kwargs

if TYPE_CHECKING:  # annotations only: the command line reads CHAT_TEMPLATE_MODES without torch
    import torch

log = logging.getLogger(__name__)

CHAT_TEMPLATE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class TokenTable:
    """What the model saw, position by position; vision positions also carry their grid cell (else -1)."""

    ids: tuple[int, ...]
    text: tuple[str, ...]
    kind: tuple[str, ...]
    image_index: tuple[int, ...]
    video_index: tuple[int, ...]
    t: tuple[int, ...]
    row: tuple[int, ...]
    col: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def vision_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``[start, end)`` runs of vision positions, in order: one per image and one per video frame
        group (Qwen2-VL places a video's groups back to back, with no token between them)."""
        ranges: list[tuple[int, int]] = []
        media = list(zip(self.image_index, self.video_index, self.t, strict=True))  # which image, or video group
        for pos, kind in enumerate(self.kind):
            if kind != "vision":
                continue
            if ranges and ranges[-1][1] == pos and media[pos] == media[pos - 1]:
                ranges[-1] = (ranges[-1][0], pos + 1)
            else:
                ranges.append((pos, pos + 1))
        return ranges


@dataclass(frozen=True)
class Prompt:
    """Processor outputs for one prompt, plus the labels of its positions."""

    prompt: str
    text: str
    chat_template: bool
    images: tuple[ImageFile, ...]
    inputs: dict[str, torch.Tensor]
    tokens: TokenTable
    videos: tuple[VideoFile, ...] = ()
    prompt_positions: tuple[int, ...] = ()  # the text tokens written by the user's prompt, not by the template
    grids: tuple[Grid, ...] = ()  # each image's and video's token grid


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer inside a multimodal processor, or the processor itself for a text-only model."""
    return getattr(processor, "tokenizer", processor)


def reads_images(processor: Any) -> bool:
    """Whether ``processor`` takes images (a vision-language processor, not a bare tokenizer)."""
    return hasattr(processor, "image_processor")


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return ids


def token_table(processor: Any, input_ids: torch.Tensor, layout: Layout) -> TokenTable:
    """Label each position of ``input_ids`` (1D) as text, vision or special, with its image/video and grid cell.

    An image placeholder that carries a row's newline (LLaVA-NeXT) is ``special``, in no grid cell.
    """
    tokenizer = tokenizer_of(processor)
    ids = [int(i) for i in input_ids.tolist()]
    image_id, video_id = getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None)
    vision_ids = {image_id, video_id} - {None}
    special = _special_ids(tokenizer) - vision_ids - {tokenizer.unk_token_id}
    cells = coordinates(ids, image_id, video_id, layout)
    kinds = ["vision" if i in vision_ids else "special" if i in special else "text" for i in ids]
    kinds = ["special" if newline else kind for kind, newline in zip(kinds, cells.newline, strict=True)]
    texts = [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]
    return TokenTable(tuple(ids), tuple(texts), tuple(kinds), cells.image, cells.video, cells.t, cells.row, cells.col)


def format_prompt(
    processor: Any, prompt: str, num_images: int, chat_template: str = "auto", num_videos: int = 0
) -> tuple[str, bool]:
    """The exact text handed to the processor, and whether the chat template was used.

    ``auto`` uses the processor's chat template when it has one, else the raw prompt
    (with each image's, then each video's, vision placeholder in front).
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise VlmaskError(
            f"chat template {chat_template!r} is not known: expected one of {', '.join(CHAT_TEMPLATE_MODES)}"
        )
    has_template = bool(getattr(processor, "chat_template", None))
    if chat_template == "on" and not has_template:
        raise VlmaskError("chat template on, but this processor has no chat template: use auto or off")
    if chat_template == "off" or not has_template:
        if not num_images + num_videos:
            return prompt, False
        start = getattr(processor, "vision_start_token", "<|vision_start|>")  # Qwen2-VL's processor names neither
        end = getattr(processor, "vision_end_token", "<|vision_end|>")
        if start not in tokenizer_of(processor).get_vocab():  # LLaVA: the placeholder alone, on its own line
            start, end = "", "\n"
        videos = (start + processor.video_token + end) * num_videos
        return (start + processor.image_token + end) * num_images + videos + prompt, False
    content: Any = prompt  # text only: plain content, which every chat template takes
    if num_images + num_videos:
        parts = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        content = [*parts, {"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True


def _prompt_span(processor: Any, text: str, prompt: str, num_images: int, chat_template: str, num_videos: int):
    """Where ``prompt`` lies in the formatted ``text``: ``(start, end)`` characters, or None if the template changed it.

    The template's own text is what two different prompts format to alike.
    """
    a, b = (format_prompt(processor, s, num_images, chat_template, num_videos)[0] for s in ("\x01", "\x02"))
    start = next(k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    end = start + len(prompt)
    return (start, end) if text[start:end] == prompt and len(text) - end == len(a) - start - 1 else None


def prompt_positions(
    processor: Any, text: str, span: tuple[int, int] | None, input_ids: torch.Tensor
) -> tuple[int, ...]:
    """Positions of ``input_ids`` (vision placeholders expanded) whose text lies in ``span`` of ``text``.

    ``text`` is tokenized unexpanded: the template after the prompt has no vision
    placeholder, so counting from the end gives the same positions in the expanded ids.
    """
    if span is None:
        return ()
    offsets = tokenizer_of(processor)(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    inside = [k for k, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    shift = len(input_ids) - len(offsets)
    return tuple(k + shift for k in inside)


def build_prompt(
    processor: Any,
    prompt: str,
    images: list[str | Path] | tuple = (),
    chat_template: str = "auto",
    videos: list[str | Path] | tuple = (),
    video_fps: float = 2.0,
) -> Prompt:
    """Read the images and videos (frame directories), format the prompt and run the processor.

    Video frames are taken as they are (no frame sampling), as if sampled at ``video_fps``
    frames per second; Qwen3-VL writes each frame group's time into the prompt.

    Example:
        >>> from vlmask.builtin import make_processor
        >>> built = build_prompt(make_processor(["test"]), "test", chat_template="off")
        >>> built.tokens.text, built.tokens.kind
        (('test',), ('text',))
    """
    if not prompt or not prompt.strip():
        raise VlmaskError("the prompt is empty: give it some text")
    if (images or videos) and not reads_images(processor):
        raise VlmaskError(
            f"this model reads text only, but {len(images)} image(s) and {len(videos)} video(s) were given: "
            "drop the images and videos, or load a vision-language model"
        )
    cap = processor_pixel_cap(processor)
    files = tuple(read_image(path, cap) for path in images)
    for file in files:
        if file.frames > 1:
            log.warning("image file '%s' is animated (%d frames): the model sees frame 0 only", file.path, file.frames)
    clips = tuple(read_video(path) for path in videos)
    text, used_template = format_prompt(processor, prompt, len(files), chat_template, len(clips))
    # A chat template writes any begin-of-text token itself; a raw prompt gets the tokenizer's own.
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": not used_template}
    if files:
        kwargs["images"] = [f.image for f in files]
    if clips:
        kwargs.update(video_kwargs(clips, video_fps))
    inputs = dict(processor(**kwargs))
    inputs.pop("token_type_ids", None)
    layout = layout_of(processor, inputs, [(f.image.height, f.image.width) for f in files])
    table = token_table(processor, inputs["input_ids"][0], layout)
    span = _prompt_span(processor, text, prompt, len(files), chat_template, len(clips))
    own = prompt_positions(processor, text, span, inputs["input_ids"][0])
    own = tuple(p for p in own if table.kind[p] == "text")
    return Prompt(prompt, text, used_template, files, inputs, table, clips, own, layout.grids)
