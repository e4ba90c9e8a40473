"""The detector: detectron2 parameter names, bottom-up architecture details, real R101 config."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractor.boxes import apply_deltas, cell_anchors
from extractor.config import r101_config, tiny_config
from extractor.detector import BottomUpDetector, build_detector, resize_scale
from extractor.resnet import BasicStem, BottleneckBlock, ConvNorm, FrozenBatchNorm2d


def test_parameter_names_follow_detectron2():
    names = set(BottomUpDetector(tiny_config(use_attributes=True)).state_dict())
    for expected in [
        "backbone.stem.conv1.weight", "backbone.stem.conv1.norm.running_var",
        "backbone.res2.0.shortcut.weight", "backbone.res2.0.conv1.norm.weight",
        "backbone.res2.0.conv1.norm.bias", "backbone.res2.0.conv1.norm.running_mean",
        "backbone.res4.0.conv3.weight", "proposal_generator.rpn_head.conv.weight",
        "proposal_generator.rpn_head.objectness_logits.bias",
        "proposal_generator.rpn_head.anchor_deltas.weight", "roi_heads.res5.0.shortcut.norm.bias",
        "roi_heads.res5.0.conv2.weight", "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.cls_embedding.weight",
        "roi_heads.box_predictor.fc_attr.weight", "roi_heads.box_predictor.attr_score.bias",
    ]:
        assert expected in names, expected
    assert not any("num_batches_tracked" in n or "anchor" in n and "deltas" not in n for n in names)


def test_r101_shapes_match_the_published_network():
    model = BottomUpDetector(r101_config(use_attributes=True))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert len([n for n in shapes if n.startswith("backbone.res4.") and n.endswith("conv1.weight")]) == 23
    assert shapes["proposal_generator.rpn_head.conv.weight"] == (512, 1024, 3, 3)  # hidden 512
    assert shapes["proposal_generator.rpn_head.objectness_logits.weight"] == (12, 512, 1, 1)
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (1601, 2048)
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (6400, 2048)
    assert shapes["roi_heads.box_predictor.cls_embedding.weight"] == (1601, 256)
    assert shapes["roi_heads.box_predictor.fc_attr.weight"] == (512, 2304)
    assert shapes["roi_heads.box_predictor.attr_score.weight"] == (401, 512)
    res5 = model.roi_heads.res5
    assert res5[0].conv1.stride == (1, 1) and res5[0].shortcut.stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2) for block in res5)


def test_frozen_batchnorm_formula():
    norm = FrozenBatchNorm2d(2)
    norm.weight.copy_(torch.tensor([2.0, 1.0]))
    norm.bias.copy_(torch.tensor([1.0, 0.0]))
    norm.running_mean.copy_(torch.tensor([3.0, 0.0]))
    norm.running_var.copy_(torch.tensor([4.0 - 1e-5, 1.0 - 1e-5]))
    x = torch.tensor([5.0, 7.0]).view(1, 2, 1, 1)
    assert torch.allclose(norm(x).flatten(), torch.tensor([2 * (5 - 3) / 2 + 1, 7.0]), atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_with_its_norm_folded_in_is_conv_then_norm(channels_last):
    """ConvNorm runs one conv on weight * scale with bias shift: the same as the conv followed by
    the frozen norm (what detectron2 computes), by hand, for dilated and strided convs."""
    torch.manual_seed(0)
    for conv in (ConvNorm(3, 5, 3, stride=1, padding=2, dilation=2), ConvNorm(3, 5, 1, stride=2)):
        conv.weight.data.normal_()
        conv.norm.weight.uniform_(0.5, 2)
        conv.norm.bias.normal_()
        conv.norm.running_mean.normal_()
        conv.norm.running_var.uniform_(0.5, 3)
        x = torch.randn(2, 3, 9, 11)
        if channels_last:
            conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        plain = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)  # (2, 5, h, w)
        n = conv.norm
        expected = (plain - n.running_mean.view(1, -1, 1, 1)) / (n.running_var.view(1, -1, 1, 1) + n.eps).sqrt() \
            * n.weight.view(1, -1, 1, 1) + n.bias.view(1, -1, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        assert sorted(conv.state_dict()) == ["norm.bias", "norm.running_mean", "norm.running_var", "norm.weight",
                                             "weight"]  # detectron2's keys, nothing folded is saved


@pytest.mark.parametrize("in_channels", [8, 4])  # identity shortcut, projection shortcut
def test_bottleneck_in_place_ops_leave_the_input_alone(in_channels):
    """The block's in-place ReLUs and residual add give relu(conv3(relu(conv2(relu(conv1(x))))) + s(x))
    and never write into x (the previous block's output, or the res4 map the RPN also reads)."""
    torch.manual_seed(0)
    block = BottleneckBlock(in_channels, 3, 8, dilation=2)
    for conv in (block.conv1, block.conv2, block.conv3, block.shortcut):
        if conv is not None:
            conv.weight.data.normal_()
            conv.norm.bias.normal_()
    x = torch.randn(2, in_channels, 7, 6)
    before = x.clone()
    with torch.no_grad():
        out = block(x)
        hidden = F.relu(block.conv2(F.relu(block.conv1(x))))
        identity = x if block.shortcut is None else block.shortcut(x)
        expected = F.relu(block.conv3(hidden) + identity)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, expected)
    assert (out == 0).any() and (out > 0).any()  # the ReLU did something


