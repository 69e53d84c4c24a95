"""Labeled results: a sweep's measurements and plain labels turned into the xarray Dataset of the schema.

Nothing here sees the model or its processor: the engine decodes the tokens and passes
strings and numbers (:class:`SweepRecord`); :func:`to_dataset` lays them out under the names
declared in :mod:`vlmask.results.schema`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch
import xarray as xr

from vlmask.inputs.grid import Grid
from vlmask.inputs.prompt import TokenTable
from vlmask.results.agreement import with_attention
from vlmask.results.cf import CF_METADATA, CONVENTIONS
from vlmask.results.metrics import LOGIT_METRICS, VECTOR_METRICS
from vlmask.results.schema import (
    ATTENTION_NORM_SEQ,
    ATTENTION_SEQ,
    ATTR,
    CLEAN_TOP_LOGPROB,
    DESCRIPTIONS,
    HEAD,
    HEADS,
    LAYER,
    MASKED_CONTINUATION,
    MASKED_TOKEN_ID,
    METRIC,
    RESIDUAL,
    SCHEMA_VERSION,
    SEQ,
    STEP,
    STEP_POSITION,
    STEP_TOKEN,
    STEP_TOKEN_ID,
    TOP_CHANGED,
    RecordedFile,
    RecordedMedia,
)


@dataclass(frozen=True)
class ModelLabels:
    """What a result records of the model that ran: names and sizes, no weights."""

    name: str
    family: str
    builtin: bool
    num_layers: int
    num_heads: int
    attn_implementation: str
    dtype: str  # like "float32"
    device: str
    video_frames_per_group: int = 0  # frames merged into one frame group (0: the model reads no video)
    path: str = ""  # where the model was loaded from: its directory or hub cache snapshot ("" if unknown)


@dataclass(frozen=True)
class Measured:
    """The numbers a sweep measured, one row per knockout (row-major over the knockout dims)."""

    clean_ids: list[int]  # the clean continuation, one token id per step
    clean_top_logprob: torch.Tensor  # (step,)
    residual: torch.Tensor  # (knockout, layer, step, metric)
    heads: torch.Tensor  # (knockout, layer, step, head, metric)
    logits: torch.Tensor  # (knockout, step, logit metric)
    masked_ids: torch.Tensor  # (knockout, step)
    attention: torch.Tensor | None = None  # clean, (step, seq, layer, head); None: not read
    attention_norm: torch.Tensor | None = None  # value-weighted, like attention


@dataclass(frozen=True)
class SweepRecord:
    """Everything a sweep measured, with plain labels: decoded texts, the token table, what was knocked out.

    ``knockout_coords`` holds the coordinates of ``knockout_dims`` (``token`` or ``intervention``
    [, ``window``]); ``interventions`` each knockout's ``to_dict()``, row-major over those dims.
    """

    model: ModelLabels
    tokens: TokenTable
    prompt: str
    model_input_text: str
    chat_template: bool
    media: RecordedMedia
    grids: list[Grid]
    step_text: list[str]  # each clean step's token, decoded
    clean_continuation: str
    continuations: list[str]  # each knockout's greedy continuation, decoded
    knockout_dims: tuple[str, ...]
    knockout_coords: dict[str, Any]
    interventions: list[dict[str, Any]]
    measured: Measured
    mask: str = ""
    mask_unit: str = ""
    vision_attention: str = "native"
    vision_removal: str = "keys"
    layers: list[int] | None = None
    windows: dict[str, Any] | None = None  # {k, centres, layers} of a windowed sweep
    base: dict[str, Any] | None = None  # the base intervention applied to every pass, clean included
    answer: str = ""  # the answer the clean continuation was forced to ("": greedy)
    answer_ids: list[int] | None = None  # its token ids (all of them, also past the steps)

    @property
    def knockout_shape(self) -> tuple[int, ...]:
        return tuple(len(self.knockout_coords[d]) for d in self.knockout_dims)


def _versions() -> dict[str, str]:
    names = ("vlmask", "torch", "transformers", "nnsight", "xarray")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _data(rec: SweepRecord) -> dict[str, Any]:
    """The data variables: each knockout row unfolded onto the knockout dims."""
    dims, shape, m = rec.knockout_dims, rec.knockout_shape, rec.measured

    def entries(t: torch.Tensor, step_axis: int) -> np.ndarray:
        """``(knockout, ...)`` as ``(step, *knockout dims, ...)``: the flat knockout rows unfolded."""
        return np.moveaxis(t.numpy().reshape(*shape, *t.shape[1:]), step_axis, 0)

    logits = entries(m.logits, -2)
    return {
        RESIDUAL: ((STEP, *dims, LAYER, METRIC), entries(m.residual, -2)),
        HEADS: ((STEP, *dims, LAYER, HEAD, METRIC), entries(m.heads, -3)),
        **{
            name: ((STEP, *dims), logits[..., i].astype(bool) if name == TOP_CHANGED else logits[..., i])
            for i, name in enumerate(LOGIT_METRICS)
        },
        MASKED_TOKEN_ID: ((*dims, STEP), m.masked_ids.numpy().astype(np.int64).reshape(*shape, -1)),
        MASKED_CONTINUATION: (dims, np.array(rec.continuations, dtype=object).reshape(shape)),
        CLEAN_TOP_LOGPROB: ((STEP,), m.clean_top_logprob.numpy()),
        **_attention_data(m),
    }


def _attention_data(m: Measured) -> dict[str, Any]:
    """The clean attention on ``seq``, where the sweep read it."""
    if m.attention is None or m.attention_norm is None:
        return {}
    dims = (STEP, SEQ, LAYER, HEAD)
    return {ATTENTION_SEQ: (dims, m.attention.numpy()), ATTENTION_NORM_SEQ: (dims, m.attention_norm.numpy())}


def _coords(rec: SweepRecord) -> dict[str, Any]:
    """Coordinates: the steps, the knockouts, layers, heads, metrics, and the token table on ``seq``."""
    tokens, steps = rec.tokens, len(rec.measured.clean_ids)
    table = {
        "id": (tokens.ids, np.int64),
        "text": (tokens.text, object),
        "kind": (tokens.kind, object),
        "image": (tokens.image_index, np.int64),
        "video": (tokens.video_index, np.int64),
        "t": (tokens.t, np.int64),
        "row": (tokens.row, np.int64),
        "col": (tokens.col, np.int64),
    }
    return {
        STEP: np.arange(steps),
        STEP_TOKEN: (STEP, np.array(rec.step_text, dtype=object)),
        STEP_TOKEN_ID: (STEP, np.array(rec.measured.clean_ids, dtype=np.int64)),
        STEP_POSITION: (STEP, np.arange(steps) + len(tokens) - 1),
        **rec.knockout_coords,
        LAYER: np.arange(rec.model.num_layers),
        HEAD: np.arange(rec.model.num_heads),
        METRIC: list(VECTOR_METRICS),
        SEQ: np.arange(len(tokens)),
        **{f"{SEQ}_{name}": (SEQ, np.array(values, dtype=dtype)) for name, (values, dtype) in table.items()},
    }


def _absolute(f: RecordedFile) -> str:
    """The file's absolute path: as recorded, else resolved against the working folder the sweep read it from."""
    return f.absolute or os.path.abspath(f.path)


