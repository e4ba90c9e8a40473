"""Task metrics: box IoU, referring-expression hit rate, retrieval recall@k (VQA: vqa_eval.py)."""
from __future__ import annotations

import numpy as np
import torch


def box_iou(a, b, pixel_inclusive: bool = False) -> torch.Tensor:
    """IoU of every box in `a` (N, 4) with every box in `b` (K, 4), x1 y1 x2 y2 -> (N, K).
    Continuous coordinates by default; `pixel_inclusive`: Caffe-era boxes that count both end pixels
    (width x2 - x1 + 1, an intersection x2 - x1 + 1 clamped at 0), as vilbert-multi-task's and
    VL-BERT's refer code. Degenerate boxes have IoU 0."""
    a = torch.as_tensor(a, dtype=torch.float32).reshape(-1, 4)
    b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
    one = 1.0 if pixel_inclusive else 0.0
    area_a = (a[:, 2] - a[:, 0] + one).clamp(min=0) * (a[:, 3] - a[:, 1] + one).clamp(min=0)  # (N,)
    area_b = (b[:, 2] - b[:, 0] + one).clamp(min=0) * (b[:, 3] - b[:, 1] + one).clamp(min=0)  # (K,)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, K, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt + one).clamp(min=0).prod(-1)  # (N, K)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def refer_toolkit_iou(a, b) -> torch.Tensor:
    """The refer toolkit's `computeIoU` (pyEvalDemo), on x1 y1 x2 y2 boxes: on its x, y, w, h boxes
    it takes x + w - 1 as the last pixel and adds the 1 back, so an intersection is continuous,
    except that one at most one pixel wide or high counts as none; areas are w x h."""
    a = torch.as_tensor(a, dtype=torch.float32).reshape(-1, 4)
    b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (N,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (K,)
    side = torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, K, 2)
    inter = torch.where((side > 1).all(-1), side.prod(-1), torch.zeros_like(side[..., 0]))  # (N, K)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


# how a predicted box is judged against the referred one: (IoU function, a hit is IoU > 0.5 or >= 0.5)
IOU_RULES = {
    "vilbert-multi-task": (lambda a, b: box_iou(a, b, pixel_inclusive=True), "> 0.5"),  # task_utils.py V-logit
    "vl-bert": (lambda a, b: box_iou(a, b, pixel_inclusive=True), ">= 0.5"),  # refcoco/function/test.py
    "refer": (refer_toolkit_iou, ">= 0.5"),  # the refer toolkit's pyEvalDemo
    "continuous": (box_iou, ">= 0.5"),  # no pixel convention (torchvision / detectron2 IoU)
}


def is_hit(iou: torch.Tensor, rule: str) -> torch.Tensor:
    """IoU above the rule's threshold: > 0.5 for vilbert-multi-task, >= 0.5 for the others."""
    return iou > 0.5 if IOU_RULES[rule][1] == "> 0.5" else iou >= 0.5


def rule_iou(a, b, rule: str) -> torch.Tensor:
    if rule not in IOU_RULES:
        raise ValueError(f"unknown IoU rule {rule!r} (one of {', '.join(IOU_RULES)})")
    return IOU_RULES[rule][0](a, b)


def hit_rate(pred_boxes, gt_boxes, rule: str = "continuous") -> tuple[float, list[bool]]:
    """Fraction of predictions whose IoU with their own ground-truth box is a hit under `rule`."""
    pred = torch.as_tensor(np.asarray(pred_boxes, np.float32)).reshape(-1, 4)
    gt = torch.as_tensor(np.asarray(gt_boxes, np.float32)).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} ground-truth boxes")
    if len(pred) == 0:
        return 0.0, []
    ious = rule_iou(pred, gt, rule).diagonal()  # (N,)
    hits = is_hit(ious, rule).tolist()
    return sum(hits) / len(hits), hits


def check_finite_scores(scores: torch.Tensor, caption_names=None, image_names=None) -> None:
    """ValueError naming the (caption, image) pairs whose score is NaN or infinite: such a score
    would rank as anything, and a recall computed over it means nothing."""
    bad = (~torch.isfinite(scores)).nonzero().tolist()
    if bad:
        def name(names, k, kind):
            return repr(names[k]) if names is not None else f"{kind} #{k}"

        shown = ", ".join(f"({name(caption_names, c, 'caption')}, {name(image_names, i, 'image')})"
                          for c, i in bad[:5])
        raise ValueError(f"{len(bad)} of {scores.numel()} caption-image scores are not finite, e.g. {shown}: "
                         "check the features of those images (NaN or infinite values) and the model")


