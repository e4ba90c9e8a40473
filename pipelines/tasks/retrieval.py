"""Caption-based image retrieval (Flickr30k / COCO style).

Annotations, in DATA, one of:
    SPLIT.jsonl or SPLIT.jsonline   one JSON object per image: {"img_path": "1000092795.jpg",
                                    "sentences": ["caption", ...]} (vilbert-multi-task format)
    dataset_*.json                  Karpathy split file: {"images": [{"filename", "split",
                                    "sentences": [{"raw": ...}]}]} ("restval" counts as train)
Image ids are the file stems, looked up in the feature shards.

Fine-tuning: each positive (caption, image) meets three negatives, as in vilbert-multi-task: a
random caption of another image, a random image, and a hard-ish image drawn from the image's
nearest neighbours in mean-region-feature space; 4-way cross-entropy over the pair scores.
Scores come from the alignment head (logit[0] - logit[1]), so a pretrained checkpoint is already
a zero-shot retrieval model; a model with a `retrieval` head (official fine-tuned checkpoints) is
scored with that head unless `score_head="alignment"`.

extra options: score_head ("auto" | "alignment" | "retrieval"), max_images (evaluate on the first
N images and their captions), hard_pool (neighbours per image, default 20), pair_batch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.safe_load import regular_file

from .base import Task, first_seen, log, no_items, read_json
from .distributed import gather_lists, rank_world, share
from .features import check_features, image_batch
from .metrics import recall_at_k
from .pair_scoring import PairScorer
from .text import encode


def karpathy_file(data: Path, name: str | None = None) -> Path | None:
    """The Karpathy split file of `data`: `name` if given, else its one dataset_*.json (None if it
    has none); several without a name is an error naming them (they unpack together)."""
    if name:
        path = data / name if not Path(name).is_absolute() else Path(name)
        if not (path.exists() or path.is_symlink()):
            raise FileNotFoundError(f"--karpathy-file {name}: no such file in {data}")
        return regular_file(path, "Karpathy split file")
    found = sorted(p for p in data.glob("dataset_*.json") if not p.is_dir())  # a FIFO among them: refused by read_json
    if len(found) > 1:
        raise ValueError(f"{data}: several Karpathy split files ({', '.join(p.name for p in found)}); "
                         "choose one with --karpathy-file")
    return found[0] if found else None


def image_id_of(value) -> str:
    """The image id of an `img_path` / Karpathy `filename`: its file stem; TypeError naming the value
    if it is not a non-empty string (a number is not a file name)."""
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"is {value!r} ({type(value).__name__}), expected a file name string")
    return Path(value).stem


def load_retrieval_split(data: Path, split: str, karpathy: str | None = None) -> list[tuple[str, list[str]]]:
    """-> [(image id, [captions])], from SPLIT.jsonl / SPLIT.jsonline, else the Karpathy split file.
    Each image once (Flickr30k and COCO list an image once per split: given twice it would be in the
    gallery twice, and its ties rank worst), and a split with no image is an error."""
    for name in (f"{split}.jsonl", f"{split}.jsonline"):
        path = data / name
        if (path.exists() or path.is_symlink()) and not karpathy:
            regular_file(path, f"retrieval {split} split")  # a FIFO would block the read
            out, lines = [], {}
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    sentences = row["sentences"]
                    if not isinstance(sentences, list) or not all(isinstance(s, str) and s.strip()
                                                                  for s in sentences):
                        raise TypeError(f"'sentences' must be a list of non-empty strings, got {sentences!r:.60}")
                    try:
                        image = image_id_of(row["img_path"])
                    except TypeError as e:
                        raise TypeError(f"'img_path' {e}") from None
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected {{\"img_path\": ..., \"sentences\": [...]}}: {e}") from e
                first_seen(lines, image, f"line {n}", "image", path)
                out.append((image, list(sentences)))
            if not out:
                raise no_items(path, split, "images")
            log.info("retrieval %s: %s", split, path)
            return out
    path = karpathy_file(data, karpathy)
    if path is not None:
        doc = read_json(path, "Karpathy split file")
        want = {"train", "restval"} if split == "train" else {split}
        rows, seen = [], {}
        try:
            for k, im in enumerate(doc["images"]):
                if im["split"] not in want:
                    continue
                try:
                    image = image_id_of(im["filename"])
                except TypeError as e:
                    raise ValueError(f"{path}: images[{k}]: 'filename' {e}") from None
                first_seen(seen, image, f"images[{k}]", "image", path)
                rows.append((image, [s["raw"] for s in im["sentences"]]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected images[] with filename, split, sentences[].raw: {e}") from e
        if not rows:
            raise no_items(path, split, "images")
        log.info("retrieval %s: %s (Karpathy split %s)", split, path, "+".join(sorted(want)))
        return rows
    raise FileNotFoundError(f"{data}: no {split}.jsonl, {split}.jsonline or dataset_*.json")


class RetrievalTask(Task):
    name = "retrieval"
    default_splits = ("test",)
    official_task_id = 8  # TASK8 (RetrievalFlickr30k) in vilbert-multi-task
    default_max_seq_length = 30
    default_batch_size = 128  # positives (x 4 pairs)
    metric = "t2i_R@1"  # image retrieval R@1, the number the papers report first

    def __init__(self, opts):
        super().__init__(opts)
        self.load_common()
        self._train = None
        self.score_head = opts.extra.get("score_head") or "auto"

    def head(self):
        return ("retrieval", "pooled_linear", 1) if self.score_head == "retrieval" else None

    def _image_tensors(self, ids: list[str]) -> dict:
        return image_batch(self.store, ids, self.opts.max_regions)

    # -- training ----------------------------------------------------------------------------
    def _load_train(self):
        images = load_retrieval_split(self.data, "train", self.opts.extra.get("karpathy_file"))
        images = [(i, caps) for i, caps in images if caps]
        if len(images) < 2:
            raise ValueError(f"{self.data}: retrieval training needs at least 2 images with captions")
        check_features(self.store, [i for i, _ in images], "train")
        self.captions = [(c, k) for k, (_, caps) in enumerate(images) for c in caps]  # (caption, image index)
        mean = np.stack([self.store.get(i).features.mean(0) for i, _ in images])  # (N, F)
        mean = mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-6)
        sim = mean @ mean.T
        np.fill_diagonal(sim, -np.inf)
        k = min(int(self.opts.extra.get("hard_pool") or 20), len(images) - 1)
        self.hard = np.argsort(-sim, axis=1)[:, :k]  # (N, k) nearest other images
        self._train = images
        log.info("retrieval train: %d images, %d captions", len(images), len(self.captions))

    def train_items(self):
        """One per training caption (as vilbert-multi-task's RetreivalDataset): (caption, image index)."""
        if self._train is None:
            self._load_train()
        return self.captions

    def collate(self, items, rng):
        images, N = self._train, len(self._train)
        texts, img_idx = [], []
        for cap, k in items:
            other = (k + rng.integers(1, N)) % N
            rand_cap = images[other][1][rng.integers(0, len(images[other][1]))]
            rand_img = (k + rng.integers(1, N)) % N
            hard_img = self.hard[k][rng.integers(0, len(self.hard[k]))]
            # candidate 0 is the positive; then random caption, random image, hard image
            texts += [cap, rand_cap, cap, cap]
            img_idx += [k, k, rand_img, hard_img]
        text = encode(self.tokenizer, texts, self.opts.max_seq_length)  # (4B, T)
        return {**text, **self._image_tensors([images[i][0] for i in img_idx])}

    def scorer(self, model) -> PairScorer:
        head = self.score_head
        if head == "auto":
            head = "retrieval" if "retrieval" in model.task_heads.spec else "alignment"
        return PairScorer(model, head, lambda n, device: self.task_ids(model, n, device))

    def loss(self, model, batch):
        out = self.backbone(model, batch)
        scores = self.scorer(model).score_outputs(out, batch["image_mask"]).view(-1, 4)  # (B, 4)
        return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))

    # -- evaluation --------------------------------------------------------------------------
    def split_images(self, split: str) -> list[tuple[str, list[str]]]:
        images = load_retrieval_split(self.data, split, self.opts.extra.get("karpathy_file"))
        if self.opts.extra.get("max_images"):
            images = images[: int(self.opts.extra["max_images"])]
        return images

    def has_labels(self, split: str) -> bool:
        """A caption's own image is its label: a split of images without captions has none."""
        return any(caps for _, caps in self.split_images(split))

    def eval_inputs(self, split: str) -> list:
        images = self.split_images(split)
        if not any(caps for _, caps in images):  # nothing to rank: refused before any fine-tuning
            raise ValueError(f"{self.data}: split {split!r} has no captions (its {len(images)} images have none)")
        check_features(self.store, [i for i, _ in images], split)
        return images

    @torch.no_grad()
    def evaluate(self, model, split):
        images = self.eval_inputs(split)
        caps = [(c, k) for k, (_, cs) in enumerate(images) for c in cs]
        model.eval()
        scorer = self.scorer(model)
        text = self.to_device(encode(self.tokenizer, [c for c, _ in caps], self.opts.max_seq_length))
        scores = torch.empty(len(caps), len(images))  # (C, I)
        chunk, pair_batch = 1000, int(self.opts.extra.get("pair_batch") or 256)  # images on the device at once
        rank, world = rank_world()
        t0 = time.perf_counter()
        for i0 in range(0, len(images), chunk):
            imgs = self.to_device(self._image_tensors([i for i, _ in images[i0:i0 + chunk]]))
            # under torchrun each process scores a contiguous share of the caption groups of one pass
            per = scorer.captions_per_pass(imgs["image_feat"].shape[0], pair_batch)
            groups = share(-(-len(caps) // per), rank, world)
            rows = (groups.start * per, min(len(caps), groups.stop * per))
            parts = gather_lists([scorer.score_matrix(text, imgs, pair_batch, rows)])
            scores[:, i0:i0 + chunk] = torch.cat(parts)
        gt = torch.tensor([k for _, k in caps])
        metrics = recall_at_k(scores, gt, caption_names=[f"{c[:40]} ({images[k][0]})" for c, k in caps],
                              image_names=[i for i, _ in images])
        seconds = time.perf_counter() - t0
        metrics.update({"captions": len(caps), "images": len(images), "score_head": scorer.head,
                        "pairs_per_s": round(len(caps) * len(images) / max(seconds, 1e-9), 1)})
        top = scores.topk(min(10, len(images)), dim=1).indices
        preds = [{"caption": c, "image_id": images[k][0], "top10": [images[j][0] for j in top[n].tolist()],
                  "rank": int((scores[n] >= scores[n, k]).sum()) - 1}  # ties at their worst, as the metric
                 for n, (c, k) in enumerate(caps)]
        return metrics, preds
