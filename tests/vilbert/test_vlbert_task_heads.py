"""VL-BERT's task heads (each task's `final_mlp` in jackroos/VL-BERT), computed here by hand, their
initial values, and the conversion of a fine-tuned VQA model's head through `load_official_checkpoint`."""
import math

import pytest
import torch
import torch.nn.functional as F

from vilbert import ViLBert, load_official_checkpoint, load_preset
from vilbert.model import BackboneOutput

from official_state import VLBERT_CFG, official_vlbert_state

CFG = load_preset("vlbert-tiny", vocab_size=40, v_feature_size=12, v_target_size=7, max_position_embeddings=24)


def random_output(B=3, T=6, R=5, D=CFG.hidden_size):
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(B, T, D, generator=g), torch.randn(B, R, D, generator=g)
    return BackboneOutput(text, image, torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))


def model_with_heads():
    torch.manual_seed(0)
    model = ViLBert(CFG)
    for name, kind, n in (("vqa", "masked_answer", 9), ("refer", "region_mlp", 1), ("vcr", "cls_linear", 1)):
        model.add_task_head(name, kind, n)
    for p in model.task_heads.parameters():  # biases and norms away from their initial values
        p.data.normal_(0, 0.5)
    return model.eval()


def test_masked_answer_reads_the_mask_position_through_the_mlm_transform():
    model, out = model_with_heads(), random_output()
    positions = torch.tensor([1, 4, 2])
    head = model.task_heads.heads["vqa"]
    h = out.text[torch.arange(3), positions]  # (B, D)
    x = F.gelu(h @ head.transform.dense.weight.T + head.transform.dense.bias)
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + CFG.layer_norm_eps)
    x = x * head.transform.norm.weight + head.transform.norm.bias
    expected = x @ head.out.weight.T + head.out.bias  # (B, 9)
    got = model.task_logits("vqa", out, positions=positions)
    assert got.shape == (3, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the positions"):
        model.task_logits("vqa", out)


def test_region_mlp_scores_every_region_and_masks_the_padding():
    model, out = model_with_heads(), random_output()
    head = model.task_heads.heads["refer"]
    expected = F.gelu(out.image @ head.dense.weight.T + head.dense.bias) @ head.out.weight.T + head.out.bias
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    got = model.task_logits("refer", out, mask)
    assert got.shape == (3, 5, 1)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    assert (got[~mask.bool()] == -10000.0).all()


def test_cls_linear_reads_the_pooled_cls():
    model, out = model_with_heads(), random_output()
    head = model.task_heads.heads["vcr"]
    torch.testing.assert_close(model.task_logits("vcr", out), out.pooled_text @ head.out.weight.T + head.out.bias)


def test_fresh_heads_start_as_the_official_final_mlp():
    torch.manual_seed(0)
    model = ViLBert(CFG)
    model.add_task_head("vqa", "masked_answer", 9)
    model.add_task_head("refer", "region_mlp", 1)
    model.add_task_head("vcr", "cls_linear", 1)
    heads = model.task_heads.heads
    # the transforms are copies of the pretrained heads' (PARTIAL_PRETRAIN_PREFIX_CHANGES of the configs)
    for ours, pretrained in [(heads["vqa"].transform.dense.weight, model.mlm_head.transform.dense.weight),
                             (heads["vqa"].transform.norm.bias, model.mlm_head.transform.norm.bias),
                             (heads["refer"].dense.weight, model.region_head.dense.weight),
                             (heads["refer"].dense.bias, model.region_head.dense.bias)]:
        assert torch.equal(ours, pretrained) and ours.data_ptr() != pretrained.data_ptr()
    # the new layers: Xavier-uniform weights, zero biases (init_weight of the task modules)
    for layer in (heads["vqa"].out, heads["refer"].out, heads["vcr"].out):
        bound = math.sqrt(6 / sum(layer.weight.shape))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.5 * bound
        assert (layer.bias == 0).all()


def test_vlbert_heads_need_a_vlbert_model():
    model = ViLBert(load_preset("vilbert-tiny", vocab_size=40, v_feature_size=12, v_target_size=7))
    with pytest.raises(ValueError, match="VL-BERT's"):
        model.add_task_head("vqa", "masked_answer", 9)


def test_official_vqa_model_loads_through_the_common_loader(tmp_path):
    state = official_vlbert_state(kind="vqa")
    path = tmp_path / "vl-bert_base_res101_vqa-0004.model"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, path)
    model, report = load_official_checkpoint(path, VLBERT_CFG)  # recognised as VL-BERT by its keys
    assert model.config == VLBERT_CFG and model.task_heads.spec == {"vqa": ("masked_answer", 11)}
    assert torch.equal(model.task_heads.heads["vqa"].out.weight, state["final_mlp.2.weight"])
    with pytest.raises(ValueError, match="fixes its own sizes"):
        load_official_checkpoint(path, load_preset("vilbert-tiny"))


def test_a_final_mlp_of_another_layout_is_refused_with_the_reason(tmp_path):
    state = official_vlbert_state(kind="vqa")
    del state["final_mlp.0.LayerNorm.weight"], state["final_mlp.0.LayerNorm.bias"]  # a 2fc-like layout
    state["final_mlp.4.weight"] = torch.randn(11, 11)
    path = tmp_path / "vqa_2fc.model"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"vqa_2fc.model: its final_mlp .* is not the VQA head of CLASSIFIER_TYPE mlm"):
        load_official_checkpoint(path, VLBERT_CFG)
