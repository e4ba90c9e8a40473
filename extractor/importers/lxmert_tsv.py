"""LXMERT TSVs: airsplay/lxmert `data/*_imgfeat/extract_*_image.py` (`train2014_obj36.tsv`,
`vg_gqa_obj36.tsv`, ...), read as its `src/utils.py: load_obj_tsv` does.

One image per line, no header, fields `img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
attrs_conf, num_boxes, boxes, features` (height before width): `img_id` the file name without its
extension (`COCO_val2014_000000000042`), then base64 of int64 objects_id, float32 objects_conf,
int64 attrs_id, float32 attrs_conf (num_boxes,), float32 boxes (num_boxes, 4) in original pixels
x1, y1, x2, y2 and float32 features (num_boxes, 2048). `objects_id` is the argmax over the 1600
object classes without the background column (0-based; shard column id + 1), `attrs_id` likewise
over the 400 attributes: the shards get one-hot cls_prob / attr_prob from them (the full
distributions were not saved).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np

from .driver import Entry, Record, as_int, b64_array
from .tsv import FIELDS as TSV_FIELDS
from .tsv import entries as tsv_entries
from .tsv import matches as tsv_matches

NAME = "lxmert-tsv"
FIELDNAMES = TSV_FIELDS[NAME]


def matches(src) -> bool:
    return tsv_matches(src, FIELDNAMES)


def count(src) -> Optional[int]:
    return None


def decode(row: Dict[str, str]) -> Record:
    n = as_int(row["num_boxes"], "num_boxes")
    b64_array(row["objects_conf"], np.float32, (n,), "objects_conf")  # checked, not stored: one-hot targets
    b64_array(row["attrs_conf"], np.float32, (n,), "attrs_conf")
    return Record(width=as_int(row["img_w"], "img_w"), height=as_int(row["img_h"], "img_h"),
                  boxes=b64_array(row["boxes"], np.float32, (n, 4), "boxes"),
                  features=b64_array(row["features"], np.float32, (n, -1), "features"),
                  objects_id=b64_array(row["objects_id"], np.int64, (n,), "objects_id"),
                  attrs_id=b64_array(row["attrs_id"], np.int64, (n,), "attrs_id"))


def entries(src) -> Iterator[Entry]:
    return tsv_entries(src, NAME, FIELDNAMES, decode)
