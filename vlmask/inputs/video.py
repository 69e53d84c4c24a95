"""Videos given as a directory of frame images, sorted by file name."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlmask.errors import VlmaskError
from vlmask.inputs.media import read_image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class VideoFile:
    """A video read from a frame directory: its frames (RGB), their file names, and one hash over them all."""

    path: str
    sha256: str
    frame_names: tuple[str, ...]
    frames: tuple[Image.Image, ...]


def frame_paths(path: str | Path) -> list[Path]:
    """The frame images of directory ``path``, sorted by name (hidden files skipped).

    Example:
        >>> frame_paths("missing")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: video 'missing' does not exist: pass a directory of frame images
    """
    path = Path(path)
    if not path.exists():
        raise VlmaskError(f"video '{path}' does not exist: pass a directory of frame images")
    if not path.is_dir():
        raise VlmaskError(f"video '{path}' is a file: pass a directory of frame images ({', '.join(FRAME_SUFFIXES)})")
    frames = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES
    )
    if not frames:
        raise VlmaskError(f"video directory '{path}' has no frame images ({', '.join(FRAME_SUFFIXES)})")
    return frames


def video_hash(path: str | Path) -> str:
    """SHA-256 over the frames' names and bytes, in order: changes if any frame is added, removed or edited."""
    digest = hashlib.sha256()
    for frame in frame_paths(path):
        digest.update(frame.name.encode() + b"\0" + hashlib.sha256(frame.read_bytes()).digest())
    return digest.hexdigest()


def read_video(path: str | Path) -> VideoFile:
    """Read every frame image of directory ``path`` as RGB; all frames must share one size.

    Example:
        >>> for i in range(4):
        ...     Image.new("RGB", (64, 48), (60 * i, 0, 0)).save(tmp / f"{i:04d}.png")
        >>> video = read_video(tmp)
        >>> len(video.frames), video.frame_names[:2], video.frames[0].size
        (4, ('0000.png', '0001.png'), (64, 48))
    """
    paths = frame_paths(path)
    frames = [read_image(p).image for p in paths]
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        first = frames[0].size
        odd = next(i for i, f in enumerate(frames) if f.size != first)
        raise VlmaskError(
            f"video frames must share one size: '{paths[0].name}' is {first[0]}x{first[1]}, "
            f"'{paths[odd].name}' is {frames[odd].size[0]}x{frames[odd].size[1]}"
        )
    return VideoFile(str(path), video_hash(path), tuple(p.name for p in paths), tuple(frames))


def check_fps(fps: float) -> float:
    """``fps`` if it is a positive number of frames per second, else an error.

    Example:
        >>> check_fps(2)
        2
    """
    if not fps > 0:
        raise VlmaskError(f"video fps must be a positive number of frames per second, got {fps}")
    return fps


def video_kwargs(videos: Sequence[VideoFile], fps: float) -> dict[str, Any]:
    """Processor arguments for ``videos``: every frame kept, frame ``i`` taken at ``i / fps`` seconds.

    Example:
        >>> video_kwargs([], fps=0)
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: video fps must be a positive number of frames per second, got 0
    """
    from transformers.video_utils import VideoMetadata

    check_fps(fps)
    metadata = [
        VideoMetadata(total_num_frames=len(v.frames), fps=float(fps), frames_indices=list(range(len(v.frames))))
        for v in videos
    ]
    return {"videos": [list(v.frames) for v in videos], "video_metadata": metadata, "do_sample_frames": False}