def test_caffe_maxpool_uses_ceil_mode_and_no_padding():
    stem = BasicStem(4, caffe_maxpool=True)
    assert stem(torch.zeros(1, 3, 100, 100)).shape[-2:] == (25, 25)  # conv 50 -> ceil((50-3)/2)+1
    assert BasicStem(4, caffe_maxpool=False)(torch.zeros(1, 3, 100, 100)).shape[-2:] == (25, 25)
    assert stem(torch.zeros(1, 3, 98, 98)).shape[-2:] == (24, 24)  # 49 -> ceil(46/2)+1 = 24
    assert BasicStem(4, caffe_maxpool=False)(torch.zeros(1, 3, 98, 98)).shape[-2:] == (25, 25)


def test_test_scale_rule():
    assert resize_scale(300, 400, 600, 1000) == 2.0  # shortest edge to 600
    assert resize_scale(100, 500, 600, 1000) == 2.0  # 600 would make the long edge 3000 -> 1000/500


def test_anchors_and_delta_decoding_by_hand():
    anchors = cell_anchors([64.0], [0.5, 1.0, 2.0])
    assert torch.allclose(anchors[1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    width = float(np.sqrt(64 * 64 / 0.5))
    assert torch.allclose(anchors[0], torch.tensor([-width / 2, -width / 4, width / 2, width / 4]))
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[0.1, 0.0, np.log(2.0), 0.0]])
    # centre x 5 + 0.1*10 = 6; width 20 -> x 6 +- 10; y unchanged
    assert torch.allclose(apply_deltas(deltas, box, (1, 1, 1, 1)), torch.tensor([[-4.0, 0.0, 16.0, 20.0]]))


def test_tiny_detector_outputs(tiny_detector):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)]
    outputs, scales = tiny_detector(images)
    assert scales == [pytest.approx(2.0), pytest.approx(96 / 20)]
    for output, scale in zip(outputs, scales):
        count = len(output.boxes)
        assert 1 <= count <= tiny_detector.config.rpn_post_nms_topk
        sides = torch.minimum(output.boxes[:, 2] - output.boxes[:, 0], output.boxes[:, 3] - output.boxes[:, 1])
        assert (sides + 1 >= 16 * scale - 1e-4).all()  # Caffe's proposal filter: 16 original pixels, +1 rule
        assert output.features.shape == (count, 256)
        assert output.cls_probs.shape == (count, 1601) and output.attr_probs.shape == (count, 401)
        assert torch.allclose(output.cls_probs.sum(1), torch.ones(count), atol=1e-4)
    # deterministic seeded random init: same weights, same outputs
    again, _ = tiny_detector(images)
    assert torch.equal(again[0].features, outputs[0].features)
    # given boxes (original pixels) -> exactly those boxes, scaled into the resized image
    given, _ = tiny_detector(images[:1], [np.array([[0, 0, 32, 24], [10, 10, 60, 40]], np.float32)])
    assert torch.allclose(given[0].boxes, torch.tensor([[0.0, 0, 64, 48], [20, 20, 120, 80]]))


