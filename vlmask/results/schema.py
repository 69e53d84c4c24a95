"""The result schema, declared once: dimension, variable, coordinate and attribute names, and typed readers.

A sweep's Dataset has dims ``step``, ``token`` (or ``intervention``) ``[, window], layer, head,
metric`` and the prompt's token table on ``seq``. netCDF attributes hold only strings and
numbers, so structured provenance (files, grids, interventions) is stored as JSON text; read
it back with the readers here (:func:`vision_ranges`, :func:`vision_grids`,
:func:`recorded_media`, :func:`interventions_of`), never with ``json.loads`` by hand. A
missing or malformed attribute is a :class:`~vlmask.errors.VlmaskError` saying the Dataset is
not a (complete) vlmask result.

The names are constants (``ds[TOKEN_KIND]``, ``(STEP, TOKEN)``); attribute names, several of
which are also dimension names, are the fields of :data:`ATTR` (``ds.attrs[ATTR.prompt]``).
Keyword arguments such as ``ds.sel(step=0)`` name dims as xarray itself does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from interventions import from_dict
from vlmask.errors import VlmaskError
from vlmask.inputs.grid import Grid
from vlmask.results.metrics import LOGIT_METRICS, VECTOR_METRICS

SCHEMA_VERSION = 3

# ---- dimensions --------------------------------------------------------------------------------
STEP = "step"  # teacher-forced generation steps
TOKEN = "token"  # masked units (coordinate: the unit's first position)
INTERVENTION = "intervention"  # knocked-out intervention values, for sweeps over=[...]
WINDOW = "window"  # sliding layer windows (coordinate: the centre layer)
LAYER = "layer"
HEAD = "head"
METRIC = "metric"  # the vector metrics of residual and heads
SEQ = "seq"  # every position of the model input: the token table
KNOCKOUT_DIMS = (TOKEN, INTERVENTION, WINDOW)
PANEL, ROW, COL = "panel", "row", "col"  # a heatmap's dims: an image or frame group, its merged-token grid

# ---- variables ---------------------------------------------------------------------------------
RESIDUAL = "residual"
HEADS = "heads"
KL, LOGPROB_DROP, PROB_CHANGE_PCT, TOP_CHANGED = LOGIT_METRICS
MASKED_TOKEN_ID = "masked_token_id"
MASKED_CONTINUATION = "masked_continuation"
CLEAN_TOP_LOGPROB = "clean_top_logprob"
METRIC_VARIABLES = (RESIDUAL, HEADS, *LOGIT_METRICS)
L2, COSINE, REL_L2 = VECTOR_METRICS
DESCRIPTIONS = {
    RESIDUAL: (
        "decoder layer output at the measured position, knockout vs clean: before the final norm (at the last"
        " layer transformers' hidden_states[-1] is after it) and before Qwen3-VL's DeepStack additions"
    ),
    HEADS: "each head's slice of the o_proj input at the measured position, vs clean",
    KL: "KL(clean || masked) of the next-token distribution (nats)",
    LOGPROB_DROP: "clean log-prob of the measured token (the clean top one, or the answer's) minus its masked log-prob",
    PROB_CHANGE_PCT: "(masked - clean) / clean probability of the measured token, %",
    TOP_CHANGED: "whether the knockout changed the top token",
}
"""The ``description`` attribute of each metric variable."""

# ---- triage results (``sweep(..., triage=K)``): estimates everywhere, exact values only where confirmed or audited --
ESTIMATE_KL, ESTIMATE_LOGPROB_DROP = "estimate_kl", "estimate_logprob_drop"
CONFIRMED, AUDITED = "confirmed", "audited"
TRIAGE_DESCRIPTIONS = {
    ESTIMATE_KL: "first-order (Gauss-Newton) estimate of kl, from the clean run's attention gradients",
    ESTIMATE_LOGPROB_DROP: "first-order estimate of logprob_drop, from the clean run's attention gradients",
    CONFIRMED: "knockout run exactly because its estimate ranked in the top K (or a query row saturated)",
    AUDITED: "knockout run exactly as part of the random audit of the unconfirmed ones",
}
"""The ``description`` attribute of each triage variable (present in triage results only)."""


# ---- the clean attention readout, and how it agrees with the knockouts (absent with attention=False) ----------
ATTENTION_SOURCE = "attention_source"  # dim: which attention is compared: ATTENTION or ATTENTION_NORM
EFFECT = "effect"  # dim: which knockout effect it is compared with: KL or LOGPROB_DROP
TOP_K = "k"  # dim: the k of a top-k overlap
ATTENTION, ATTENTION_NORM = "attention", "attention_norm"
ATTENTION_SEQ, ATTENTION_NORM_SEQ = "attention_seq", "attention_norm_seq"
AGREEMENT_SPEARMAN, AGREEMENT_TOP_K = "agreement_spearman", "agreement_top_k"
AGREEMENT_SPEARMAN_ALL, AGREEMENT_TOP_K_ALL = "agreement_spearman_all_layers", "agreement_top_k_all_layers"
ATTENTION_SINK = "attention_sink"
ATTENTION_DESCRIPTIONS = {
    ATTENTION_SEQ: "clean attention probability from the measured position to each position, per layer and head",
    ATTENTION_NORM_SEQ: "value-weighted clean attention ||a v W_O,h|| (Kobayashi et al. 2020) to each position",
    ATTENTION: "clean attention probability from the measured position to the unit (sum over its members)",
    ATTENTION_NORM: "value-weighted clean attention ||a v W_O,h|| to the unit (sum over its members)",
    AGREEMENT_SPEARMAN: "Spearman rank correlation over units: head-mean attention at the layer vs knockout effect",
    AGREEMENT_TOP_K: "fraction of the k units of most head-mean attention that are among the k of largest effect",
    AGREEMENT_SPEARMAN_ALL: "Spearman rank correlation over units: attention averaged over layers and heads vs effect",
    AGREEMENT_TOP_K_ALL: "top-k overlap over units: attention averaged over layers and heads vs knockout effect",
    ATTENTION_SINK: "unit in the top decile of head-mean attention at the layer but the bottom half of the effect",
}
"""The ``description`` attribute of each attention variable (present where the sweep read attention)."""

# ---- coordinates -------------------------------------------------------------------------------
STEP_TOKEN, STEP_TOKEN_ID, STEP_POSITION = "step_token", "step_token_id", "step_position"
TOKEN_TEXT, TOKEN_KIND, TOKEN_MEMBERS, TOKEN_SIZE = "token_text", "token_kind", "token_members", "token_size"
TOKEN_IMAGE, TOKEN_VIDEO, TOKEN_T = "token_image", "token_video", "token_t"
TOKEN_ROW, TOKEN_COL, TOKEN_ROWS, TOKEN_COLS = "token_row", "token_col", "token_rows", "token_cols"
INTERVENTION_TYPE, INTERVENTION_JSON = "intervention_type", "intervention_json"
WINDOW_START, WINDOW_END = "window_start", "window_end"
SEQ_ID, SEQ_TEXT, SEQ_KIND = "seq_id", "seq_text", "seq_kind"
SEQ_IMAGE, SEQ_VIDEO, SEQ_T, SEQ_ROW, SEQ_COL = "seq_image", "seq_video", "seq_t", "seq_row", "seq_col"
PANEL_SOURCE, PANEL_INDEX, PANEL_T = "panel_source", "panel_index", "panel_t"  # "image"/"video", which, frame group
PANEL_ROWS, PANEL_COLS = "panel_rows", "panel_cols"  # the panel's own grid, before padding
VISION = "vision"  # the token kind of image and video tokens (the others: "text", "special")


@dataclass(frozen=True)
class _Attributes:
    """The names of a result's attributes (a namespace: several are also dimension names)."""

    Conventions: str = "Conventions"  # CF: the metadata conventions followed (the name CF gives it)
    title: str = "title"  # CF: what the file holds
    schema_version: str = "schema_version"
    model: str = "model"  # the model as given: a hub id or a path
    model_path: str = "model_path"  # where it was loaded from: the directory, or the hub cache snapshot ("" if unknown)
    model_family: str = "model_family"
    builtin_model: str = "builtin_model"
    prompt: str = "prompt"
    model_input_text: str = "model_input_text"
    chat_template: str = "chat_template"
    image_files: str = "image_files"  # JSON: list of paths, as given
    image_files_absolute: str = "image_files_absolute"  # JSON: list of absolute paths
    image_files_relative: str = "image_files_relative"  # JSON: list of paths relative to the result file (on save)
    image_sha256: str = "image_sha256"  # JSON: list of hex digests
    image_orientation: str = "image_orientation"  # JSON: list of the EXIF Orientation applied to each (1: none)
    video_files: str = "video_files"  # JSON: list of frame directories
    video_files_absolute: str = "video_files_absolute"  # JSON: list of absolute paths
    video_files_relative: str = "video_files_relative"  # JSON: list of paths relative to the result file (on save)
    video_sha256: str = "video_sha256"  # JSON: list of hashes over each directory's frames
    video_frames: str = "video_frames"  # JSON: list of each video's frame file names
    video_fps: str = "video_fps"
    video_frames_per_group: str = "video_frames_per_group"
    vision_grids: str = "vision_grids"  # JSON: list of Grid.to_dict()
    vision_ranges: str = "vision_ranges"  # JSON: list of half-open [start, end) runs of vision positions
    clean_continuation: str = "clean_continuation"
    num_tokens: str = "num_tokens"
    mask: str = "mask"
    mask_unit: str = "mask_unit"
    layers: str = "layers"  # JSON: list of layers, or null (all)
    windows: str = "windows"  # JSON: {k, centres, layers} or null
    vision_attention: str = "vision_attention"
    vision_attention_native: str = "vision_attention_native"
    vision_removal: str = "vision_removal"  # keys, or full (DeepStack additions at blocked vision positions too)
    over: str = "over"
    intervention: str = "intervention"  # JSON: {over, dims, layers}
    base: str = "base"  # JSON: the base intervention's dict, or null
    interventions: str = "interventions"  # JSON: each knockout's dict, row-major over the knockout dims
    measured_token: str = "measured_token"  # greedy (each step's clean top token) or answer (the answer's tokens)
    answer: str = "answer"  # the answer text the clean continuation starts with ("" when greedy)
    answer_token_ids: str = "answer_token_ids"  # JSON: its token ids ([] when greedy)
    measured_position: str = "measured_position"
    attn_implementation: str = "attn_implementation"
    dtype: str = "dtype"
    device: str = "device"
    versions: str = "versions"  # JSON: {package: version}


