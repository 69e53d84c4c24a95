"""Finding a result's input files again: beside the result, at their absolute path, or as recorded.

The SHA-256 recorded at sweep time decides: a file is used only if its contents still match,
so a moved result finds its images, and an edited image is never drawn under old numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import xarray as xr

from vlmask.inputs.video import video_hash
from vlmask.results.schema import RecordedFile, result_file


def file_hash(path: Path) -> str | None:
    """SHA-256 of the file at ``path``, or None if it is not a readable file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    except OSError:
        return None


def dir_hash(path: Path) -> str | None:
    """The video hash of frame directory ``path``, or None if it is not a readable one."""
    try:
        return video_hash(path) if path.is_dir() else None
    except Exception:  # an unreadable or empty directory is a file not found, never a crash
        return None


def locate(ds: xr.Dataset, f: RecordedFile, what: str) -> tuple[Path | None, str]:
    """Where recorded file ``f`` of ``ds`` is now, with the recorded SHA-256; else None and why, in one sentence.

    ``what`` names it in the sentence (``image file``, ``video directory``). The candidates are
    tried in order: relative to the file ``ds`` was opened from, absolute, as recorded.

    Example:
        >>> from vlmask.results.schema import recorded_media
        >>> path, why = locate(ds, recorded_media(ds).images[0], "image file")
        >>> path.name, why
        ('shapes.png', '')
    """
    hash_of: Callable[[Path], str | None] = dir_hash if what.startswith("video") else file_hash
    changed = None
    for candidate in f.candidates(result_file(ds)):
        actual = hash_of(candidate)
        if actual == f.sha256:
            return candidate, ""
        if actual is not None and changed is None:
            changed = (candidate, actual)
    if changed is not None:
        where, actual = changed
        return None, (
            f"{what} '{where}' has changed since the sweep (SHA-256 {actual[:12]}..., recorded {f.sha256[:12]}...)"
        )
    tried = ", ".join(f"'{p}'" for p in f.candidates(result_file(ds)))
    return None, f"{what} '{f.path}' recorded in the result does not exist or is not readable here (looked at {tried})"
