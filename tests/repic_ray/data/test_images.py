"""Tests for repic_ray/data/images.py: images load as RGB; anything unreadable is an ImageError."""

import io

import pytest
from PIL import Image

from repic_ray.data.images import ImageError, image_from_bytes, load_image


def _png_bytes(mode: str = "RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (10, 6), (10, 200, 30, 255) if mode == "RGBA" else 3).save(buf, "PNG")
    return buf.getvalue()


def _noise_png() -> bytes:
    # Noise does not compress, so the pixel data spans many bytes and can be cut mid-stream.
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3))).save(
        buf, "PNG"
    )
    return buf.getvalue()


def test_load_image_converts_to_rgb(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(_png_bytes("RGBA"))
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (10, 6)
    assert img.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize(
    "content",
    [
        b"not an image at all",
        _png_bytes()[:40],  # header survives, pixel data truncated
        _noise_png()[: len(_noise_png()) // 2],  # cut in the middle of the pixel data
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # signature then garbage
    ],
    ids=["text", "truncated-data", "cut-mid-data", "garbage-after-signature"],
)
def test_corrupt_image_raises_image_error_naming_file(tmp_path, content):
    p = tmp_path / "broken.png"
    p.write_bytes(content)
    with pytest.raises(ImageError) as exc:
        load_image(p)
    assert str(p) in str(exc.value)
    assert exc.value.path == str(p)


def test_missing_and_directory_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_image_from_bytes(tmp_path):
    assert image_from_bytes(_png_bytes()).mode == "RGB"
    with pytest.raises(ImageError, match="upload.png"):
        image_from_bytes(b"\xff\xd8\xff\xe0 broken jpeg", name="upload.png")
