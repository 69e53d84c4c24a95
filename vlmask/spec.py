"""One sweep's options, declared once: the value that the CLI, the YAML batch and :func:`vlmask.sweep` all build.

Each option is one field of :class:`SweepSpec`, with its default, its type, its allowed
values and a one-line help in ``field(metadata=...)``; the ``vlmask run`` flags and the
batch item keys are generated from these fields. A spec checks everything it can alone
(types, ranges, choices, options that exclude each other); what needs the model or the
prompt (a position or a layer in range) is checked where those are known. Messages are
neutral: the CLI adds the flag, the batch the item and its line.

``progress`` is not an option: it changes no number, so it stays an argument of
:func:`vlmask.sweep` and is no part of a spec's dict (nor of a batch item's hash).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interventions._common import ints, one_int
from vlmask.errors import VlmaskError
from vlmask.inputs.media import read_image
from vlmask.inputs.prompt import CHAT_TEMPLATE_MODES
from vlmask.inputs.selection import check_indices
from vlmask.inputs.units import UNITS, parse_unit
from vlmask.inputs.video import check_fps, read_video

if TYPE_CHECKING:  # torch is imported by the first intervention used, not by the CLI's option parsing
    from interventions import Intervention

VISION_ATTENTION = ("native", "bidirectional")
VISION_REMOVAL = ("keys", "full")  # full: also no DeepStack features added at blocked vision positions
MASK_WORDS = ("text", "prompt", "vision", "all")
SIZES = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20}
SIZES |= {"g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes in ``text`` such as ``2GiB``, ``512MB`` or ``1e9``.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    try:
        if match and unit in SIZES:
            return int(float(match.group(1)) * SIZES[unit])
    except ValueError:
        pass
    raise VlmaskError(f"memory size {text!r} is not understood: write e.g. 2GiB, 512MB or 1e9 (bytes)")


@dataclass(frozen=True)
class Windows:
    """Windows of ``k`` consecutive layers centred on each layer (or on ``centres``), clipped at the ends.

    The window centred on layer ``c`` holds layers ``c - k // 2 .. c + k // 2`` that exist:
    near the first and last layers it is shorter. Attention-knockout studies of
    information flow use ``k = 9``.

    Example:
        >>> Windows(k=3).resolve(num_layers=4)
        [(0, 1), (0, 1, 2), (1, 2, 3), (2, 3)]
    """

    k: int = 9
    centres: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        k = one_int(self.k, "window size k")
        if k < 1 or k % 2 == 0:
            raise VlmaskError(
                f"window size k must be a positive odd number (a centre layer and k // 2 each side), got {k}"
            )
        object.__setattr__(self, "k", k)
        if self.centres is not None:
            object.__setattr__(self, "centres", ints(self.centres, "window centres"))

    def centre_layers(self, num_layers: int) -> list[int]:
        """The centre of each window, checked against the model's layers."""
        centres = list(range(num_layers)) if self.centres is None else list(self.centres)
        for c in centres:
            if c >= num_layers:
                raise VlmaskError(
                    f"window centre {c} is out of range: the model has {num_layers} decoder layers (0-{num_layers - 1})"
                )
        return centres

    def resolve(self, num_layers: int) -> list[tuple[int, ...]]:
        """The layers of each window, in centre order."""
        half = self.k // 2
        return [tuple(range(max(0, c - half), min(num_layers, c + half + 1))) for c in self.centre_layers(num_layers)]

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "centres": None if self.centres is None else list(self.centres)}


def windows(k: int = 9, centres: Sequence[int] | None = None) -> Windows:
    """Sliding layer windows for ``sweep(..., layers=windows(k))``: a window of ``k`` layers per centre layer.

    Example:
        >>> import vlmask
        >>> vlmask.windows(k=3).resolve(num_layers=3)
        [(0, 1), (0, 1, 2), (1, 2)]
    """
    return Windows(k, None if centres is None else tuple(centres))


