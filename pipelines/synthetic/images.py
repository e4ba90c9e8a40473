"""The picture scenes of the bundled sample corpus (data/sample/), deterministic: same files every run.

    python data/sample/make_sample.py            # rewrites data/sample/ (what the suite compares)
    python data/sample/make_sample.py --out DIR  # elsewhere

Scenes of 3 coloured shapes (distinct colours, shapes from circle/square/triangle) on textured
backgrounds, 160x120 JPEG. Scenes 0..N_TRAIN-1 are the training split, the rest are held out.

    images/train/scene_NNNNNN.jpg, images/test/scene_NNNNNN.jpg
    captions.tsv            Conceptual-Captions style `caption<TAB>filename`, one caption per scene
    annotations.json        COCO style: images, annotations (bbox x,y,w,h + colour), categories (shapes)
                            -> `vilbert-extract --gt-boxes annotations.json`
    retrieval/train.jsonl   {"img_path", "sentences"} per image (vilbert-multi-task retrieval format)
    retrieval/test.jsonl
    refer/refs(unc).p       refer-toolkit pickle: one ref per object ("the red circle"), split train / val
    refer/instances.json    COCO instances the refs point into (same boxes as annotations.json)
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"  # where the corpus is bundled
SEED = 6
N_TRAIN, N_TEST = 240, 60
WIDTH, HEIGHT = 160, 120
OBJECTS_PER_SCENE = 3
JPEG_QUALITY = 90
COLOURS = {  # name -> RGB
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
    "orange": (250, 130, 10),
    "cyan": (20, 200, 215),
}
SHAPES = ["circle", "square", "triangle"]
# background textures: muted base colours, stripes / checks / noise
BACKGROUNDS = [(110, 100, 90), (90, 100, 110), (100, 110, 95), (120, 115, 105), (85, 85, 85)]


def vocabulary() -> list[str]:
    """Every word the captions and expressions use (a BERT-style vocab.txt for the demo)."""
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "and", "the", ","] + list(COLOURS) + SHAPES


def texture(rng: np.random.Generator) -> Image.Image:
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    kind = rng.integers(3)
    period = rng.integers(6, 16)
    if kind == 0:  # stripes at a random angle
        angle = rng.uniform(0, np.pi)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:  # checks
        pattern = ((xx // period + yy // period) % 2) * 2.0 - 1.0
    else:  # blotchy noise
        coarse = rng.normal(size=(HEIGHT // 8 + 1, WIDTH // 8 + 1))
        pattern = np.kron(coarse, np.ones((8, 8)))[:HEIGHT, :WIDTH]
    img = base[None, None, :] + 18.0 * pattern[..., None] + rng.normal(0, 6, size=(HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def place(rng: np.random.Generator, sizes: list[int]) -> list[tuple[int, int, int, int]] | None:
    boxes = []
    for s in sizes:
        for _ in range(100):
            x, y = int(rng.integers(2, WIDTH - s - 2)), int(rng.integers(2, HEIGHT - s - 2))
            if all(x + s + 3 < bx or bx + bs + 3 < x or y + s + 3 < by or by + bs + 3 < y for bx, by, bs, _ in
                   [(b[0], b[1], b[2] - b[0], 0) for b in boxes]):
                boxes.append((x, y, x + s, y + s))
                break
        else:
            return None
    return boxes


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, rgb) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=rgb)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=rgb)


def jitter(rgb, rng) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in rgb)


def describe(objects: list[dict]) -> str:
    names = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}" for o in objects]
    return ", ".join(names[:-1]) + " and " + names[-1]


def make_scenes() -> list[dict]:
    rng = np.random.default_rng(SEED)
    scenes = []
    for i in range(N_TRAIN + N_TEST):
        while True:
            sizes = [int(s) for s in rng.integers(32, 48, size=OBJECTS_PER_SCENE)]
            boxes = place(rng, sizes)
            if boxes is not None:
                break
        colours = [list(COLOURS)[c] for c in rng.permutation(len(COLOURS))[:OBJECTS_PER_SCENE]]
        shapes = [SHAPES[s] for s in rng.integers(0, len(SHAPES), size=OBJECTS_PER_SCENE)]
        img = texture(rng)
        draw = ImageDraw.Draw(img)
        objects = []
        for box, colour, shape in zip(boxes, colours, shapes):
            draw_shape(draw, shape, box, jitter(COLOURS[colour], rng))
            objects.append({"box": list(box), "colour": colour, "shape": shape})
        order = list(rng.permutation(OBJECTS_PER_SCENE))
        scenes.append({
            "id": i, "split": "train" if i < N_TRAIN else "test", "file": f"scene_{i:06d}.jpg",
            "objects": objects, "image": img,
            "caption": describe([objects[k] for k in range(OBJECTS_PER_SCENE)]),
            "caption2": describe([objects[k] for k in order]),
        })
    return scenes


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def write(out: Path) -> list[Path]:
    scenes = make_scenes()
    files: dict[str, bytes] = {}
    for s in scenes:
        files[f"images/{s['split']}/{s['file']}"] = jpeg(s["image"])
    files["captions.tsv"] = "".join(f"{s['caption']}\t{s['file']}\n" for s in scenes).encode()

    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPES)]
    images = [{"id": s["id"], "file_name": s["file"], "width": WIDTH, "height": HEIGHT, "split": s["split"]}
              for s in scenes]
    annotations, refs = [], []
    for s in scenes:
        for k, o in enumerate(s["objects"]):
            x1, y1, x2, y2 = o["box"]
            ann_id = s["id"] * 10 + k
            annotations.append({"id": ann_id, "image_id": s["id"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                "category_id": SHAPES.index(o["shape"]) + 1, "colour": o["colour"]})
            phrase = f"the {o['colour']} {o['shape']}"
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": s["id"], "file_name": s["file"],
                         "split": "train" if s["split"] == "train" else "val",
                         "category_id": SHAPES.index(o["shape"]) + 1, "sent_ids": [ann_id],
                         "sentences": [{"sent_id": ann_id, "raw": phrase, "sent": phrase,
                                        "tokens": phrase.split()}]})
    coco = {"info": {"description": "vilbert-pipeline bundled sample scenes (data/sample/make_sample.py)"},
            "images": images, "annotations": annotations, "categories": categories}
    files["annotations.json"] = json.dumps(coco, indent=None, separators=(",", ":")).encode()
    files["refer/instances.json"] = files["annotations.json"]
    files["refer/refs(unc).p"] = pickle.dumps(refs, protocol=2)
    for split in ("train", "test"):
        rows = [{"img_path": s["file"], "sentences": [s["caption"], s["caption2"]]}
                for s in scenes if s["split"] == split]
        files[f"retrieval/{split}.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    files["vocab.txt"] = ("\n".join(vocabulary()) + "\n").encode()

    written = []
    for rel, data in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args(argv)
    written = write(args.out)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files, {total / 1e6:.2f} MB, to {args.out}")

