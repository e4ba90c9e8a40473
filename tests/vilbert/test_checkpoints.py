"""The project's safetensors checkpoints and initialisation from a Hugging Face BERT directory."""
import json

import pytest
import torch
from transformers import BertConfig, BertForPreTraining, BertModel

from vilbert import ViLBert, ViLBertConfig, load_bert_weights, load_preset, load_pretrained, save_pretrained


def tiny_bert_dir(tmp_path, safe=True):
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(0)
    bert = BertForPreTraining(cfg).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial
        for p in bert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bert.save_pretrained(tmp_path / "bert", safe_serialization=safe)
    return tmp_path / "bert"


def text_config(arch="vilbert", **kw):
    return load_preset(f"{arch}-tiny", vocab_size=60, v_feature_size=12, v_target_size=5, **kw)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ViLBert(text_config(task_specific_tokens=True), {"vqa": ("answer", 9), "refer": ("region", 1)}).eval()
    save_pretrained(model, tmp_path / "ckpt", metadata={"recipe": {"detector": "x"}})
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert doc["config"]["task_specific_tokens"] is True and doc["task_heads"]["vqa"] == ["answer", 9]
    assert ViLBertConfig.from_json(tmp_path / "ckpt" / "config.json") == model.config  # usable as a config file
    again = load_pretrained(tmp_path / "ckpt").eval()
    assert again.checkpoint_metadata == {"recipe": {"detector": "x"}}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    # the tie survives loading
    assert again.mlm_head.word_embeddings.weight is again.backbone.embeddings.word_embeddings.weight


def test_load_pretrained_refuses_a_mismatched_checkpoint(tmp_path):
    save_pretrained(ViLBert(text_config()), tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "config.json").read_text())
    doc["config"]["num_hidden_layers"] = 5
    doc["config"]["t_biattention_id"] = [2, 3]
    (tmp_path / "a" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("safe", [True, False])
def test_bert_weights_land_and_text_stream_equals_bert(tmp_path, safe):
    bert_dir = tiny_bert_dir(tmp_path, safe)
    model = ViLBert(text_config(with_coattention=False)).eval()
    report = load_bert_weights(model, bert_dir)
    # every BERT tensor of embeddings, 4 layers and the MLM head landed
    assert len(report.loaded) == 5 + 4 * 16 + 5
    assert not any(k.startswith("backbone.encoder.text_layers") for k in report.missing)
    assert not any(k.startswith("backbone.embeddings") for k in report.missing)
    assert "bert.pooler.dense.weight" in report.unused and "cls.seq_relationship.weight" in report.unused
    assert any(k.startswith("backbone.encoder.visual_layers") for k in report.missing)

    ids = torch.randint(1, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    tt = torch.zeros_like(ids)
    tt[0, 4:] = 1
    with torch.no_grad():
        ref = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False).eval()
        ref_mlm = BertForPreTraining.from_pretrained(str(bert_dir)).eval()
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        ours = model.backbone(ids, torch.randn(2, 3, 12), torch.rand(2, 3, 5), tt, mask)
        logits = model.mlm_head(ours.text)
        ref_logits = ref_mlm(input_ids=ids, attention_mask=mask, token_type_ids=tt).prediction_logits
    m = mask.bool()
    torch.testing.assert_close(ours.text[m], expected[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[m], ref_logits[m], atol=1e-4, rtol=1e-4)


def test_bert_weights_into_vlbert(tmp_path):
    model = ViLBert(text_config("vlbert", hidden_size=32, v_hidden_size=32, bi_hidden_size=32, intermediate_size=64))
    visual_row = model.backbone.embeddings.token_type_embeddings.weight[2].clone()
    bert_dir = tiny_bert_dir(tmp_path)
    report = load_bert_weights(model, bert_dir)
    assert any(k.startswith("backbone.layers.3.") for k in report.loaded)
    assert "backbone.embeddings.img_token" in report.missing and "backbone.embeddings.end_token" in report.missing
    bert = BertForPreTraining.from_pretrained(str(bert_dir)).state_dict()
    types = model.backbone.embeddings.token_type_embeddings.weight
    assert torch.equal(types[:2], bert["bert.embeddings.token_type_embeddings.weight"])  # the text segments A, B
    assert torch.equal(types[2], visual_row)  # VL-BERT's visual segment is its own
    assert torch.equal(model.backbone.pooler.dense.weight, bert["bert.pooler.dense.weight"])  # the pooler is BERT's
    assert "backbone.pooler.dense.bias" in report.loaded and "alignment_head.classifier.weight" in report.missing


def test_bert_with_more_layers_than_the_text_stream_fails(tmp_path):
    model = ViLBert(text_config(num_hidden_layers=2, t_biattention_id=[1, 2]))
    with pytest.raises(ValueError, match="lacks"):
        load_bert_weights(model, tiny_bert_dir(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a BERT directory"):
        load_bert_weights(model, tmp_path / "nothing")


def test_the_weights_file_gets_the_permissions_of_the_other_files(tmp_path):
    import os

    from vilbert import ViLBert, load_preset, save_pretrained

    folder = save_pretrained(ViLBert(load_preset("vilbert-tiny")), tmp_path / "ckpt")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~mask  # safetensors alone gives 0600
