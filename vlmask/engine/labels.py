"""What a sweep hands to the result schema: the model, prompt and knockouts as plain labels.

The tokenizer decodes here, in the engine; :func:`vlmask.results.dataset.to_dataset` only
sees strings, numbers and tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmask.engine.knockouts import Knockouts
from vlmask.inputs.prompt import Prompt, tokenizer_of
from vlmask.model.load import VLModel
from vlmask.results.dataset import Measured, ModelLabels, SweepRecord
from vlmask.results.schema import RecordedFile, RecordedMedia


def model_labels(vl: VLModel) -> ModelLabels:
    """The names and sizes of ``vl`` that a result records.

    Example:
        >>> labels = model_labels(vl)
        >>> labels.family, labels.builtin, labels.num_layers, labels.dtype
        ('Qwen3-VL', True, 4, 'float32')
    """
    video = getattr(vl.processor, "video_processor", None)
    return ModelLabels(
        name=vl.name,
        family=vl.family.name,
        builtin=bool(vl.builtin),
        num_layers=vl.num_layers,
        num_heads=vl.num_heads,
        attn_implementation=vl.attn_implementation,
        dtype=str(vl.dtype).removeprefix("torch."),
        device=_placement(vl),
        video_frames_per_group=int(getattr(video, "temporal_patch_size", 0)),
        path=_model_path(vl.name),
    )


def _model_path(name: str) -> str:
    """Where model ``name`` (a directory or hub id) was loaded from: its absolute directory or hub cache snapshot."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id
        return ""
    return str(Path(found).parent) if isinstance(found, str) else ""


def sweep_record(
    vl: VLModel, built: Prompt, knockouts: Knockouts, measured: Measured, video_fps: float, **settings: Any
) -> SweepRecord:
    """The :class:`~vlmask.results.dataset.SweepRecord` of a sweep: its inputs labeled, its tokens decoded.

    ``settings`` are the record's plain settings (``mask``, ``mask_unit``, ``vision_attention``,
    ``vision_removal``, ``base``).
    """
    tokenizer = tokenizer_of(vl.processor)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    media = RecordedMedia(
        images=tuple(RecordedFile(f.path, f.sha256, orientation=f.orientation) for f in built.images),
        videos=tuple(RecordedFile(v.path, v.sha256, tuple(v.frame_names)) for v in built.videos),
        fps=float(video_fps),
    )
    windows = None if knockouts.windows is None else {**knockouts.windows.to_dict(), "layers": knockouts.window_layers}
    return SweepRecord(
        model=model_labels(vl),
        tokens=built.tokens,
        prompt=built.prompt,
        model_input_text=built.text,
        chat_template=built.chat_template,
        media=media,
        grids=list(built.grids),
        step_text=[decode([i]) for i in measured.clean_ids],
        clean_continuation=decode(measured.clean_ids),
        continuations=[decode(row) for row in measured.masked_ids.tolist()],
        knockout_dims=knockouts.dims,
        knockout_coords=knockouts.coords(built.tokens, vl.num_layers),
        interventions=[v.to_dict() for v in knockouts.values],
        measured=measured,
        layers=knockouts.layers,
        windows=windows,
        **settings,
    )


def _placement(vl: VLModel) -> str:
    """The device the model ran on, or its device map (module -> device) as JSON when it was spread by one."""
    mapping = getattr(vl.hf, "hf_device_map", None)
    return str(vl.device) if not mapping else json.dumps({str(k): str(v) for k, v in mapping.items()})
