"""Labeled results: the sweep's xarray Dataset, netCDF files, and long-form tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch
import xarray as xr

from vlmask.inputs.grid import grids
from vlmask.inputs.prompt import tokenizer_of
from vlmask.results.metrics import LOGIT_METRICS, VECTOR_METRICS

SCHEMA_VERSION = 3
METRIC_VARIABLES = ("residual", "heads", *LOGIT_METRICS)


@dataclass(frozen=True)
class SweepRecord:
    """Everything a sweep measured, before labeling."""

    prompt: Any
    vl: Any
    knockouts: Any  # vlmask.engine.knockouts.Knockouts: what was knocked out, one row per entry x window
    base: dict[str, Any] | None  # the base intervention applied to every pass, clean included
    mask: str
    mask_unit: str
    vision_attention: str
    clean_ids: list[int]
    clean_top_logprob: torch.Tensor  # (step,)
    residual: torch.Tensor  # (knockout, layer, step, metric)
    heads: torch.Tensor  # (knockout, layer, step, head, metric)
    logits: torch.Tensor  # (knockout, step, logit metric)
    masked_ids: torch.Tensor  # (knockout, step)
    video_fps: float = 2.0


def _versions() -> dict[str, str]:
    names = ("vlmask", "torch", "transformers", "nnsight", "xarray")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def to_dataset(rec: SweepRecord) -> xr.Dataset:
    """Label a :class:`SweepRecord`: dims ``step, token`` (or ``intervention``) ``[, window], layer, head, metric``."""
    tokens = rec.prompt.tokens
    tokenizer = tokenizer_of(rec.vl.processor)
    step_text = [tokenizer.decode([i], skip_special_tokens=False) for i in rec.clean_ids]
    prompt_len = len(tokens)
    ko = rec.knockouts
    dims, shape = ko.dims, ko.shape

    def entries(t: torch.Tensor, step_axis: int) -> np.ndarray:
        """``(knockout, ...)`` as ``(step, *knockout dims, ...)``: the flat knockout rows unfolded."""
        return np.moveaxis(t.numpy().reshape(*shape, *t.shape[1:]), step_axis, 0)

    residual = entries(rec.residual, -2)
    heads = entries(rec.heads, -3)
    logits = entries(rec.logits, -2)
    continuations = [tokenizer.decode(row, skip_special_tokens=False) for row in rec.masked_ids.tolist()]
    data = {
        "residual": (("step", *dims, "layer", "metric"), residual),
        "heads": (("step", *dims, "layer", "head", "metric"), heads),
        **{
            name: (("step", *dims), logits[..., i].astype(bool) if name == "top_changed" else logits[..., i])
            for i, name in enumerate(LOGIT_METRICS)
        },
        "masked_token_id": ((*dims, "step"), rec.masked_ids.numpy().astype(np.int64).reshape(*shape, -1)),
        "masked_continuation": (dims, np.array(continuations, dtype=object).reshape(shape)),
        "clean_top_logprob": (("step",), rec.clean_top_logprob.numpy()),
    }
    coords = {
        "step": np.arange(len(rec.clean_ids)),
        "step_token": ("step", np.array(step_text, dtype=object)),
        "step_token_id": ("step", np.array(rec.clean_ids, dtype=np.int64)),
        "step_position": ("step", np.arange(len(rec.clean_ids)) + prompt_len - 1),
        **ko.coords(tokens, rec.vl.num_layers),
        "layer": np.arange(rec.vl.num_layers),
        "head": np.arange(rec.vl.num_heads),
        "metric": list(VECTOR_METRICS),
        "seq": np.arange(prompt_len),
        "seq_id": ("seq", np.array(tokens.ids, dtype=np.int64)),
        "seq_text": ("seq", np.array(tokens.text, dtype=object)),
        "seq_kind": ("seq", np.array(tokens.kind, dtype=object)),
        "seq_image": ("seq", np.array(tokens.image_index, dtype=np.int64)),
        **{
            f"seq_{name}": ("seq", np.array(getattr(tokens, field), dtype=np.int64))
            for name, field in (("video", "video_index"), ("t", "t"), ("row", "row"), ("col", "col"))
        },
    }
    images, videos = rec.prompt.images, rec.prompt.videos
    inputs = rec.prompt.inputs
    vision_grids = grids(
        *(inputs[k].tolist() if k in inputs else None for k in ("image_grid_thw", "video_grid_thw")),
        getattr(getattr(rec.vl.processor, "image_processor", None), "merge_size", 1),
    )
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "model": rec.vl.name,
        "model_family": rec.vl.family.name,
        "builtin_model": int(rec.vl.builtin),
        "prompt": rec.prompt.prompt,
        "model_input_text": rec.prompt.text,
        "chat_template": "on" if rec.prompt.chat_template else "off",
        "image_files": json.dumps([f.path for f in images]),
        "image_sha256": json.dumps([f.sha256 for f in images]),
        "video_files": json.dumps([v.path for v in videos]),
        "video_sha256": json.dumps([v.sha256 for v in videos]),
        "video_frames": json.dumps([list(v.frame_names) for v in videos]),
        "video_fps": float(rec.video_fps),
        "video_frames_per_group": int(
            getattr(getattr(rec.vl.processor, "video_processor", None), "temporal_patch_size", 0)
        ),
        "vision_grids": json.dumps([g.to_dict() for g in vision_grids]),
        "vision_ranges": json.dumps(tokens.vision_ranges),
        "clean_continuation": tokenizer.decode(rec.clean_ids, skip_special_tokens=False),
        "num_tokens": len(rec.clean_ids),
        "mask": rec.mask,
        "mask_unit": rec.mask_unit,
        "layers": json.dumps(ko.layers),
        "windows": json.dumps(None if ko.windows is None else {**ko.windows.to_dict(), "layers": ko.window_layers}),
        "vision_attention": rec.vision_attention,
        "vision_attention_native": int(rec.vision_attention == "native"),
        "over": ko.dim,
        "intervention": json.dumps({"over": ko.dim, "dims": list(dims), "layers": ko.layers}),
        "base": json.dumps(rec.base),
        "interventions": json.dumps([v.to_dict() for v in ko.values]),
        "measured_position": "last position of each step's sequence (teacher-forced on the clean continuation)",
        "attn_implementation": rec.vl.attn_implementation,
        "dtype": str(rec.vl.dtype).removeprefix("torch."),
        "device": str(rec.vl.device),
        "versions": json.dumps(_versions()),
    }
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    ds["residual"].attrs["description"] = "decoder layer output at the measured position, knockout vs clean"
    ds["heads"].attrs["description"] = "each head's slice of the o_proj input at the measured position, vs clean"
    ds["kl"].attrs["description"] = "KL(clean || masked) of the next-token distribution (nats)"
    ds["logprob_drop"].attrs["description"] = "clean log-prob of the clean top token minus its masked log-prob"
    ds["prob_change_pct"].attrs["description"] = "(masked - clean) / clean probability of the clean top token, %"
    ds["top_changed"].attrs["description"] = "whether the knockout changed the top token"
    return ds
