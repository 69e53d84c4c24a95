"""Images read from disk: RGB pixels and the SHA-256 of the file that identifies them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmask.errors import VlmaskError


@dataclass(frozen=True)
class ImageFile:
    """An image read from disk, with what identifies it."""

    path: str
    sha256: str
    image: Image.Image


def read_image(path: str | Path) -> ImageFile:
    """Open an image file as RGB and hash its bytes.

    Example:
        >>> read_image("missing.png")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: image file 'missing.png' does not exist
    """
    path = Path(path)
    if not path.exists():
        raise VlmaskError(f"image file '{path}' does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise VlmaskError(f"image file '{path}' cannot be read: {err.strerror}") from None
    try:
        with Image.open(path) as handle:
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise VlmaskError(f"'{path}' is not an image PIL can read ({type(err).__name__}): pass a PNG or JPEG") from None
    return ImageFile(path=str(path), sha256=hashlib.sha256(data).hexdigest(), image=image)
