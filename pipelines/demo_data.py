"""The data of `vilbert-demo`: a (possibly shortened) copy of the bundled sample corpus in OUT/data,
and the checks made before the demo replaces anything in OUT."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import click
import numpy as np


def prepare_data(sample: Path, out: Path, train_scenes: int | None, test_scenes: int | None) -> dict:
    """Copy the first `train_scenes` training and `test_scenes` held-out scenes of `sample` (checked
    by `check_demo_folders`) with their annotations (captions, COCO boxes, retrieval jsonl, refer pickle) into `out`."""
    from pipelines.tasks.refer_pickle import load_refs

    coco = json.loads((sample / "annotations.json").read_text())
    keep: dict[str, list[str]] = {}
    for split, limit in (("train", train_scenes), ("test", test_scenes)):
        files = sorted(p.name for p in (sample / "images" / split).glob("*.jpg"))
        keep[split] = files[:limit] if limit else files
    if out.exists():
        shutil.rmtree(out)
    names = set(keep["train"]) | set(keep["test"])
    for split, files in keep.items():
        (out / "images" / split).mkdir(parents=True)
        for name in files:
            shutil.copyfile(sample / "images" / split / name, out / "images" / split / name)
    ids = {im["id"] for im in coco["images"] if im["file_name"] in names}
    coco = {**coco, "images": [im for im in coco["images"] if im["id"] in ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    text = json.dumps(coco, separators=(",", ":"))
    (out / "annotations.json").write_text(text)
    lines = [line for line in (sample / "captions.tsv").read_text().splitlines() if line.split("\t")[-1] in names]
    (out / "captions.tsv").write_text("".join(line + "\n" for line in lines))
    shutil.copyfile(sample / "vocab.txt", out / "vocab.txt")
    (out / "retrieval").mkdir()
    for split in ("train", "test"):
        rows = [line for line in (sample / "retrieval" / f"{split}.jsonl").read_text().splitlines()
                if json.loads(line)["img_path"] in names]
        (out / "retrieval" / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows))
    (out / "refer").mkdir()
    refs = [r for r in load_refs(sample / "refer" / "refs(unc).p") if r["image_id"] in ids]
    (out / "refer" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (out / "refer" / "instances.json").write_text(text)
    return {"train": len(keep["train"]), "test": len(keep["test"]), "objects": len(coco["annotations"]),
            "refs": {s: sum(r["split"] == s for r in refs) for s in ("train", "val")}}


def feature_dim(shards: Path) -> int:
    """Width of the region features in the first sample of the first shard."""
    tar = sorted(shards.glob("*.tar"))[0]
    with tarfile.open(tar) as tf:
        for member in tf:
            if member.name.endswith(".features.npy"):
                return int(np.load(io.BytesIO(tf.extractfile(member).read()), allow_pickle=False).shape[1])
    raise click.ClickException(f"{tar}: no features")


MARKER = ".vilbert-demo"  # in OUT: a folder the demo made, whose outputs it may replace


def check_demo_folders(out: Path, sample: Path) -> None:
    """Refuse, before anything is deleted, an OUT the demo did not make that holds files (the demo
    replaces OUT/shards, train, eval and data on every run), a --data inside OUT, or a --data
    without the bundled sample."""
    if not (sample / "annotations.json").exists():
        raise click.ClickException(f"{sample}: no bundled sample (regenerate: python data/sample/make_sample.py)")
    made_by_demo = any((out / name).exists() for name in (MARKER, "demo.log", "summary.json"))  # or an older demo
    if out.is_dir() and any(out.iterdir()) and not made_by_demo:
        raise click.ClickException(f"--out {out}: holds files and was not made by vilbert-demo, which replaces "
                                   "its outputs there on every run; give an empty or new folder")
    if sample.resolve() == out.resolve() or out.resolve() in sample.resolve().parents:
        raise click.ClickException(f"--data {sample} lies inside --out {out}, which the demo replaces; "
                                   "copy it elsewhere first")
