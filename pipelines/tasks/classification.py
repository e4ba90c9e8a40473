"""What SNLI-VE and NLVR2 share: a sentence with one or more images, one of a few labels, a head on
the joint vectors, BCE on one-hot targets (vilbert-multi-task's loss for both), accuracy.

A subclass sets `labels` (the label names, in the official index order), `head_name` / `head_kind`
(the official head it trains), `images_per_item`, and implements `load_split(split)` returning
items {"id", "sentence", "images": [image id, ...], "label": index or None}. An item without a gold
label (SNLI-VE's "-") is never trained on and is counted, not scored, in evaluation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task, batched
from .features import check_features, image_batch
from .metrics import check_finite_items
from .text import encode


class SentenceImagesTask(Task):
    labels: tuple[str, ...] = ()
    head_name = ""
    head_kind = "pooled_linear"
    images_per_item = 1
    train_split = "train"

    def __init__(self, opts):
        super().__init__(opts)
        self.load_common()
        self._train = None

    def load_split(self, split: str) -> list[dict]:
        raise NotImplementedError

    def head(self):
        return (self.head_name, self.head_kind, len(self.labels))

    def make_batch(self, items: list[dict]) -> dict:
        """Each item's sentence once per image (B * images_per_item rows, an item's rows consecutive)."""
        k = self.images_per_item
        images = image_batch(self.store, [i for it in items for i in it["images"]], self.opts.max_regions)
        text = encode(self.tokenizer, [it["sentence"] for it in items for _ in range(k)], self.opts.max_seq_length)
        labels = torch.tensor([-1 if it["label"] is None else it["label"] for it in items])  # (B,)
        return {**text, **images, "labels": labels}

    def logits(self, model, batch) -> torch.Tensor:
        return model.task_logits(self.head_name, self.backbone(model, batch))  # (B, labels)

    def train_items(self) -> list[dict]:
        """The labelled items of the training split(s) (`train_split`, several joined by commas)."""
        if self._train is None:
            splits = [s.strip() for s in self.train_split.split(",")]
            items = [it for split in splits for it in self.load_split(split) if it["label"] is not None]
            if not items:
                raise ValueError(f"{self.data}: no labelled training item")
            check_features(self.store, sorted({i for it in items for i in it["images"]}), self.train_split)
            self._train = items
        return self._train

    def collate(self, items, rng):
        return self.make_batch(items)

    def loss(self, model, batch):
        logits = self.logits(model, batch)
        targets = F.one_hot(batch["labels"], len(self.labels)).to(logits.dtype)  # (B, labels)
        return F.binary_cross_entropy_with_logits(logits, targets)  # mean over items and labels, as official

    def eval_inputs(self, split: str) -> list[dict]:
        items = self.load_split(split)
        check_features(self.store, sorted({i for it in items for i in it["images"]}), split)
        return items

    def has_labels(self, split: str) -> bool:
        return any(self.scored(it) for it in self.load_split(split))

    def scored(self, item: dict) -> bool:
        """Whether the item counts in the accuracy (it has a gold label)."""
        return item["label"] is not None

    def correct(self, item: dict, k: int) -> bool:
        return k == item["label"]

    def prediction(self, item: dict, k: int) -> dict:
        """One line of predictions_SPLIT.json for label index k."""
        return {"id": item["id"], "prediction": self.labels[k],
                "label": None if item["label"] is None else self.labels[item["label"]]}

    @torch.no_grad()
    def evaluate(self, model, split):
        items = self.eval_inputs(split)
        model.eval()
        def run(chunk, batch):
            logits = self.logits(model, batch)  # (B, labels)
            return list(zip(logits.argmax(1).tolist(), torch.isfinite(logits).all(1).tolist()))

        outputs = self.map_chunks(list(batched(items, self.opts.eval_batch_size)), self.make_batch, run)
        check_finite_items([ok for _, ok in outputs], [it["id"] for it in items], f"{self.name} {split}")
        preds, correct, scored = [], 0, 0
        for it, (k, _) in zip(items, outputs):
            preds.append(self.prediction(it, k))
            if self.scored(it):
                scored += 1
                correct += int(self.correct(it, k))
        metrics = {"count": len(items), "scored": scored}
        if scored:
            metrics["accuracy"] = correct / scored
        return metrics, preds
