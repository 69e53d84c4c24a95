"""Images read from disk: RGB pixels as displayed (EXIF orientation applied, frame 0) and the file's SHA-256.

Every view of an image (the model's input, the heatmap PNG, the report) reads it through
:func:`open_image`, so all of them see the same pixels: a phone photo stored sideways with an
EXIF ``Orientation`` tag is turned upright first, an animated GIF gives its first frame.
Images over :data:`MAX_PIXELS` are refused before their pixels are decoded.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmask.errors import VlmaskError

MAX_PIXELS = 89_478_485
"""The most pixels vlmask decodes (PIL's decompression-bomb limit, about 9459 x 9459): a 48 KB PNG can claim 400 MP."""
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 is upright; 2-8 are mirrored and/or rotated


@dataclass(frozen=True)
class ImageFile:
    """An image read from disk, with what identifies it and how it was turned to be shown upright.

    ``orientation`` is the EXIF Orientation value that was applied (1: none); ``frames`` the
    number of frames in the file (more than 1 for an animation, of which frame 0 is used).
    """

    path: str
    sha256: str
    image: Image.Image
    orientation: int = 1
    frames: int = 1


def processor_pixel_cap(processor: object) -> int | None:
    """The most pixels ``processor`` hands the model per image (its ``max_pixels``), or None if it has no cap.

    Example:
        >>> from vlmask.builtin import make_processor
        >>> processor_pixel_cap(make_processor(["test"]))
        262144
    """
    images = getattr(processor, "image_processor", None)
    size = getattr(images, "size", None) or {}
    cap = getattr(images, "max_pixels", None) or (size.get("longest_edge") if hasattr(size, "get") else None)
    return int(cap) if cap else None


def _too_large(path: Path, err: Exception, cap: int | None) -> VlmaskError:
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else f"over {MAX_PIXELS:,} pixels"
    model = (
        f"this model's processor shrinks every image to at most {cap:,} pixels"
        if cap
        else ("the model's processor shrinks every image to its max_pixels anyway")
    )
    return VlmaskError(
        f"image file '{path}' is too large: {size}, over the {MAX_PIXELS:,} pixels vlmask decodes (PIL's"
        f" decompression-bomb limit); {model}: downscale it first (e.g. to 4096 pixels on the longest side)"
    )


def open_image(path: str | Path, pixel_cap: int | None = None) -> tuple[Image.Image, int, int]:
    """The image at ``path`` as shown: RGB, EXIF orientation applied, frame 0; with its orientation and frame count.

    ``pixel_cap`` (the processor's, if known) is only quoted in the message refusing a huge image.

    Example:
        >>> picture, orientation, frames = open_image("examples/shapes.png")
        >>> picture.mode, orientation, frames
        ('RGB', 1, 1)
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                frames = int(getattr(handle, "n_frames", 1))
                handle.seek(0)
                orientation = int(handle.getexif().get(ORIENTATION_TAG, 1))
                upright = ImageOps.exif_transpose(handle)
                return upright.convert("RGB"), orientation if 1 <= orientation <= 8 else 1, frames
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_large(path, err, pixel_cap) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise VlmaskError(f"'{path}' is not an image PIL can read ({type(err).__name__}): pass a PNG or JPEG") from None


def read_image(path: str | Path, pixel_cap: int | None = None) -> ImageFile:
    """Open an image file as it is displayed (see :func:`open_image`) and hash its bytes.

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
    image, orientation, frames = open_image(path, pixel_cap)
    return ImageFile(str(path), hashlib.sha256(data).hexdigest(), image, orientation, frames)
