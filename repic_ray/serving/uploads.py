"""Limits on what users may upload, checked before anything is stored or decoded.

Each failed check raises `UploadError` with the HTTP status the API answers with:
413 too many bytes or pixels, 415 a format outside the allowed list, 400 bytes
that do not decode, 422 a malformed name or too many concepts.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, field

from PIL import Image
from starlette.exceptions import HTTPException

from repic_ray.data.images import ImageError, image_from_bytes


@dataclass
class LimitsConfig:
    """Per-request and per-user limits of the captioning API."""

    max_upload_bytes: int = 8 * 1024 * 1024
    """Largest accepted image file, in bytes."""
    max_pixels: int = 4096 * 4096
    """Largest accepted image, in pixels (width x height), checked from the header
    before decoding."""
    formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])
    """Accepted image formats (PIL names)."""
    max_concepts_per_user: int = 200
    """How many concepts one user may store."""
    max_images_per_concept: int = 5
    """Reference images per concept."""
    max_concepts_per_caption: int = 4
    """Concepts named in (or retrieved for) one caption request."""
    max_request_bytes: int | None = None
    """Largest request body, counted while it streams in (413 as soon as it is
    exceeded, or at once from Content-Length). None: max_images_per_concept x
    max_upload_bytes plus 1 MiB for the form fields and multipart framing."""
    name_pattern: str = r"[A-Za-z][A-Za-z0-9_-]{0,31}"
    """Syntax of a concept name (full match)."""
    max_info_chars: int = 500
    """Length of a concept's short description."""
    max_category_chars: int = 64
    """Length of a concept's category."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_concepts_per_user",
                     "max_images_per_concept", "max_concepts_per_caption"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise ValueError(f"limits.max_request_bytes: must be >= 1, got {self.max_request_bytes}")
        if not self.formats:
            raise ValueError("limits.formats: must list at least one format")
        try:
            re.compile(self.name_pattern)
        except re.error as exc:
            raise ValueError(f"limits.name_pattern: not a regular expression: {exc}") from None


    def request_bytes(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return self.max_images_per_concept * self.max_upload_bytes + (1 << 20)


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413 before it is
    buffered. A declared Content-Length over the limit is refused without reading a
    byte; a body without one (chunked) is counted as it arrives and cut off at the
    first chunk past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_413(send, f"request body of {int(declared)} bytes exceeds the "
                                         f"limit of {self.max_bytes} bytes")
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds the limit of "
                                             f"{self.max_bytes} bytes")
            return message

        return await self.app(scope, counting_receive, send)


async def _send_413(send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class UploadError(ValueError):
    """A request refused by a limit; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def check_name(name: str, limits: LimitsConfig) -> str:
    if not re.fullmatch(limits.name_pattern, name or ""):
        raise UploadError(
            422, f"concept name {name!r} must match {limits.name_pattern} "
                 "(a letter, then up to 31 letters, digits, '_' or '-')")
    return name


def check_text(field_name: str, value: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise UploadError(422, f"{field_name}: at most {max_chars} characters, got {len(value)}")
    return value


def check_image(data: bytes, filename: str, limits: LimitsConfig) -> Image.Image:
    """Validate an uploaded image and return it decoded (RGB).

    The header is read first, so the format and pixel count are refused without
    decoding a possibly huge or hostile payload."""
    label = filename or "upload"
    if len(data) > limits.max_upload_bytes:
        raise UploadError(413, f"{label}: {len(data)} bytes exceeds the limit of "
                               f"{limits.max_upload_bytes} bytes")
    if not data:
        raise UploadError(400, f"{label}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:
        # PIL refuses to even open an image over twice Image.MAX_IMAGE_PIXELS.
        raise UploadError(413, f"{label}: too many pixels ({exc}); the limit is "
                               f"{limits.max_pixels}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(400, f"{label}: not a readable image ({type(exc).__name__})") from None
    if fmt not in limits.formats:
        raise UploadError(415, f"{label}: format {fmt} is not accepted "
                               f"(accepted: {', '.join(limits.formats)})")
    if w * h > limits.max_pixels:
        raise UploadError(413, f"{label}: {w}x{h} = {w * h} pixels exceeds the limit of "
                               f"{limits.max_pixels}")
    try:
        return image_from_bytes(data, name=label)
    except ImageError as exc:
        raise UploadError(400, f"{label}: corrupt image ({exc.reason})") from None
