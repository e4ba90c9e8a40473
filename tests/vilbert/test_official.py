"""Converting official ViLBERT checkpoints: random tensors with the official names and shapes."""
import os
import pickle

import pytest
import torch

from vilbert import load_official_checkpoint
from vilbert.official import convert_official_state_dict

from official_state import CFG, official_state

SPOT_CHECKS = [
    ("bert.encoder.c_layer.1.biattention.query1.weight", "backbone.encoder.co_layers.1.visual_attention.query.weight"),
    ("bert.encoder.c_layer.1.biattention.key2.weight", "backbone.encoder.co_layers.1.visual_attention.key.weight"),
    ("bert.encoder.c_layer.1.biattention.value2.bias", "backbone.encoder.co_layers.1.visual_attention.value.bias"),
    ("bert.encoder.c_layer.0.biattention.query2.weight", "backbone.encoder.co_layers.0.text_attention.query.weight"),
    ("bert.encoder.c_layer.0.biattention.key1.weight", "backbone.encoder.co_layers.0.text_attention.key.weight"),
    ("bert.encoder.c_layer.0.biattention.value1.weight", "backbone.encoder.co_layers.0.text_attention.value.weight"),
    ("bert.encoder.c_layer.0.biOutput.dense1.weight",
     "backbone.encoder.co_layers.0.visual_attention_output.dense.weight"),
    ("bert.encoder.c_layer.0.biOutput.LayerNorm2.bias", "backbone.encoder.co_layers.0.text_attention_output.norm.bias"),
    ("bert.encoder.c_layer.1.v_output.LayerNorm.weight", "backbone.encoder.co_layers.1.visual_ffn.output.norm.weight"),
    ("bert.encoder.c_layer.1.t_intermediate.dense.weight", "backbone.encoder.co_layers.1.text_ffn.intermediate.weight"),
    ("bert.encoder.layer.3.attention.self.key.weight", "backbone.encoder.text_layers.3.attention.key.weight"),
    ("bert.encoder.v_layer.1.output.LayerNorm.bias", "backbone.encoder.visual_layers.1.ffn.output.norm.bias"),
    ("bert.v_embeddings.image_location_embeddings.weight", "backbone.image_embeddings.location_projection.weight"),
    ("bert.v_embeddings.image_embeddings.bias", "backbone.image_embeddings.feature_projection.bias"),
    ("bert.t_pooler.dense.weight", "backbone.text_pooler.dense.weight"),
    ("bert.v_pooler.dense.bias", "backbone.image_pooler.dense.bias"),
    ("cls.bi_seq_relationship.weight", "alignment_head.classifier.weight"),
    ("cls.imagePredictions.decoder.weight", "region_head.decoder.weight"),
    ("cls.predictions.transform.LayerNorm.weight", "mlm_head.transform.norm.weight"),
    ("cls.predictions.bias", "mlm_head.bias"),
    ("vil_prediction.logit_fc.0.weight", "task_heads.heads.vqa.hidden.weight"),
    ("vil_prediction.logit_fc.2.weight", "task_heads.heads.vqa.norm.weight"),
    ("vil_prediction_gqa.logit_fc.3.bias", "task_heads.heads.gqa.out.bias"),
    ("vil_binary_prediction.logit_fc.0.weight", "task_heads.heads.nlvr2.hidden.weight"),
    ("vil_logit.weight", "task_heads.heads.retrieval.weight"),
    ("vil_tri_prediction.bias", "task_heads.heads.entailment.bias"),
    ("vision_logit.weight", "task_heads.heads.refer.weight"),
    ("linguisic_logit.bias", "task_heads.heads.token.bias"),
]


def test_every_official_tensor_lands_where_expected():
    state = official_state()
    model, report = convert_official_state_dict(dict(state), CFG)
    ours = model.state_dict()
    for official_key, our_key in SPOT_CHECKS:
        assert torch.equal(ours[our_key], state[official_key]), official_key
    assert not report.missing
    q_dense = sorted(k for k in state if ".q_dense" in k)
    assert sorted(report.unused) == sorted(q_dense + ["cls.predictions.decoder.weight"])
    assert len(report.loaded) == len(state) - len(report.unused)
    assert model.task_heads.spec == {
        "vqa": ("answer", 11), "gqa": ("answer", 5), "nlvr2": ("pair", 2), "retrieval": ("pooled_linear", 1),
        "entailment": ("pooled_linear", 3), "refer": ("region", 1), "token": ("token", 1),
    }
    assert not any("q_dense" in k for k in ours)


