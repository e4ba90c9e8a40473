"""--backend detectron2 gives the same outputs as the torch backend on shared random weights.
Skipped when detectron2 is not installed (it is not on PyPI); NEVER RUN so far."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from extractor.backend_detectron2 import Detectron2BottomUpDetector
from extractor.config import tiny_config
from extractor.detector import BottomUpDetector


def test_backends_agree_on_shared_random_weights():
    config = tiny_config(use_attributes=True)
    ours = BottomUpDetector(config)
    ours.random_init(5)
    theirs = Detectron2BottomUpDetector(config)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    (a,), _ = ours.eval()([image])
    (b,), _ = theirs.eval()([image])
    assert torch.allclose(a.boxes, b.boxes, atol=1e-3)
    assert torch.allclose(a.features, b.features, atol=1e-3)
    assert torch.allclose(a.cls_probs, b.cls_probs, atol=1e-5)
    assert torch.allclose(a.attr_probs, b.attr_probs, atol=1e-5)