def test_no_weights_warns_loudly():
    with pytest.warns(UserWarning, match="NO DETECTOR WEIGHTS"):
        model = build_detector(tiny_config())
    assert model.weights_hash == "random-init"


def test_bf16_autocast_keeps_the_classifier_in_float32(tiny_detector):
    """Under bf16 autocast the backbone and res5 run in bf16, but the class distributions (the
    masked-region targets) come from a float32 classifier over those features: bf16 logits tie."""
    tiny_detector.autocast_dtype = torch.bfloat16
    try:
        outputs, _ = tiny_detector([np.full((40, 40, 3), 128, np.uint8), np.asarray(
            __import__("extract_helpers").make_image(48, 40))])
    finally:
        tiny_detector.autocast_dtype = None
    classifier = tiny_detector.roi_heads.box_predictor.cls_score
    for out in outputs:
        assert torch.isfinite(out.features).all() and out.cls_probs.dtype == torch.float32
        with torch.no_grad():
            expected = classifier(out.features).softmax(dim=-1)  # fp32 on the (bf16-computed) features
            in_bf16 = F.linear(out.features.bfloat16(), classifier.weight.bfloat16(),
                               classifier.bias.bfloat16()).float().softmax(dim=-1)
        torch.testing.assert_close(out.cls_probs, expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(out.cls_probs, in_bf16, rtol=1e-5, atol=1e-7)  # the test can tell


def test_real_r101_runs_once_on_a_small_image():
    config = r101_config().replace(test_min_size=128, test_max_size=192, rpn_post_nms_topk=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_detector(config)
    image = np.asarray(__import__("extract_helpers").make_image(64, 48))
    outputs, scales = model([image])
    assert scales == [pytest.approx(128 / 48)]
    assert outputs[0].features.shape[1] == 2048 and outputs[0].cls_probs.shape[1] == 1601
    assert 1 <= len(outputs[0].boxes) <= 10 and torch.isfinite(outputs[0].features).all()


def test_channels_last_gives_the_same_regions():
    """NHWC convolutions (the default on a GPU) change the memory layout only: same boxes,
    features and class distributions, and the layout reaches the res5 head."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = build_detector(tiny_config(), channels_last=False)
        nhwc = build_detector(tiny_config(), channels_last=True)
    assert not plain.channels_last and nhwc.channels_last
    assert nhwc.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    make_image = __import__("extract_helpers").make_image
    images = [np.asarray(make_image(64, 48)), np.asarray(make_image(50, 70))]
    formats = []
    nhwc.roi_heads.res5.register_forward_pre_hook(
        lambda module, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    expected, _ = plain(images)
    got, _ = nhwc(images)
    assert formats == [True]
    for a, b in zip(expected, got):
        torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=1e-3)  # float rounding of other kernels
        torch.testing.assert_close(b.features, a.features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.cls_probs, a.cls_probs, rtol=1e-4, atol=1e-6)


def test_prepare_makes_the_network_input_from_arrays_and_tensors(tiny_detector):
    """RGB uint8 -> BGR minus the pixel mean, resized by the shortest-edge rule (the caffe recipe:
    cv2.resize by the scale itself); numpy arrays (even flipped views) and tensors give the same input."""
    from extractor.images import pixel_tensor

    cfg = tiny_detector.config
    first = np.zeros((20, 30, 3), np.uint8)
    first[..., 0], first[..., 1], first[..., 2] = 200, 100, 50  # R, G, B
    second = np.arange(40 * 20 * 3, dtype=np.uint8).reshape(40, 20, 3)
    (one, scale_one), (two, _) = tiny_detector.prepare(first), tiny_detector.prepare(second[:, ::-1])
    scale = resize_scale(20, 30, cfg.test_min_size, cfg.test_max_size)
    assert scale_one == scale and one.shape == (3, round(20 * scale), round(30 * scale))
    mean = torch.tensor(cfg.pixel_mean_bgr)
    torch.testing.assert_close(one[:, 3, 3], torch.tensor([50.0, 100.0, 200.0]) - mean)  # B, G, R
    assert torch.equal(tiny_detector.prepare(pixel_tensor(first))[0], one)
    assert torch.equal(tiny_detector.prepare(torch.from_numpy(second[:, ::-1].copy()))[0], two)
