"""Referring expressions (RefCOCO+ / RefCOCO / RefCOCOg) in the refer toolkit layout.

    DATA/refs(unc).p       refer toolkit pickle (read with a restricted unpickler)
    DATA/instances.json    COCO annotations: images (id, width, height, file_name), annotations (id, bbox)

Each region (not [IMG]) gets a score from the `refer` region head (a linear layer on its final
visual hidden state). Training targets follow vilbert-multi-task: the IoU of a region with the
referred box where it is >= 0.5, else 0 (`soft_targets=False` gives 1/0); BCE summed over regions,
averaged over expressions. With `gt_features` (shards of ground-truth boxes) training sees the
detected and the ground-truth regions together, as in ViLBERT. Evaluation picks the top-scoring
region and counts a hit by the `iou_rule` (default vilbert-multi-task's: IoU with both end
pixels counted, > 0.5; metrics.IOU_RULES and docs/tasks.md say which code follows which rule);
the training targets use the same IoU.

extra options: gt_features (folder), eval_on_gt (bool), soft_targets (bool, default True),
visualize (int), images (folder of COCO images for --visualize), refs_file (default refs(unc).p;
refs(umd).p for refcocog), iou_rule (vilbert-multi-task, vl-bert, refer or continuous).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import Task, batched, first_seen, log, read_json
from .distributed import is_main
from .features import FeatureStore, check_features, pad_regions, with_img_token
from .metrics import IOU_RULES, check_finite_items, is_hit, rule_iou
from .refer_pickle import load_refs
from .text import encode


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_instances(path: Path) -> tuple[dict, dict, dict]:
    """COCO instances -> ({annotation id: bbox [x, y, w, h]}, {image id: image record}, {annotation id:
    its image_id, where it gives one}), each record checked: a bbox of 4 finite numbers with w, h >= 0
    that does not lie wholly outside its image (vilbert-extract rejects such a box), an image with a
    positive width and height."""
    inst = read_json(path, "COCO instances")
    if not isinstance(inst, dict) or not isinstance(inst.get("annotations"), list) or \
            not isinstance(inst.get("images"), list):
        raise ValueError(f"{path}: expected COCO instances, an object with lists 'images' and 'annotations'")
    boxes, images, ann_images = {}, {}, {}
    for k, im in enumerate(inst["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise ValueError(f"{path}: image #{k} is not an object with an 'id'")
        size = (im.get("width"), im.get("height"))
        if not all(_number(v) and v > 0 for v in size):
            raise ValueError(f"{path}: image {im['id']!r}: width and height {size} are not positive numbers")
        images[im["id"]] = im
    for k, a in enumerate(inst["annotations"]):
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(a, dict) or "id" not in a:
            raise ValueError(f"{path}: annotation #{k} is not an object with an 'id'")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise ValueError(f"{path}: annotation {a['id']!r}: bbox {bbox!r} is not [x, y, w, h] of finite numbers "
                             "with w, h >= 0")
        if "image_id" in a:
            ann_images[a["id"]] = a["image_id"]
            known = isinstance(a["image_id"], (int, str)) and a["image_id"] in images
            check_inside(path, a, images[a["image_id"]] if known else None)
        boxes[a["id"]] = bbox
    return boxes, images, ann_images


def check_inside(path: Path, annotation: dict, image: dict | None) -> None:
    """ValueError naming the annotation if its bbox shares no area with its image (a region of nothing:
    no detection could be a hit); an image instances.json does not list is not checked."""
    if image is None:
        return
    x, y, w, h = annotation["bbox"]
    width, height = image["width"], image["height"]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ValueError(f"{path}: annotation {annotation['id']!r}: bbox {annotation['bbox']!r} lies wholly outside "
                         f"its {width}x{height} image {annotation['image_id']!r}")


def load_refer(data: Path, refs_file: str = "refs(unc).p", instances: tuple | None = None) -> dict[str, list[dict]]:
    """-> {split: [entry]} with one entry per expression: expression, sent_id, ref_id, image_id, box (xyxy).
    `instances`: what load_instances gave for data/instances.json, when it is read already. A ref whose
    image is not its annotation's, and a sent_id in two refs (the refer toolkit indexes sentences by
    it), are one-line errors."""
    refs = load_refs(data / refs_file)
    inst_path = data / "instances.json"
    boxes, _, ann_images = instances or load_instances(inst_path)
    splits: dict[str, list[dict]] = {}
    sentences: dict = {}
    for ref in refs:
        bbox = boxes.get(ref["ann_id"])
        if bbox is None:
            raise ValueError(f"{inst_path}: no annotation {ref['ann_id']} (ref_id {ref['ref_id']} in {refs_file})")
        if ann_images.get(ref["ann_id"], ref["image_id"]) != ref["image_id"]:  # scored on another image's regions
            raise ValueError(f"{data / refs_file}: ref_id {ref['ref_id']} is of image_id {ref['image_id']}, its "
                             f"annotation {ref['ann_id']} of image_id {ann_images[ref['ann_id']]} in {inst_path.name}")
        x, y, w, h = bbox
        sent_ids = ref.get("sent_ids") or []
        for k, sent in enumerate(ref["sentences"]):
            sent_id = sent["sent_id"] if "sent_id" in sent else (sent_ids[k] if k < len(sent_ids) else None)
            if sent_id is not None:  # counted once per ref that holds it
                first_seen(sentences, sent_id, f"ref_id {ref['ref_id']}", "sent_id", data / refs_file)
            splits.setdefault(ref["split"], []).append({
                "expression": sent["raw"], "sent_id": sent_id,
                "ref_id": ref["ref_id"], "image_id": ref["image_id"], "box": [x, y, x + w, y + h],
            })
    return splits


class RefCOCOTask(Task):
    """RefCOCO+ (and, through the subclasses below, RefCOCO and RefCOCOg): the same task on another
    refs pickle."""
    name = "refcoco+"
    default_splits = ("val", "testA", "testB")
    official_task_id = 10  # TASK10 in vilbert-multi-task
    default_refs_file = "refs(unc).p"
    default_batch_size = 256

    def __init__(self, opts):
        super().__init__(opts)
        x = opts.extra
        self.refs_file = x.get("refs_file") or self.default_refs_file
        instances = load_instances(Path(opts.data) / "instances.json")  # read once: COCO's is large
        self.splits = load_refer(Path(opts.data), self.refs_file, instances)
        self.images = instances[1]
        self.load_common()
        self.gt_store = FeatureStore(x["gt_features"]) if x.get("gt_features") else None
        file_names = {i: im["file_name"] for i, im in self.images.items() if isinstance(im.get("file_name"), str)}
        for store in (self.store, self.gt_store):  # an id is found by its image's file name first
            if store is not None:
                store.name_images(file_names)
        if x.get("eval_on_gt") and self.gt_store is None:
            raise ValueError("--eval-on-gt-boxes needs --gt-boxes (shards extracted with vilbert-extract --gt-boxes)")
        self.soft = x.get("soft_targets", True)
        self.given_iou_rule = x.get("iou_rule")
        if self.given_iou_rule is not None and self.given_iou_rule not in IOU_RULES:
            raise ValueError(f"unknown IoU rule {self.given_iou_rule!r} (one of {', '.join(IOU_RULES)})")
        for split, entries in self.splits.items():
            log.info("%s %s: %d expressions", self.name, split, len(entries))
        fine_tuned = opts.train_steps > 0 or bool(opts.epochs)
        used = list(opts.splits or self.default_splits) + (["train"] if fine_tuned else []) + \
            ([opts.val_split] if opts.val_split else [])
        unknown = [split for split in used if split not in self.splits]
        if unknown:  # now, not after fine-tuning
            raise ValueError(f"{Path(opts.data)}: no refs in split(s) {unknown} (have {sorted(self.splits)}); "
                             "choose with --split")
        check_features(self.store, sorted({e["image_id"] for split in used for e in self.splits[split]}), "refer")
        if x.get("eval_on_gt"):  # the evaluated splits read the ground-truth regions: they must all be there
            evaluated = list(opts.splits or self.default_splits) + ([opts.val_split] if opts.val_split else [])
            check_features(self.gt_store, sorted({e["image_id"] for split in evaluated for e in self.splits[split]}),
                           "refer ground-truth-box")

    def head(self):
        if self.arch == "vlbert":  # VL-BERT's final_mlp: the masked-RoI transform, then Linear
            return ("refer", "region_mlp", 1)
        return ("refer", "region", 1)

    @property
    def iou_rule(self) -> str:
        """The given rule, else the official evaluation's of the model's code: refcoco/function/test.py
        for VL-BERT, vilbert-multi-task's for ViLBERT."""
        return self.given_iou_rule or ("vl-bert" if self.arch == "vlbert" else "vilbert-multi-task")

    @property
    def first_candidate(self) -> int:
        """The first visual element that can be picked: VL-BERT's whole image is a box among the others
        (ADD_IMAGE_AS_A_BOX, labelled and scored like them); ViLBERT's [IMG] is not a candidate."""
        return 0 if self.arch == "vlbert" else 1

    # -- batches ---------------------------------------------------------------------------
    def _regions(self, image_id, train: bool):
        """-> feats (N+1, F), loc (N+1, 5), boxes (N+1, 4) pixels: [IMG] + detected (+ gt when training);
        the [IMG] box is the whole image, [0, 0, W - 1, H - 1] as VL-BERT's image box."""
        if not train and self.opts.extra.get("eval_on_gt"):
            r = self.gt_store.get(image_id)
            feats, boxes = r.features, r.boxes
        else:
            r = self.store.get(image_id)
            feats, boxes = r.features, r.boxes
            if train and self.gt_store is not None and image_id in self.gt_store:
                g = self.gt_store.get(image_id)
                feats, boxes = np.concatenate([feats, g.features]), np.concatenate([boxes, g.boxes])
        n = self.opts.max_regions - 1
        feats, boxes = feats[:n], boxes[:n]
        f, loc = with_img_token(feats, boxes, r.width, r.height)
        whole = np.array([[0, 0, r.width - 1, r.height - 1]], np.float32)
        return f, loc, np.concatenate([whole, boxes.astype(np.float32)])

    def make_batch(self, entries: list[dict], train: bool) -> dict:
        regions = [self._regions(e["image_id"], train) for e in entries]
        feat, loc, mask = pad_regions([(f, l) for f, l, _ in regions])  # (B, R, F), (B, R, 5), (B, R)
        B, R = mask.shape
        targets = torch.zeros(B, R)  # (B, R), 0 at padding (and at ViLBERT's [IMG])
        boxes = torch.zeros(B, R, 4)  # (B, R, 4) pixels
        for i, (e, (_, _, bx)) in enumerate(zip(entries, regions)):
            boxes[i, :len(bx)] = torch.from_numpy(bx)
            if self.arch == "vlbert":  # refcoco.py: label = IoU (pixels counted) > 0.5, every box
                targets[i, :len(bx)] = (rule_iou(bx, [e["box"]], "vl-bert")[:, 0] > 0.5).float()
                continue
            iou = rule_iou(bx[1:], [e["box"]], self.iou_rule)[:, 0]  # (N,)
            targets[i, 1:len(bx)] = torch.where(iou >= 0.5, iou if self.soft else torch.ones_like(iou), 0.0)
        text = encode(self.tokenizer, [e["expression"] for e in entries], self.opts.max_seq_length)
        return {**text, "image_feat": feat, "image_loc": loc, "image_mask": mask, "targets": targets,
                "boxes": boxes, "gt_boxes": torch.tensor([e["box"] for e in entries], dtype=torch.float32)}

    def train_items(self):
        train = self.splits.get("train")
        if not train:
            raise ValueError(f"{Path(self.opts.data) / self.refs_file}: no refs in split 'train'")
        return train

    def collate(self, items, rng):
        return self.make_batch(items, train=True)

    def region_logits(self, model, batch) -> torch.Tensor:
        """(B, R) scores; padding (and ViLBERT's [IMG]) pushed to -10000 so they are never picked."""
        out = self.backbone(model, batch)
        return model.task_logits("refer", out, self.candidates(batch))[..., 0]

    def candidates(self, batch) -> torch.Tensor:
        """(B, R) bool: the visual elements that can be picked."""
        valid = batch["image_mask"].bool().clone()
        valid[:, :self.first_candidate] = False
        return valid

    def loss(self, model, batch):
        logits = self.region_logits(model, batch)  # (B, R)
        valid = self.candidates(batch)
        bce = F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="none")  # (B, R)
        if self.arch == "vlbert":  # the official mean over every real box of the batch
            return bce[valid].mean()
        return (bce * valid).sum() / logits.shape[0]  # vilbert-multi-task: summed, per expression

    # -- evaluation ------------------------------------------------------------------------
    def has_labels(self, split: str) -> bool:
        """Every ref has its box; a split without refs cannot be evaluated (the error of `evaluate`)."""
        self.split_entries(split)
        return True

    def split_entries(self, split: str) -> list[dict]:
        entries = self.splits.get(split)
        if not entries:
            raise ValueError(f"{Path(self.opts.data)}: no refs in split {split!r} (have {sorted(self.splits)})")
        return entries

    @torch.no_grad()
    def evaluate(self, model, split):
        entries = self.split_entries(split)
        model.eval()

        def run(chunk, batch):
            first = self.first_candidate
            logits = self.region_logits(model, batch)  # (B, R)
            finite = (torch.isfinite(logits) | ~self.candidates(batch)).all(1).cpu()  # (B,) over the candidates
            top = logits.argmax(1).cpu() - first  # (B,) among the candidates
            sizes, boxes = batch["image_mask"].sum(1).cpu(), batch["boxes"].cpu()
            out = []
            for i, e in enumerate(chunk):
                bx = boxes[i, first:int(sizes[i])]  # (N, 4) the candidates' boxes
                ious = rule_iou(bx, [e["box"]], self.iou_rule)[:, 0]  # (N,)
                pick = ious[top[i]]
                out.append((bx[top[i]].tolist(), float(pick), bool(is_hit(pick, self.iou_rule)),
                            bool(is_hit(ious, self.iou_rule).any()), bool(finite[i])))
            return out

        outputs = self.map_chunks(list(batched(entries, self.opts.eval_batch_size)),
                                  lambda chunk: self.make_batch(chunk, train=False), run)
        check_finite_items([o[-1] for o in outputs], [e["sent_id"] for e in entries], f"{self.name} {split}",
                           "expressions")
        preds, hits, reachable = [], 0, 0
        for e, (box, iou, hit, can_hit, _) in zip(entries, outputs):
            hits += hit
            reachable += can_hit
            preds.append({"sent_id": e["sent_id"], "ref_id": e["ref_id"], "image_id": e["image_id"],
                          "expression": e["expression"], "pred_box": [round(float(v), 2) for v in box],
                          "gt_box": [round(float(v), 2) for v in e["box"]], "iou": round(iou, 4), "hit": hit})
        metrics = {"accuracy": hits / len(entries), "upper_bound": reachable / len(entries), "count": len(entries)}
        n_vis = int(self.opts.extra.get("visualize") or 0)
        if n_vis and is_main():  # one process draws
            from .visualize import draw_referring

            folder = Path(self.opts.out) / "visualize" / split
            for p in preds[:n_vis]:
                try:
                    draw_referring(p, self.images.get(p["image_id"], {}), self.opts.extra.get("images"), folder)
                except Exception as error:  # a picture (a decompression bomb, too) never costs the results
                    log.warning("picture of sentence %s (image %s) not drawn: %s", p["sent_id"], p["image_id"], error)
        return metrics, preds


class RefCOCOUncTask(RefCOCOTask):
    """RefCOCO (UNC splits: refs(unc).p of the refcoco folder)."""
    name = "refcoco"
    official_task_id = 9  # TASK9


class RefCOCOgTask(RefCOCOTask):
    """RefCOCOg (UMD splits: refs(umd).p, train / val / test)."""
    name = "refcocog"
    default_splits = ("val", "test")
    official_task_id = 11  # TASK11
    default_refs_file = "refs(umd).p"
