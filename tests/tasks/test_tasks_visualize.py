"""--visualize's pictures in bounded memory whatever size the data claims: neither the grey canvas of
a 10^6 x 10^6 image in instances.json nor an image file whose header claims that size is ever
allocated at it. The files here are headers (a few bytes), and each drawing runs under an
address-space limit of the process's size + 1.5 GiB, so that a regression fails with MemoryError
instead of filling the machine."""
import contextlib
import logging
import resource
import struct
import zlib

import pytest
from PIL import Image

from pipelines.tasks.visualize import MAX_DECODE_PIXELS, draw_referring

PRED = {"image_id": 7, "sent_id": 3, "expression": "the red circle", "iou": 0.25, "hit": False,
        "gt_box": [10, 10, 400, 300], "pred_box": [200, 150, 900, 700]}
HUGE = 10 ** 6


@contextlib.contextmanager
def memory_limit(headroom: int = 3 << 29):
    """RLIMIT_AS at the current virtual size + headroom while the block runs."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = min([size + headroom] + [x for x in (soft, hard) if x != resource.RLIM_INFINITY])
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def png_header(width: int, height: int) -> bytes:
    """A PNG file that claims width x height RGB pixels and holds none: signature, IHDR, empty IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg_claiming(tmp_path, width: int, height: int) -> bytes:
    """A real 16 x 16 baseline JPEG whose frame header (SOF0) is rewritten to width x height."""
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "small.jpg", quality=90)
    data = bytearray((tmp_path / "small.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def picture_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "vilbert.eval"]


@pytest.mark.parametrize("width, height", [(HUGE, HUGE), (10, HUGE), (HUGE, 10)])
def test_a_grey_canvas_of_any_claimed_size_is_drawn_in_bounded_memory(tmp_path, width, height):
    with memory_limit():
        out = draw_referring(PRED, {"width": width, "height": height, "file_name": "missing.jpg"}, None, tmp_path)
    w, h = picture_size(out)
    assert w <= 6 * 80 and h <= (6 * 4 + 0.6) * 80  # the figure's size, bounded whatever the aspect


def test_an_image_size_that_is_not_a_size_is_an_error():
    for info in ({"width": 0, "height": 5}, {"width": -3, "height": 5}, {"width": float("nan"), "height": 5}):
        with pytest.raises(ValueError, match="not a positive size"):  # refcoco.py logs it, the results stand
            draw_referring(PRED, {**info, "file_name": "x.jpg"}, None, "unused")


@pytest.mark.parametrize("kind, pillow_limit", [("png", True), ("png", False), ("jpeg", False)])
def test_an_image_file_claiming_a_huge_size_is_not_decoded_and_is_one_logged_line(tmp_path, caplog, monkeypatch,
                                                                                 kind, pillow_limit):
    images = tmp_path / "images"
    images.mkdir()
    if kind == "jpeg":  # decoded at 1/8 of the size it would still be 7500 x 7500 pixels
        (images / "big.jpg").write_bytes(jpeg_claiming(tmp_path, 60000, 60000))
    else:
        (images / "big.jpg").write_bytes(png_header(HUGE, HUGE))
    if not pillow_limit:  # Image.MAX_IMAGE_PIXELS = None, as some programs set it: our own limit refuses
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with memory_limit(), caplog.at_level(logging.WARNING, logger="vilbert.eval"):
        out = draw_referring(PRED, {"width": 640, "height": 480, "file_name": "big.jpg"}, images, tmp_path / "out")
    assert out.is_file() and picture_size(out)[0] <= 6 * 80
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "big.jpg" in lines[0] and "not decoded" in lines[0] and "grey canvas" in lines[0]
    if pillow_limit:  # Pillow refuses to open it (Image.DecompressionBombError), with the size
        assert f"{HUGE * HUGE} pixels" in lines[0], lines
    else:
        claimed = "60000 x 60000" if kind == "jpeg" else f"{HUGE} x {HUGE}"
        assert f"{claimed} pixels, over the {MAX_DECODE_PIXELS}-pixel limit" in lines[0], lines


def test_a_large_image_within_the_limit_is_shrunk_and_drawn_without_a_line(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (3000, 2000), (0, 0, 255)).save(images / "photo.png")  # 6 Mpixel, a few KB on disk
    with memory_limit(), caplog.at_level(logging.WARNING, logger="vilbert.eval"):
        out = draw_referring(PRED, {"width": 640, "height": 480, "file_name": "photo.png"}, images, tmp_path / "out")
    assert warnings_of(caplog) == []
    with Image.open(out) as im:
        r, g, b = im.convert("RGB").getpixel((im.width // 2, im.height // 2))
    assert b > 200 and r < 60 and g < 60  # the photo, not the grey canvas
