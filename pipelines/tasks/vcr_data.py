"""The released VCR files, read and checked: the questions of a split (`load_vcr_split`), the names
given to people (`read_names_table`, `object_names`), VCR tokens as words (`object_words`), and the
annotated boxes of each image (`gt_boxes_json`, the `--gt-boxes` file of vilbert-extract). The
layout and the rules are in `pipelines.tasks.vcr`'s docstring."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from common.safe_load import regular_file

from .base import first_seen
from .snli_ve import field, read_jsonl

CHOICES = 4
NAMES_TABLE = "unisex_names_table.csv"


def image_key(img_fn: str) -> str:
    """The shard key vilbert-extract gives an image at `img_fn` under its IMAGES folder: the path
    without its extension, every character outside [A-Za-z0-9_-] as "_"."""
    stem = img_fn.rsplit(".", 1)[0] if "." in img_fn.rsplit("/", 1)[-1] else img_fn
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def read_names_table(path: Path) -> list[str]:
    """The second column of every row but the header (the official reader keeps row[1] != "name")."""
    try:
        regular_file(path, "names table")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: names table not found (VCR's people are named from it: "
                                f"vilbert-multi-task's datasets/VCR/{NAMES_TABLE})") from None
    names = []
    with open(path, newline="", encoding="utf-8") as handle:
        for n, row in enumerate(csv.reader(handle), 1):
            if not row:
                continue
            if len(row) < 2 or not row[1].strip():
                raise ValueError(f"{path}:{n}: expected a name in the second column, got {row!r}")
            if row[1] != "name":
                names.append(row[1])
    if not names:
        raise ValueError(f"{path}: no names")
    return names


def object_names(objects: list[str], table: list[str], rng: np.random.Generator) -> list[str]:
    """The word of each object: a name from `table` for a "person", else its class name."""
    return [table[int(rng.integers(len(table)))] if name == "person" else name for name in objects]


def object_words(tokens: list, names: list[str]) -> list[str]:
    """VCR tokens -> words: a word stays, an index list becomes the words of those objects."""
    words = []
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
        else:
            words.extend(names[i] for i in token)
    return words


def _tokens(path: Path, n: int, value, what: str, n_objects: int) -> list:
    """A checked token list: words and lists of object indices below n_objects."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}:{n}: {what} must be a non-empty list of tokens, got {value!r}"[:300])
    for token in value:
        if isinstance(token, str):
            continue
        if not isinstance(token, list) or not token or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in token):
            raise ValueError(f"{path}:{n}: {what} holds {token!r}, neither a word nor a list of object indices")
        for i in token:
            if not 0 <= i < n_objects:
                raise ValueError(f"{path}:{n}: {what} refers to object {i}, the line has {n_objects} objects")
    return value


def _label(path: Path, n: int, row: dict, name: str):
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < CHOICES:
        raise ValueError(f"{path}:{n}: {name} {value!r} is not an index of the {CHOICES} choices")
    return value


def load_vcr_split(data: Path, split: str) -> list[dict]:
    """DATA/SPLIT.jsonl -> items {id, img_fn, key, metadata_fn, objects, question, answers,
    rationales, answer_label, rationale_label} (labels None on an unlabelled line)."""
    path = Path(data) / f"{split}.jsonl"
    items, lines = [], {}
    for n, row in enumerate(read_jsonl(path, f"VCR {split} split"), 1):
        objects = row.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise ValueError(f"{path}:{n}: 'objects' must be a list of class names, got {objects!r}"[:300])
        question = _tokens(path, n, row.get("question"), "question", len(objects))
        choices = {}
        for name in ("answer_choices", "rationale_choices"):
            value = row.get(name)
            if not isinstance(value, list) or len(value) != CHOICES:
                got = f"{len(value)}" if isinstance(value, list) else repr(value)[:80]
                raise ValueError(f"{path}:{n}: {name} must be a list of {CHOICES} token lists, got {got}")
            choices[name] = [_tokens(path, n, c, f"{name}[{k}]", len(objects)) for k, c in enumerate(value)]
        answer, rationale = _label(path, n, row, "answer_label"), _label(path, n, row, "rationale_label")
        if (answer is None) != (rationale is None):
            raise ValueError(f"{path}:{n}: has {'answer' if rationale is None else 'rationale'}_label but not "
                             f"{'rationale' if rationale is None else 'answer'}_label")
        img_fn = field(path, n, row, "img_fn")
        annot_id = str(row.get("annot_id", f"{split}-{n - 1}"))
        first_seen(lines, annot_id, f"line {n}", "annot_id", path)  # it would be trained on and scored twice
        items.append({"id": annot_id, "img_fn": img_fn, "key": image_key(img_fn),
                      "metadata_fn": row.get("metadata_fn"), "objects": objects, "question": question,
                      "answers": choices["answer_choices"], "rationales": choices["rationale_choices"],
                      "answer_label": answer, "rationale_label": rationale})
    if not items:
        raise ValueError(f"{path}: no questions")
    unlabelled = [it["id"] for it in items if it["answer_label"] is None]
    if unlabelled and len(unlabelled) < len(items):  # it would be scored on the labelled ones only
        raise ValueError(f"{path}: {len(unlabelled)} of the {len(items)} questions have no answer_label, e.g. "
                         f"annot_id {unlabelled[0]!r}; a split is labelled whole (train, val) or not at all (test)")
    return items


def gt_boxes_json(data: Path, splits=("train", "val", "test")) -> dict[str, list]:
    """{img_fn: [[x1, y1, x2, y2], ...]} from each image's metadata (DATA/vcr1images/METADATA_FN,
    "boxes" of x1, y1, x2, y2, score), in the order of its objects: the `--gt-boxes` file of
    `vilbert-extract vcr1images OUT --gt-boxes FILE` (a split whose jsonl is absent is skipped)."""
    data = Path(data)
    boxes: dict[str, list] = {}
    for split in splits:
        if not ((data / f"{split}.jsonl").exists() or (data / f"{split}.jsonl").is_symlink()):
            continue  # absent; anything else there is read (and a FIFO refused) by load_vcr_split
        for item in load_vcr_split(data, split):
            if item["img_fn"] in boxes:
                continue
            if not isinstance(item["metadata_fn"], str):
                raise ValueError(f"{data / f'{split}.jsonl'}: question {item['id']} has no 'metadata_fn'")
            path = regular_file(data / "vcr1images" / item["metadata_fn"], f"metadata of {item['img_fn']}")
            try:
                meta = json.loads(path.read_text())
                found = [[float(v) for v in b[:4]] for b in meta["boxes"]]
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{path}: expected JSON with 'boxes' of [x1, y1, x2, y2, score] ({e})") from None
            if len(found) != len(item["objects"]) or any(len(b) != 4 for b in found):
                raise ValueError(f"{path}: {len(found)} boxes for the {len(item['objects'])} objects of question "
                                 f"{item['id']}")
            boxes[item["img_fn"]] = found
    if not boxes:
        raise FileNotFoundError(f"{data}: no {', '.join(f'{s}.jsonl' for s in splits)}")
    return boxes