ATTR = _Attributes()
"""Attribute names: ``ds.attrs[ATTR.prompt]``.

Example:
    >>> ATTR.vision_ranges, len(ATTRIBUTES)
    ('vision_ranges', 45)
"""
ATTRIBUTES = tuple(f.name for f in fields(_Attributes))


# ---- readers -----------------------------------------------------------------------------------


def json_attr(ds: xr.Dataset, name: str, default: Any = ...) -> Any:
    """The JSON attribute ``name`` of ``ds``, decoded; ``default`` if it is missing (an error if none is given).

    Example:
        >>> json_attr(xr.Dataset(attrs={"layers": "[0, 2]"}), "layers")
        [0, 2]
        >>> json_attr(xr.Dataset(attrs={"layers": "[0, 2"}), "layers")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: this is not a vlmask result: attribute 'layers' is not valid JSON ('[0, 2')
    """
    if name not in ds.attrs:
        if default is not ...:
            return default
        version = ds.attrs.get(ATTR.schema_version, "unknown")
        raise VlmaskError(
            f"this is not a complete vlmask result (schema {version}): it has no {name!r} attribute;"
            f" this vlmask writes schema {SCHEMA_VERSION}: rerun the sweep"
        )
    text = ds.attrs[name]
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        shown = str(text) if len(str(text)) <= 40 else f"{str(text)[:40]}..."
        raise VlmaskError(f"this is not a vlmask result: attribute {name!r} is not valid JSON ({shown!r})") from None