# --- the checks: each takes (option name, value) and returns the value as the spec holds it ---------------------


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise VlmaskError(f"{name} must be text, got {value!r}")
    if not value.strip():
        raise VlmaskError(f"the {name} is empty: give it some text")
    if "\0" in value:
        raise VlmaskError(
            f"the {name} holds a NUL character (at {value.index(chr(0))}): the result file could not record it;"
            " remove it"
        )
    return value


def _text_or_none(name: str, value: Any) -> str | None:
    return None if value is None else _text(name, value)


def _paths(name: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in values):
        raise VlmaskError(f"{name} must be a path or a list of paths, got {value!r}")
    return tuple(str(p) for p in values)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise VlmaskError(f"{name} must be a whole number, got {value!r}")
    if value < 1:
        raise VlmaskError(f"{name} must be at least 1, got {value}")
    return value


def _count_or_none(name: str, value: Any) -> int | None:
    return None if value is None else _count(name, value)


def _audit(name: str, value: Any) -> int | None:
    if value is None or (value == 0 and not isinstance(value, bool)):
        return value
    return _count(name, value)


def _fps(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VlmaskError(f"{name} must be a number of frames per second, got {value!r}")
    if not math.isfinite(value):
        raise VlmaskError(f"video fps must be a finite number of frames per second, got {value}")
    check_fps(value)
    return float(value)


def _mask(name: str, value: Any) -> str | tuple[int, ...] | None:
    if value is None or (isinstance(value, str) and value.strip() in MASK_WORDS):
        return value
    if isinstance(value, str):
        try:
            check_indices(value, "mask position")
        except VlmaskError as err:
            raise VlmaskError(
                f"mask {value!r} is not understood ({err}): use {', '.join(MASK_WORDS)} or positions"
            ) from None
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    positions = ints(value, "mask positions")
    if not positions:
        raise VlmaskError(
            "mask positions are an empty list: name at least one position, or use text, prompt, vision, all"
        )
    return positions


def _unit(name: str, value: Any) -> str:
    parse_unit(value)
    return str(value).strip()


def _intervention(value: Any) -> Any:
    from interventions import Intervention, from_dict

    if isinstance(value, Mapping):
        return from_dict(dict(value))
    if not isinstance(value, Intervention):
        raise VlmaskError(
            f"{value!r} is not an intervention: pass BlockKeys, BlockEdges, AblateHeads, ... (subclasses of"
            " interventions.Intervention) or their dicts"
        )
    return value


def _over(name: str, value: Any) -> tuple[Any, ...] | None:
    if value is None:
        return None
    from interventions import Intervention

    values = [value] if isinstance(value, (Mapping, Intervention)) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise VlmaskError(f"over must be a non-empty list of interventions to knock out one by one, got {value!r}")
    return tuple(_intervention(v) for v in values)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VlmaskError(f'{text!r} is not JSON ({err.msg}): write e.g. \'{{"type": "AblateHeads", ...}}\'') from None


def _base(name: str, value: Any) -> Any:
    if isinstance(value, str):
        value = _json(value)
    return None if value is None else _intervention(value)


def _layers(name: str, value: Any) -> str | tuple[int, ...] | Windows | None:
    if value is None or isinstance(value, Windows):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"k", "centres"}
        if unknown:
            raise VlmaskError(f"layer windows take k and centres, got {sorted(unknown)}")
        return Windows(value.get("k", 9), value.get("centres"))
    if isinstance(value, str):
        check_indices(value, "layer")
        return value.strip()
    return ints([value] if isinstance(value, int) else value, "layers")