def test_task_heads_give_official_style_outputs():
    model, _ = convert_official_state_dict(official_state(), CFG)
    model.eval()
    ids, feat, loc = torch.randint(1, 50, (4, 6)), torch.randn(4, 5, 12), torch.rand(4, 5, 5)
    image_mask = torch.ones(4, 5, dtype=torch.long)
    image_mask[0, 3:] = 0
    with torch.no_grad():
        out = model.backbone(ids, feat, loc, image_mask=image_mask)
        vqa = model.task_logits("vqa", out)
        refer = model.task_logits("refer", out, image_mask)
        pair = model.task_logits("nlvr2", out)
    h = model.task_heads.heads["vqa"]
    fused = out.pooled_text * out.pooled_image
    x = torch.nn.functional.gelu(fused @ h.hidden.weight.T + h.hidden.bias)
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], h.norm.weight, h.norm.bias, 1e-12)
    torch.testing.assert_close(vqa, x @ h.out.weight.T + h.out.bias)
    assert vqa.shape == (4, 11) and pair.shape == (2, 2) and refer.shape == (4, 5, 1)
    assert (refer[0, 3:] == -10000.0).all()


def test_load_from_file_strips_module_prefix_and_detects_task_tokens(tmp_path):
    state = {f"module.{k}": v for k, v in official_state(task_tokens=True).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, report = load_official_checkpoint(tmp_path / "pytorch_model.bin", CFG)
    assert model.config.task_specific_tokens
    out = model.backbone(torch.randint(1, 50, (2, 4)), torch.randn(2, 3, 12), torch.rand(2, 3, 5),
                         task_ids=torch.ones(2, 1, dtype=torch.long))
    assert out.text.shape == (2, 5, CFG.hidden_size)


def test_pretraining_checkpoint_without_task_heads():
    model, report = convert_official_state_dict(official_state(task_heads=False), CFG)
    assert model.task_heads.spec == {}


def test_unknown_and_missing_keys_fail_loudly():
    state = official_state()
    state["bert.encoder.c_layer.0.biattention.logit1.weight"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match="logit1"):
        convert_official_state_dict(state, CFG)
    state = official_state()
    del state["bert.encoder.v_layer.1.attention.self.query.bias"]
    with pytest.raises(ValueError, match="visual_layers.1.attention.query.bias"):
        convert_official_state_dict(state, CFG)
    state = official_state()
    state["bert.t_pooler.dense.weight"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match="shape"):
        convert_official_state_dict(state, CFG)


def test_vilbert_beta_weight_norm_head_is_folded():
    state = official_state(task_heads=False)
    Bi = CFG.bi_hidden_size
    v0, v3 = torch.randn(2 * Bi, Bi), torch.randn(9, 2 * Bi)
    state.update({
        "vil_prediction.main.0.weight_g": torch.tensor(2.5), "vil_prediction.main.0.weight_v": v0,
        "vil_prediction.main.0.bias": torch.zeros(2 * Bi),
        "vil_prediction.main.3.weight_g": torch.tensor(0.5), "vil_prediction.main.3.weight_v": v3,
        "vil_prediction.main.3.bias": torch.ones(9),
        "vil_logit.weight": torch.randn(1, Bi), "vil_logit.bias": torch.zeros(1),
    })
    model, _ = convert_official_state_dict(state, CFG)
    assert model.task_heads.spec["vqa"] == ("answer_relu", 9)
    head = model.task_heads.heads["vqa"]
    torch.testing.assert_close(head.hidden.weight, 2.5 * v0 / v0.norm())
    torch.testing.assert_close(head.out.weight, 0.5 * v3 / v3.norm())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickled_code_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.t_pooler.dense.weight": _Evil()}, f)
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refused: the file holds pickled data .*"
                                         r"nothing from it was run") as raised:
        load_official_checkpoint(tmp_path / "pytorch_model.bin", CFG)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    assert "weights_only=False" not in str(raised.value) and "likely succeed" not in str(raised.value)
    (tmp_path / "junk.bin").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="junk.bin: (refused|not a readable weights-only PyTorch file)"):
        load_official_checkpoint(tmp_path / "junk.bin", CFG)
    with open(tmp_path / "named.bin", "wb") as f:  # protocol 2 names the global: the message does too
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"named.bin: refused: .*\(it names (posix|os)\.system\)"):
        load_official_checkpoint(tmp_path / "named.bin", CFG)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
