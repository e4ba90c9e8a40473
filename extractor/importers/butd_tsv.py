"""BUTD TSVs: peteanderson80/bottom-up-attention `tools/generate_tsv.py` (the `trainval_36` COCO
features of ViLBERT, BUTD and VL-BERT).

One image per line, no header, fields `image_id, image_w, image_h, num_boxes, boxes, features`
(width before height): `image_id` an integer (the COCO id), `boxes` base64 of float32 (num_boxes, 4)
proposal boxes in original-image pixels x1, y1, x2, y2, `features` base64 of float32
(num_boxes, 2048) pool5 means. No class distributions, object ids or attributes: these shards
serve fine-tuning; pretraining refuses them (recipe: cls_prob missing).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np

from .driver import Entry, Record, as_int, b64_array
from .tsv import FIELDS as TSV_FIELDS
from .tsv import entries as tsv_entries
from .tsv import matches as tsv_matches

NAME = "butd-tsv"
FIELDNAMES = TSV_FIELDS[NAME]


def matches(src) -> bool:
    return tsv_matches(src, FIELDNAMES)


def count(src) -> Optional[int]:
    return None  # lines are only known by reading the whole file


def decode(row: Dict[str, str]) -> Record:
    n = as_int(row["num_boxes"], "num_boxes")
    return Record(width=as_int(row["image_w"], "image_w"), height=as_int(row["image_h"], "image_h"),
                  boxes=b64_array(row["boxes"], np.float32, (n, 4), "boxes"),
                  features=b64_array(row["features"], np.float32, (n, -1), "features"))


def entries(src) -> Iterator[Entry]:
    return tsv_entries(src, NAME, FIELDNAMES, decode)
