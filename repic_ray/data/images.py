"""Image loading that fails with one clear error type.

Every image the trainer, the rollout engine or the server opens goes through
`load_image`, so a truncated, corrupt or missing file surfaces as an `ImageError`
naming the file instead of whatever PIL raises deep inside a decoder (OSError,
SyntaxError, struct.error, DecompressionBombError, ...).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

from PIL import Image

# PIL decodes lazily: `Image.open` reads only the header; `.load()` decodes the pixels,
# which is where truncated or corrupt data fails. Each of these has been seen in the wild.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class ImageError(ValueError):
    """An image file that cannot be read; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read image: {reason}")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB.

    Raises:
        ImageError: the file is missing, is not an image, or its data is corrupt.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageError(path, "no such file" if not p.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* means an absurdly large image; treat as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                return img.convert("RGB")
    except Image.DecompressionBombWarning as exc:
        raise ImageError(path, f"image too large ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(path, f"{type(exc).__name__}: {exc}") from exc


def image_from_bytes(data: bytes, *, name: str = "<bytes>") -> Image.Image:
    """Decode an in-memory image (e.g. an upload) as RGB; `name` appears in the error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return img.convert("RGB")
    except Image.DecompressionBombWarning as exc:
        raise ImageError(name, f"image too large ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(name, f"{type(exc).__name__}: {exc}") from exc