def _malformed(name: str, value: Any, expected: str) -> VlmaskError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else f"{shown[:60]}..."
    return VlmaskError(f"this is not a vlmask result: attribute {name!r} holds {shown}, expected {expected}")


def vision_ranges(ds: xr.Dataset) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` runs of vision positions on ``seq``, one per image or video frame group.

    Example:
        >>> vision_ranges(ds)  # the 16 tokens of examples/shapes.png
        [(3, 19)]
    """
    value = json_attr(ds, ATTR.vision_ranges)
    try:
        return [(int(start), int(end)) for start, end in value]
    except (TypeError, ValueError):
        raise _malformed(ATTR.vision_ranges, value, "a list of [start, end] pairs") from None


def _extents(grid: dict) -> tuple[tuple[float, float, float, float], ...]:
    return tuple((float(a), float(b), float(c), float(d)) for a, b, c, d in grid.get("extents", ()))


def vision_grids(ds: xr.Dataset) -> list[Grid]:
    """The merged-token grid of each image, then each video, that the model saw.

    Example:
        >>> vision_grids(ds)
        [Grid(source='image', index=0, t=1, rows=4, cols=4)]
    """
    value = json_attr(ds, ATTR.vision_grids)
    try:
        return [
            Grid(str(g["source"]), int(g["index"]), int(g["t"]), int(g["rows"]), int(g["cols"]), _extents(g))
            for g in value
        ]
    except (TypeError, ValueError, KeyError):
        raise _malformed(ATTR.vision_grids, value, "a list of {source, index, t, rows, cols}") from None


@dataclass(frozen=True)
class RecordedFile:
    """An input file recorded in a result: an image file, or a video's frame directory and its frame names.

    ``path`` is as the sweep was given it, ``absolute`` as it resolved then, ``relative`` relative to
    the folder of the result file it was saved in (empty where not recorded); ``orientation`` is
    the EXIF Orientation that was applied to an image (1: none).
    """

    path: str
    sha256: str
    frames: tuple[str, ...] = ()
    absolute: str = ""
    relative: str = ""
    orientation: int = 1

    def candidates(self, result: str | Path | None = None) -> list[Path]:
        """Where to look for the file, in order: relative to the ``result`` file's folder, absolute, as recorded.

        Example:
            >>> f = RecordedFile("img/a.png", "0" * 64, absolute="/data/img/a.png", relative="../img/a.png")
            >>> [str(p) for p in f.candidates("/moved/runs/r.nc")]
            ['/moved/img/a.png', '/data/img/a.png', 'img/a.png']
        """
        found = [Path(os.path.normpath(Path(result).parent / self.relative))] if self.relative and result else []
        found += [Path(p) for p in (self.absolute, self.path) if p]
        return list(dict.fromkeys(found))


@dataclass(frozen=True)
class RecordedMedia:
    """The images and videos a sweep read, in prompt order, and how video frames were grouped."""

    images: tuple[RecordedFile, ...] = ()
    videos: tuple[RecordedFile, ...] = ()
    fps: float = 2.0
    frames_per_group: int = 2


def _files(ds: xr.Dataset, files: str, hashes: str, default: Any = ...) -> list[tuple[str, str]]:
    paths, sha = json_attr(ds, files, default), json_attr(ds, hashes, default)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise _malformed(files, paths, "a list of paths")
    if not isinstance(sha, list) or len(sha) != len(paths) or not all(isinstance(h, str) for h in sha):
        raise _malformed(hashes, sha, f"a list of {len(paths)} SHA-256 digests, one per entry of {files!r}")
    return list(zip(paths, sha, strict=True))


def _each(ds: xr.Dataset, name: str, count: int, kind: type, default: Any) -> list[Any]:
    """The optional JSON list attribute ``name``: one ``kind`` per file (``default`` each if it is missing)."""
    value = json_attr(ds, name, [default] * count)
    if not isinstance(value, list) or len(value) != count or not all(isinstance(v, kind) for v in value):
        raise _malformed(name, value, f"a list of {count} {kind.__name__} values, one per file")
    return value


def recorded_media(ds: xr.Dataset) -> RecordedMedia:
    """The image files and video frame directories recorded in ``ds``, with their SHA-256 and frame names.

    Results without videos recorded (written before video support) read as having none; results
    without absolute or relative paths or orientations (older ones) as having none recorded.

    Example:
        >>> media = recorded_media(ds)
        >>> [f.path.endswith("shapes.png") for f in media.images], len(media.images[0].sha256), media.videos
        ([True], 64, ())
        >>> Path(media.images[0].absolute).is_absolute(), media.images[0].orientation
        (True, 1)
    """
    images = _files(ds, ATTR.image_files, ATTR.image_sha256)
    videos = _files(ds, ATTR.video_files, ATTR.video_sha256, [])
    frames = json_attr(ds, ATTR.video_frames, [[] for _ in videos])
    if not isinstance(frames, list) or len(frames) != len(videos):
        raise _malformed(ATTR.video_frames, frames, f"a list of {len(videos)} lists of frame names")
    where = {
        name: _each(ds, name, len(listed), str, "")
        for name, listed in (
            (ATTR.image_files_absolute, images),
            (ATTR.image_files_relative, images),
            (ATTR.video_files_absolute, videos),
            (ATTR.video_files_relative, videos),
        )
    }
    turned = _each(ds, ATTR.image_orientation, len(images), int, 1)
    return RecordedMedia(
        images=tuple(
            RecordedFile(path, sha, (), absolute, relative, orientation)
            for (path, sha), absolute, relative, orientation in zip(
                images, where[ATTR.image_files_absolute], where[ATTR.image_files_relative], turned, strict=True
            )
        ),
        videos=tuple(
            RecordedFile(p, h, tuple(map(str, f)), absolute, relative)
            for (p, h), f, absolute, relative in zip(
                videos, frames, where[ATTR.video_files_absolute], where[ATTR.video_files_relative], strict=True
            )
        ),
        fps=float(ds.attrs.get(ATTR.video_fps, 2.0)),
        frames_per_group=int(ds.attrs.get(ATTR.video_frames_per_group, 2)),
    )


def result_file(ds: xr.Dataset) -> str | None:
    """The file ``ds`` was opened from (xarray's ``encoding["source"]``), or None for a Dataset made in memory.

    Example:
        >>> result_file(ds) is None
        True
    """
    source = ds.encoding.get("source")
    return str(source) if source else None


def relative_paths(ds: xr.Dataset, path: str | Path) -> dict[str, str]:
    """The attributes recording ``ds``'s images and videos relative to the folder of the result file ``path``.

    :func:`~vlmask.results.io.save_results` records them, so a saved result finds its inputs when
    both are moved together, opened from any working folder. Empty for a Dataset that records no files.

    Example:
        >>> relative_paths(ds, Path("examples/runs/r.nc").absolute())
        {'image_files_relative': '["../shapes.png"]', 'video_files_relative': '[]'}
    """
    if ATTR.image_files not in ds.attrs:
        return {}
    media, source = recorded_media(ds), result_file(ds)
    folder = Path(path).absolute().parent

    def relative(f: RecordedFile) -> str:
        here = next((p for p in f.candidates(source) if p.exists()), Path(f.absolute or f.path))
        try:
            return os.path.relpath(os.path.abspath(here), folder)
        except ValueError:  # another drive (Windows): no relative path
            return ""

    return {
        ATTR.image_files_relative: json.dumps([relative(f) for f in media.images]),
        ATTR.video_files_relative: json.dumps([relative(v) for v in media.videos]),
    }


def check_result(ds: xr.Dataset, *variables: str) -> None:
    """Refuse a Dataset that is not a vlmask result, or lacks one of ``variables``, saying which.

    A result is known by its ``schema_version`` attribute or, failing that, by any of the metric variables.

    Example:
        >>> check_result(xr.Dataset({"t": ("x", [1.0])}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: this is not a vlmask result: it has none of its variables (residual, heads, kl, ...) ...
        >>> check_result(ds[["kl"]].assign_attrs(ds.attrs), "logprob_drop")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: this is not a complete vlmask result: it has no 'logprob_drop' variable (it has: kl)
    """
    shown = ", ".join(map(str, list(ds.data_vars)[:8])) or "none"
    if ATTR.schema_version not in ds.attrs and not set(METRIC_VARIABLES) & set(ds.data_vars):
        raise VlmaskError(
            f"this is not a vlmask result: it has none of its variables ({', '.join(METRIC_VARIABLES[:3])}, ...)"
            f" nor a {ATTR.schema_version!r} attribute (variables: {shown})"
        )
    for name in variables:
        if name not in ds.data_vars:
            raise VlmaskError(f"this is not a complete vlmask result: it has no {name!r} variable (it has: {shown})")


def knockout_dims(ds: xr.Dataset) -> tuple[str, ...]:
    """The dims of ``ds`` that count knockouts: ``token`` or ``intervention``, and ``window`` if windowed.

    Example:
        >>> knockout_dims(ds)
        ('token',)
    """
    return tuple(d for d in KNOCKOUT_DIMS if d in ds.dims)


def interventions_of(ds: xr.Dataset) -> tuple[Any, xr.DataArray]:
    """What a sweep applied: its ``base`` (None if none) and each knockout, labeled like the results.

    The knockouts come as an object DataArray over ``token`` or ``intervention`` (and
    ``window``), holding intervention values rebuilt from the result's attributes.

    Example:
        >>> base, knockouts = interventions_of(ds)
        >>> base, knockouts.sel(token=1).item()
        (None, BlockKeys(positions=(1,), layers=None))
    """
    base_dict = json_attr(ds, ATTR.base, None)
    listed = json_attr(ds, ATTR.interventions)
    if not isinstance(listed, list) or not all(isinstance(d, dict) for d in listed):
        raise _malformed(ATTR.interventions, listed, "a list of intervention dicts")
    if not (base_dict is None or isinstance(base_dict, dict)):
        raise _malformed(ATTR.base, base_dict, "an intervention dict or null")
    try:
        base = None if base_dict is None else from_dict(base_dict)
        values = [from_dict(d) for d in listed]
    except (TypeError, ValueError, KeyError) as err:
        raise VlmaskError(
            f"this is not a vlmask result: an intervention it records cannot be rebuilt ({err})"
        ) from None
    dims = knockout_dims(ds)
    shape = tuple(ds.sizes[d] for d in dims)
    if int(np.prod(shape)) != len(values):
        sizes = dict(zip(dims, shape, strict=True))
        raise VlmaskError(f"this result records {len(values)} interventions, but its knockout dims are {sizes}")
    table = np.empty(len(values), dtype=object)
    table[:] = values
    return base, xr.DataArray(table.reshape(shape), dims=dims, coords={d: ds[d].values for d in dims})
