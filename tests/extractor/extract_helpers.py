"""Generated test images for the extractor tests (imported as `extract_helpers`)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic picture with a few coloured rectangles (something for the RPN to see)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 200, dtype=np.uint8)
    for _ in range(4):
        x1, y1 = rng.integers(0, max(1, width // 2)), rng.integers(0, max(1, height // 2))
        x2, y2 = x1 + rng.integers(1, max(2, width // 2)), y1 + rng.integers(1, max(2, height // 2))
        pixels[y1:y2, x1:x2] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels).convert(mode)


def write_images(folder, count: int, size=(64, 48), captions: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        make_image(*size, seed=index).save(folder / f"img{index:03d}.jpg")
        if captions:
            (folder / f"img{index:03d}.txt").write_text(f"caption number {index}")
    return folder


def read_shards(out_dir):
    """{key: {extension: value}} over every complete shard, .npy loaded with allow_pickle=False."""
    import io
    import json
    import tarfile
    from pathlib import Path

    samples = {}
    for shard in sorted(Path(out_dir).glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, extension = member.name.split(".", 1)
                payload = archive.extractfile(member).read()
                if extension.endswith(".npy"):
                    value = np.load(io.BytesIO(payload), allow_pickle=False)
                elif extension == "json":
                    value = json.loads(payload)
                else:
                    value = payload.decode("utf-8")
                samples.setdefault(key, {})[extension] = value
    return samples
