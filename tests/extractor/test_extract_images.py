"""Every kind of awkward input is either decoded to RGB uint8 or rejected with a clear reason."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from extractor.images import ImageRejected, decode_image

from extract_helpers import make_image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_zero_byte():
    with pytest.raises(ImageRejected, match="empty file"):
        decode_image(b"")


def test_truncated_jpeg():
    data = _encode(make_image(64, 48), "JPEG")
    with pytest.raises(ImageRejected, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_not_an_image():
    with pytest.raises(ImageRejected, match="not an image"):
        decode_image(b"<html>404 not found</html>")


def test_cmyk_jpeg_becomes_rgb():
    decoded = decode_image(_encode(make_image(40, 30, mode="CMYK"), "JPEG"))
    assert decoded.pixels.shape == (30, 40, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.original_mode == "CMYK"


def test_grayscale():
    decoded = decode_image(_encode(Image.new("L", (20, 10), 77), "PNG"))
    assert decoded.pixels.shape == (10, 20, 3) and (decoded.pixels == 77).all()


def test_16_bit_png_is_scaled_not_clipped():
    values = np.full((8, 8), 32768, dtype=np.uint16)
    decoded = decode_image(_encode(Image.fromarray(values), "PNG"))
    assert decoded.pixels.shape == (8, 8, 3)
    assert (decoded.pixels == 128).all()  # 32768 / 65535 * 255 = 127.5 -> 128, not 255


def test_a_floating_point_tiff_in_0_1_is_scaled_by_255_and_nan_pixels_are_refused():
    values = np.full((8, 8), 0.5, dtype=np.float32)  # mode F, in [0, 1]: it was divided by 255 (black)
    decoded = decode_image(_encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert decoded.original_mode == "F" and (decoded.pixels == 128).all()
    assert (decode_image(_encode(Image.fromarray(values * 200, mode="F"), "TIFF")).pixels == 100).all()  # 0..255
    values[0, 0] = np.nan
    with pytest.raises(ImageRejected, match="a F image with NaN or infinite pixel values"):
        decode_image(_encode(Image.fromarray(values, mode="F"), "TIFF"))


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))
    pixels = decode_image(_encode(image, "PNG")).pixels
    assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[3, 3]) == (255, 255, 255)


def test_one_by_one_pixel():
    assert decode_image(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")).pixels.shape == (1, 1, 3)


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (what a decompression bomb looks like)."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def test_decompression_bomb_sized_is_rejected_before_decoding():
    with pytest.raises(ImageRejected, match="too large.*3600000000 pixels"):
        decode_image(_png_with_size(60000, 60000))
    with pytest.raises(ImageRejected, match="exceeds the limit of 100"):
        decode_image(_encode(make_image(20, 20), "PNG"), max_pixels=100)


def test_exif_rotation_is_applied():
    image = make_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.pixels.shape == (40, 20, 3)  # width and height swapped


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(data)
    assert decoded.frames == 2
    assert decoded.pixels[5, 5, 0] > 200 and decoded.pixels[5, 5, 1] < 50


def test_webp():
    decoded = decode_image(_encode(Image.new("RGB", (12, 9), (0, 0, 200)), "WEBP", lossless=True))
    assert decoded.pixels.shape == (9, 12, 3) and tuple(decoded.pixels[4, 4]) == (0, 0, 200)