def _attrs(rec: SweepRecord) -> dict[str, Any]:
    """The attributes: provenance as strings and numbers, structured values as JSON text."""
    model, media, over = rec.model, rec.media, rec.knockout_dims[0]
    return {
        ATTR.Conventions: CONVENTIONS,
        ATTR.title: f"vlmask attention-knockout sweep over {over}s: {rec.prompt[:60]}",
        ATTR.schema_version: SCHEMA_VERSION,
        ATTR.model: model.name,
        ATTR.model_path: model.path,
        ATTR.model_family: model.family,
        ATTR.builtin_model: int(model.builtin),
        ATTR.prompt: rec.prompt,
        ATTR.model_input_text: rec.model_input_text,
        ATTR.chat_template: "on" if rec.chat_template else "off",
        ATTR.image_files: json.dumps([f.path for f in media.images]),
        ATTR.image_files_absolute: json.dumps([_absolute(f) for f in media.images]),
        ATTR.image_sha256: json.dumps([f.sha256 for f in media.images]),
        ATTR.image_orientation: json.dumps([f.orientation for f in media.images]),
        ATTR.video_files: json.dumps([v.path for v in media.videos]),
        ATTR.video_files_absolute: json.dumps([_absolute(v) for v in media.videos]),
        ATTR.video_sha256: json.dumps([v.sha256 for v in media.videos]),
        ATTR.video_frames: json.dumps([list(v.frames) for v in media.videos]),
        ATTR.video_fps: float(media.fps),
        ATTR.video_frames_per_group: int(model.video_frames_per_group),
        ATTR.vision_grids: json.dumps([g.to_dict() for g in rec.grids]),
        ATTR.vision_ranges: json.dumps(rec.tokens.vision_ranges),
        ATTR.clean_continuation: rec.clean_continuation,
        ATTR.num_tokens: len(rec.measured.clean_ids),
        ATTR.mask: rec.mask,
        ATTR.mask_unit: rec.mask_unit,
        ATTR.layers: json.dumps(rec.layers),
        ATTR.windows: json.dumps(rec.windows),
        ATTR.vision_attention: rec.vision_attention,
        ATTR.vision_attention_native: int(rec.vision_attention == "native"),
        ATTR.vision_removal: rec.vision_removal,
        ATTR.over: over,
        ATTR.intervention: json.dumps({"over": over, "dims": list(rec.knockout_dims), "layers": rec.layers}),
        ATTR.base: json.dumps(rec.base),
        ATTR.interventions: json.dumps(rec.interventions),
        ATTR.measured_token: "answer" if rec.answer else "greedy",
        ATTR.answer: rec.answer,
        ATTR.answer_token_ids: json.dumps(rec.answer_ids or []),
        ATTR.measured_position: "last position of each step's sequence (teacher-forced on the clean continuation)",
        ATTR.attn_implementation: model.attn_implementation,
        ATTR.dtype: model.dtype,
        ATTR.device: model.device,
        ATTR.versions: json.dumps(_versions()),
    }


def to_dataset(rec: SweepRecord) -> xr.Dataset:
    """Label a :class:`SweepRecord`: dims ``step, token`` (or ``intervention``) ``[, window], layer, head, metric``.

    Where the sweep read attention, its per-unit sums and agreement with the knockouts are
    added (:func:`vlmask.results.agreement.with_attention`).

    Example:
        >>> ds[RESIDUAL].dims, ds[RESIDUAL].attrs["description"] == DESCRIPTIONS[RESIDUAL]
        (('step', 'token', 'layer', 'metric'), True)
        >>> ds.attrs["Conventions"], ds["layer"].attrs, ds["prob_change_pct"].attrs["units"]
        ('CF-1.10', {'long_name': 'decoder layer', 'units': '1'}, 'percent')
    """
    ds = xr.Dataset(_data(rec), coords=_coords(rec), attrs=_attrs(rec))
    for name, text in DESCRIPTIONS.items():
        ds[name].attrs["description"] = text
    ds = with_attention(ds)
    for name, (long_name, units) in CF_METADATA.items():
        if name in ds.variables:
            ds[name].attrs.update({"long_name": long_name, **({"units": units} if units else {})})
    return ds
