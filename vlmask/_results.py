"""Labeled results: the sweep's xarray Dataset, netCDF files, and long-form tables."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from vlmask._errors import VlmaskError
from vlmask._grid import grids
from vlmask._inputs import tokenizer_of
from vlmask._metrics import LOGIT_METRICS, VECTOR_METRICS

SCHEMA_VERSION = 3
DIMS = ("step", "token", "layer", "head", "metric")
FORMATS = ("nc", "csv", "json")
METRIC_VARIABLES = ("residual", "heads", *LOGIT_METRICS)


@dataclass(frozen=True)
class SweepRecord:
    """Everything a sweep measured, before labeling."""

    prompt: Any
    vl: Any
    knockouts: Any  # vlmask._knockouts.Knockouts: what was knocked out, one row per entry x window
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


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    An interrupted or failed write leaves neither a partial ``path`` nor the temporary file.
    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask),
    not the temporary file's private ``0o600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_results(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``ds`` to netCDF atomically (a temporary file, then a rename).

    Example:
        >>> save_results(ds, "output/run.nc")  # doctest: +SKIP
        PosixPath('output/run.nc')
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise VlmaskError(f"output '{path}' already exists: choose another --output or pass --overwrite")
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def open_results(path: str | Path) -> xr.Dataset:
    """Open a result file written by :func:`save_results` (loaded into memory).

    Example:
        >>> ds = open_results("output/run.nc")  # doctest: +SKIP
        >>> ds["kl"].sel(step=0).to_series().nlargest(3)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise VlmaskError(f"result file '{path}' does not exist")
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return ds.load()
    except (OSError, ValueError) as err:
        raise VlmaskError(f"'{path}' is not a vlmask netCDF result: {err}") from None


def long_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per step x token x layer [x head] x metric, for spreadsheets.

    Columns: ``step, step_token, token, token_text, token_kind, layer, head, variable,
    metric, value``; ``layer`` and ``head`` are empty where they do not apply. Intervention
    sweeps add ``intervention, intervention_type`` (``token`` is empty), windowed ones
    ``window, window_start, window_end``.
    """
    frames = []
    for name in METRIC_VARIABLES:
        da = ds[name].astype(float)
        if "metric" not in da.dims:
            da = da.expand_dims(metric=[name])
        frame = da.to_dataframe(name="value").reset_index()
        frame["variable"] = "logits" if name in LOGIT_METRICS else name
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    extra = [c for c in ("intervention", "intervention_type", "window", "window_start", "window_end") if c in table]
    columns = [
        "step",
        "step_token",
        "token",
        "token_text",
        "token_kind",
        *extra,
        "layer",
        "head",
        "variable",
        "metric",
        "value",
    ]
    for col in columns:
        if col not in table:
            table[col] = pd.NA
    table = table[columns]
    table[["layer", "head"]] = table[["layer", "head"]].astype("Int64")
    return table


def write_tables(ds: xr.Dataset, stem: str | Path, formats: list[str], *, overwrite: bool = False) -> list[Path]:
    """Write the long table as ``stem.csv`` and/or ``stem.json`` (records), atomically."""
    table, written = None, []
    for fmt in formats:
        if fmt == "nc":
            continue
        if fmt not in FORMATS:
            raise VlmaskError(f"format {fmt!r} is not known: expected some of {FORMATS}")
        path = Path(f"{stem}.{fmt}")
        if path.exists() and not overwrite:
            raise VlmaskError(f"output '{path}' already exists: choose another --output or pass --overwrite")
        table = long_table(ds) if table is None else table
        if fmt == "csv":
            atomic_write(path, lambda tmp, table=table: table.to_csv(tmp, index=False))
        else:
            atomic_write(path, lambda tmp, table=table: table.to_json(tmp, orient="records"))
        written.append(path)
    return written