def check_finite_items(finite, ids, where: str, what: str = "items") -> None:
    """ValueError naming `where` (task and split) and how many of the items have a score that is NaN
    or infinite (finite: one bool per item, ids: theirs): an argmax over such scores still picks
    something, and an accuracy over those picks means nothing."""
    finite = [bool(f) for f in finite]
    bad = [i for i, ok in zip(ids, finite) if not ok]
    if bad:
        shown = ", ".join(repr(i) for i in bad[:5])
        raise ValueError(f"{where}: {len(bad)} of {len(finite)} {what} have scores that are not finite (NaN or "
                         f"infinite), e.g. {shown}: check the model's weights and the features of their images")


def recall_at_k(scores, caption_image, ks=(1, 5, 10), caption_names=None, image_names=None) -> dict[str, float]:
    """Retrieval recall. scores: (C, I) caption x image similarity; caption_image: (C,) index of
    each caption's image. Text->image: the rank of the caption's image among all images.
    Image->text: the rank of the best-scored of the image's own captions among the other images'
    captions (images without a caption are skipped). A tie ranks at its worst (every other
    candidate with the same score counts as better), so identical scores never look like hits; a
    non-finite score is a ValueError naming the pairs. Returns {"t2i_R@k", "i2t_R@k", and the
    official median and mean rank, floor(median(rank) + 1) and mean(rank) + 1} with recalls as
    fractions."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    gt = torch.as_tensor(caption_image, dtype=torch.long)
    C, I = scores.shape
    if C == 0 or I == 0:
        raise ValueError(f"retrieval needs captions and images, got {C} captions and {I} images")
    check_finite_scores(scores, caption_names, image_names)
    own_pair = gt[:, None] == torch.arange(I)[None, :]  # (C, I) the caption's own image
    own = scores[torch.arange(C), gt]  # (C,)
    t2i_rank = ((scores >= own[:, None]) & ~own_pair).sum(1)  # (C,) other images scoring at least as high
    has_caption = own_pair.any(0)  # (I,)
    best_own = torch.where(own_pair, scores, torch.full_like(scores, -torch.inf)).max(0).values  # (I,)
    i2t_rank = ((scores >= best_own[None, :]) & ~own_pair).sum(0)[has_caption]  # (I',) other images' captions
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i_rank < k).double().mean())
        out[f"i2t_R@{k}"] = float((i2t_rank < k).double().mean())
    for kind, rank in (("t2i", t2i_rank), ("i2t", i2t_rank)):
        out[f"{kind}_medr"] = float(np.floor(np.median(rank.numpy()) + 1))
        out[f"{kind}_meanr"] = float(rank.double().mean() + 1)
    return out


def vcr_accuracies(answer_scores, answer_labels, rationale_scores, rationale_labels, ids=None) -> dict[str, float]:
    """VCR's three accuracies, as vilbert-multi-task's `script/VCR_Q_AR_evaluation.py` computes them.
    answer_scores, rationale_scores: (N, 4) scores of the four choices of each question (the rationale
    ones given the right answer); labels: (N,) indices. A question's pick is its first highest-scoring
    choice (the official np.argmax). q2a: the answer is right; qa2r: the rationale is right; q2ar:
    both are right for the same question. A non-finite score is a ValueError naming the questions."""
    a = np.asarray(answer_scores, np.float64)
    r = np.asarray(rationale_scores, np.float64)
    if a.ndim != 2 or a.shape != r.shape or len(a) == 0:
        raise ValueError(f"VCR scores must be two (N, choices) arrays with N > 0, got {a.shape} and {r.shape}")
    bad = np.flatnonzero(~(np.isfinite(a).all(1) & np.isfinite(r).all(1)))
    if len(bad):
        shown = ", ".join(repr(ids[k]) if ids is not None else f"#{k}" for k in bad[:5])
        raise ValueError(f"{len(bad)} of {len(a)} VCR questions have a score that is not finite, e.g. {shown}: "
                         "check the features of their images (NaN or infinite values) and the model")
    answer_right = a.argmax(1) == np.asarray(answer_labels)
    rationale_right = r.argmax(1) == np.asarray(rationale_labels)
    return {"q2a": float(answer_right.mean()), "qa2r": float(rationale_right.mean()),
            "q2ar": float((answer_right & rationale_right).mean())}
