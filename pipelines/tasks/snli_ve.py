"""SNLI-VE (visual entailment) in its released files.

    DATA/snli_ve_{train,dev,test}.jsonl   one JSON object a line: "Flikr30kID" (sic, "1000092795.jpg"),
                                          "sentence2" (the hypothesis), "gold_label"
                                          (entailment / neutral / contradiction, or "-": none)

The premise is the Flickr30k image (features looked up by its file stem). As vilbert-multi-task
(TASK13, `visual_entailment_dataset.py`): labels contradiction 0, neutral 1, entailment 2; the
3-way head `vil_tri_prediction` (a linear layer on the joint vector h_IMG * h_CLS), BCE on the
one-hot label; accuracy on dev and test.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.safe_load import regular_file

from .base import first_seen, no_items
from .classification import SentenceImagesTask


def read_jsonl(path: Path, what: str) -> list[dict]:
    regular_file(path, what)  # "PATH: WHAT not found"; a FIFO would block the read
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{n}: not a JSON line ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def field(path: Path, n: int, row: dict, name: str) -> str:
    """row[name] as a string; a one-line error naming the file, line and field if it is missing."""
    if name not in row or not isinstance(row[name], (str, int)) or isinstance(row[name], bool):
        raise ValueError(f"{path}:{n}: no {name!r} string (got {row.get(name)!r})")
    return str(row[name])


class SNLIVETask(SentenceImagesTask):
    name = "snli-ve"
    default_splits = ("dev", "test")
    official_task_id = 13  # TASK13 (VisualEntailment)
    default_max_seq_length = 56
    default_batch_size = 256
    val_split = "dev"
    labels = ("contradiction", "neutral", "entailment")
    head_name = "entailment"  # vil_tri_prediction
    head_kind = "pooled_linear"

    def load_split(self, split: str) -> list[dict]:
        path = self.data / f"snli_ve_{split}.jsonl"
        items, lines = [], {}
        for n, row in enumerate(read_jsonl(path, f"SNLI-VE {split} split"), 1):
            gold = field(path, n, row, "gold_label")
            if gold != "-" and gold not in self.labels:
                raise ValueError(f"{path}:{n}: gold_label {gold!r} is none of {', '.join(self.labels)} or '-'")
            if "pairID" in row:  # it would be trained on and scored twice
                first_seen(lines, field(path, n, row, "pairID"), f"line {n}", "pairID", path)
            items.append({"id": row.get("pairID", n - 1), "sentence": field(path, n, row, "sentence2"),
                          "images": [Path(field(path, n, row, "Flikr30kID")).stem],
                          "label": None if gold == "-" else self.labels.index(gold)})
        if not items:  # nothing to evaluate: it would exit 0 with no metric
            raise no_items(path, split, "items")
        return items

    def eval_inputs(self, split: str) -> list[dict]:
        """As every task's, and a split none of whose items has a gold label is refused: SNLI-VE has no
        unlabelled split to answer for a leaderboard, so it would give a count and no accuracy."""
        items = super().eval_inputs(split)
        if not any(self.scored(it) for it in items):
            raise ValueError(f"{self.data / f'snli_ve_{split}.jsonl'}: every gold_label of split {split!r} is '-' "
                             f"(none): none of its {len(items)} items can be scored")
        return items