def _choice(name: str, value: Any) -> str:
    choices = {
        "chat_template": CHAT_TEMPLATE_MODES,
        "vision_attention": VISION_ATTENTION,
        "vision_removal": VISION_REMOVAL,
    }[name]
    if value not in choices:
        raise VlmaskError(f"{name.replace('_', ' ')} {value!r} is not known: expected one of {', '.join(choices)}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise VlmaskError(f"{name} must be true or false, got {value!r}")
    return value


def _size(name: str, value: Any) -> int:
    if isinstance(value, str):
        return parse_size(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise VlmaskError(f"{name} must be a number of bytes or text like 2GiB, got {value!r}")
    return int(value)


def about(help: str, check: Callable[[str, Any], Any], **more: Any) -> dict[str, Any]:
    """A :class:`SweepSpec` field's metadata: ``help`` (one line), ``check``, and for the CLI and YAML:

    ``choices`` (argparse's), ``one`` (the singular YAML key and repeated flag, as ``image``
    for ``images``) and ``cli=False`` for an option the command line does not take. A flag's
    text is read as the first type of the field's annotation (``int | None``: an int).
    """
    return {"help": help, "check": check, "cli": True, **more}


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep is asked to do, checked when made; JSON-ready with :meth:`to_dict` / :meth:`from_dict`.

    Example:
        >>> spec = SweepSpec("what color is the circle ?", images=["examples/shapes.png"], mask="vision")
        >>> spec.images, spec.max_memory
        (('examples/shapes.png',), 2147483648)
        >>> SweepSpec.from_dict(spec.to_dict()) == spec
        True
        >>> SweepSpec("hi", num_tokens=0)
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: num_tokens must be at least 1, got 0
    """

    prompt: str = field(metadata=about("the question or text", _text))
    images: tuple[str, ...] = field(default=(), metadata=about("an image file", _paths, one="image"))
    videos: tuple[str, ...] = field(
        default=(), metadata=about("a directory of frame images (sorted by name)", _paths, one="video")
    )
    video_fps: float = field(default=2.0, metadata=about("frames per second the video frames were sampled at", _fps))
    num_tokens: int = field(default=1, metadata=about("greedy clean continuation length = steps", _count))
    answer: str | None = field(
        default=None,
        metadata=about(
            "text the clean continuation starts with: its tokens are measured (and fed) instead of the greedy"
            " ones for the steps they cover, greedy after them",
            _text_or_none,
        ),
    )
    mask: str | tuple[int, ...] | None = field(
        default=None,
        metadata=about(
            "text (default: every text token, the template's too), prompt (your words only), vision, all,"
            " or positions like 18:24,30",
            _mask,
        ),
    )
    mask_unit: str = field(
        default="token", metadata=about(f"group vision tokens knocked out together: {', '.join(UNITS)}", _unit)
    )
    over: tuple[Intervention, ...] | None = field(
        default=None, metadata=about("interventions knocked out one by one, instead of tokens", _over, cli=False)
    )
    base: Intervention | None = field(
        default=None,
        metadata=about("an intervention applied to the clean run and every knockout (JSON on the command line)", _base),
    )
    layers: str | tuple[int, ...] | Windows | None = field(
        default=None, metadata=about("decoder layers where knockouts act, like 0:4,7 (default: all)", _layers)
    )
    chat_template: str = field(
        default="auto", metadata=about("use the processor's chat template", _choice, choices=CHAT_TEMPLATE_MODES)
    )
    vision_attention: str = field(
        default="native",
        metadata=about(
            "native (causal over image tokens, as Qwen-VL decoders are) or bidirectional (NOT native; prototype's)",
            _choice,
            choices=VISION_ATTENTION,
        ),
    )
    vision_removal: str = field(
        default="keys",
        metadata=about(
            "keys (blocked vision keys are not read) or full (Qwen3-VL: nor are DeepStack features added there)",
            _choice,
            choices=VISION_REMOVAL,
        ),
    )
    batch_size: int | None = field(
        default=None,
        metadata=about("at most this many knockouts per packed pass (default: as memory allows)", _count_or_none),
    )
    max_memory: str | int = field(
        default="2GiB", metadata=about("memory budget of one packed pass of knockouts", _size)
    )
    attention: bool = field(
        default=True,
        metadata=about("also read the clean attention at each step, per layer and head, beside the knockouts", _flag),
    )
    triage: int | None = field(
        default=None,
        metadata=about(
            "estimate every knockout from a backward pass, then run exactly only the top K and a random audit",
            _count_or_none,
        ),
    )
    triage_audit: int | None = field(
        default=None,
        metadata=about(
            "knockouts audited exactly at random beside the top K (default: max(8, 1 percent of the rest))", _audit
        ),
    )
    triage_check: bool = field(
        default=False,
        metadata=about("with triage, also run every knockout exactly and record how well the estimate ranked", _flag),
    )

    def __post_init__(self) -> None:
        checked, problems = _checked({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:
            raise VlmaskError(problems[0][1])
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def problems(cls, values: Mapping[str, Any], *, read_files: bool = False) -> list[tuple[str, str]]:
        """Every problem of these option values, as ``(option, message)``, without raising.

        The CLI and the batch use it to name the flag, or the line, of each problem;
        ``read_files`` also opens each image and video.

        Example:
            >>> SweepSpec.problems({"prompt": "hi", "num_tokens": 0, "mask_unit": "patch"})[1]
            ('mask_unit', "mask unit 'patch' is not known: expected token, row, column, region:K, image")
        """
        unknown = [(k, _unknown(k)) for k in values if k not in _NAMES]
        checked, problems = _checked({k: v for k, v in values.items() if k in _NAMES})
        if read_files:
            problems += _file_problems(checked)
        return unknown + problems

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (interventions and windows as their dicts), every key always present.

        Example:
            >>> SweepSpec("hi", layers=[1, 0]).layers
            (0, 1)
            >>> SweepSpec("hi", layers=[1, 0]).to_dict()["layers"]
            [0, 1]
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
            elif hasattr(value, "to_dict"):
                out[name] = value.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepSpec:
        """The spec of :meth:`to_dict`'s output (or of any mapping of options); unknown keys are refused.

        Example:
            >>> SweepSpec.from_dict({"prompt": "hi", "colour": "red"})
            Traceback (most recent call last):
            ...
            vlmask.VlmaskError: unknown sweep option 'colour': expected some of prompt, images, videos, ...
        """
        for key in values:
            if key not in _NAMES:
                raise VlmaskError(_unknown(key))
        if "prompt" not in values:
            raise VlmaskError("the prompt is missing: a sweep needs one")
        return cls(**values)


_NAMES = tuple(f.name for f in dataclasses.fields(SweepSpec))


def _unknown(key: str) -> str:
    return f"unknown sweep option {key!r}: expected some of {', '.join(_NAMES)}"


def _checked(values: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Each option's checked value, and each problem as ``(option, message)``: alone, then together."""
    checked, problems = {}, []
    for f in dataclasses.fields(SweepSpec):
        if f.name not in values:
            if f.default is dataclasses.MISSING:
                problems.append((f.name, f"the {f.name} is missing: a sweep needs one"))
                continue
            values = {**values, f.name: f.default}
        try:
            checked[f.name] = f.metadata["check"](f.name, values[f.name])
        except VlmaskError as err:
            problems.append((f.name, str(err)))
    if problems:
        return checked, problems
    if checked["mask"] == "vision" and not checked["images"] + checked["videos"]:
        problems.append(("mask", "mask vision needs an image or a video, but none was given"))
    if checked["triage"] is None and (checked["triage_audit"] is not None or checked["triage_check"]):
        problems.append(("triage", "triage_audit and triage_check apply to a triage sweep: give triage (a count) too"))
    if checked["over"] is not None and (checked["mask"] is not None or checked["mask_unit"] != "token"):
        problems.append(
            ("over", "pass either mask/mask_unit (a sweep over tokens) or over (a list of interventions), not both")
        )
    return checked, problems


def _file_problems(checked: dict[str, Any]) -> list[tuple[str, str]]:
    """A problem for each image, and each video directory (its frames), that cannot be read as the sweep reads it."""
    problems = []
    for name, read in (("images", read_image), ("videos", read_video)):
        for path in checked.get(name, ()):
            try:
                read(path)
            except VlmaskError as err:
                problems.append((name, str(err)))
    return problems
