"""Feature recipes: the test-time conventions that decide which regions an image gets.

The published bottom-up-attention features (ViLBERT, VL-BERT, LXMERT, BUTD) came from the Caffe
pipeline (peteanderson80/bottom-up-attention: `tools/generate_tsv.py`, `lib/rpn/proposal_layer.py`,
`lib/fast_rcnn/test.py`, `bbox_transform.py`, `generate_anchors.py`, `lib/nms`). Its ports
(py-bottom-up-attention, the HF frcnn) run the same weights with detectron2's conventions, which
select other regions. Both recipes are here, rule by rule; docs/extractor.md has the table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    # resize: "opencv-scale" = cv2.resize(mean-subtracted float32 BGR, fx=fy=scale, INTER_LINEAR);
    # "bilinear-size" = a bilinear resize to round(side * scale) pixels of the uint8 image
    resize: str
    # +1 pixel convention: a box [x1, x2] is x2 - x1 + 1 wide (widths, areas, IoU, clipping to W - 1)
    box_offset: float
    # anchors: "caffe" = generate_anchors (rounded sides, centred on (7.5, 7.5) of each 16-px cell);
    # "centred" = detectron2's DefaultAnchorGenerator (exact sides, centred on the cell's corner)
    anchors: str
    # the proposal layer drops boxes with a side < rpn_min_size * scale before its top-k (Caffe) or
    # keeps the top-k first and then drops empty boxes (detectron2, min size 0)
    filter_before_topk: bool
    rpn_min_size: float
    # detectron2 clamps dw, dh at log(1000 / 16) before exp; Caffe does not
    clamp_deltas: bool
    # regions of the threshold branch (between min and max boxes) in proposal order (Caffe:
    # np.where(max_conf >= thresh)) or best score first (detectron2 ports)
    threshold_order: str


RECIPES = {
    "caffe": Recipe(name="caffe", resize="opencv-scale", box_offset=1.0, anchors="caffe",
                    filter_before_topk=True, rpn_min_size=16.0, clamp_deltas=False, threshold_order="proposal"),
    "detectron2": Recipe(name="detectron2", resize="bilinear-size", box_offset=0.0, anchors="centred",
                         filter_before_topk=False, rpn_min_size=0.0, clamp_deltas=True, threshold_order="score"),
}
DEFAULT_RECIPE = "caffe"


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown feature recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]
