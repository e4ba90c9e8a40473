"""Robust image decoding: every input either becomes an RGB uint8 array or a clear rejection reason."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning limit
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class ImageRejected(Exception):
    """The input is not usable; str(error) is the reason written to errors.jsonl."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, after EXIF rotation
    original_mode: str
    frames: int


def _to_8bit_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grayscale: scale, not clip
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageRejected(f"a {mode} image with NaN or infinite pixel values")
        peak = values.max(initial=0)
        if mode == "F" and peak <= 1.0:  # a floating-point image in [0, 1] (it was taken for 0..255: black)
            top = 1.0
        else:
            top = 65535.0 if mode.startswith("I;16") or peak > 255 else 255.0
        gray = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))  # RGB, L, 1, P, CMYK, YCbCr, ...


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode bytes; raise ImageRejected(reason) for anything that is not a usable image."""
    if len(data) == 0:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(f"image too large: {width}x{height} = {width * height} pixels "
                                    f"exceeds the limit of {max_pixels} (decompression bomb?)")
            if width < 1 or height < 1:
                raise ImageRejected(f"image has no pixels ({width}x{height})")
            frames = getattr(image, "n_frames", 1)
            image.seek(0)  # animated GIF / WebP: first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            pixels = _to_8bit_rgb(image)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"image too large (decompression bomb): {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected(f"corrupt or truncated image: {error}") from None
    return DecodedImage(pixels=np.ascontiguousarray(pixels), original_mode=image.mode, frames=frames)


def pixel_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> a tensor on the same memory, never written to. A DataLoader worker
    hands tensors to the main process through shared memory, which costs the main process about a
    third of unpickling the array (benchmarks/extract_parts_benchmark.py)."""
    if any(stride < 0 for stride in pixels.strides):  # e.g. a flipped view: torch needs positive strides
        pixels = np.ascontiguousarray(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's arrays are read-only; nothing writes here
        return torch.from_numpy(pixels)
