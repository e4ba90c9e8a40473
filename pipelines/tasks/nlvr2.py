"""NLVR2 in its released files.

    DATA/{train,dev,test1}.json   one JSON object a line: "identifier" ("dev-850-0-0"), "sentence",
                                  "label" ("True" / "False")

An item's two images are its identifier without the last part plus "-img0" / "-img1"
("dev-850-0-img0"), the stems of NLVR2's image files, as the official loader derives them
(vilbert-multi-task TASK12, `nlvr2_dataset.py`). The sentence goes with each image; the two joint
vectors h_IMG * h_CLS are concatenated into the 2-way head `vil_binary_prediction` (False 0,
True 1), trained with BCE on the one-hot label; accuracy on dev and test-P (`test1`).
"""
from __future__ import annotations

from .base import no_items
from .classification import SentenceImagesTask
from .snli_ve import field, read_jsonl


class NLVR2Task(SentenceImagesTask):
    name = "nlvr2"
    default_splits = ("dev", "test1")
    official_task_id = 12  # TASK12
    default_max_seq_length = 40
    default_batch_size = 64
    val_split = "dev"
    labels = ("False", "True")
    head_name = "nlvr2"  # vil_binary_prediction
    head_kind = "pair"
    images_per_item = 2

    def load_split(self, split: str) -> list[dict]:
        path = self.data / f"{split}.json"
        items, lines = [], {}
        for n, row in enumerate(read_jsonl(path, f"NLVR2 {split} split"), 1):
            identifier = field(path, n, row, "identifier")
            if identifier in lines:  # it would be trained on and scored twice
                raise ValueError(f"{path}:{n}: identifier {identifier!r} again (first on line {lines[identifier]})")
            lines[identifier] = n
            stem = identifier.rsplit("-", 1)[0]
            if stem == identifier:
                raise ValueError(f"{path}:{n}: identifier {identifier!r} is not SPLIT-SET-PAIR-SENTENCE")
            label = field(path, n, row, "label")
            if label not in self.labels:
                raise ValueError(f"{path}:{n}: label {label!r} is neither 'True' nor 'False'")
            items.append({"id": identifier, "sentence": field(path, n, row, "sentence"),
                          "images": [f"{stem}-img0", f"{stem}-img1"], "label": self.labels.index(label)})
        if not items:  # nothing to evaluate: it would exit 0 with no metric
            raise no_items(path, split, "items")
        return items
