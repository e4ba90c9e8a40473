"""Backbone structure: shapes, masks, the official layer schedule, co-attention math."""
import math

import pytest
import torch

from vilbert import ViLBert, ViLBertConfig, load_preset, preset_names
from vilbert.layers import CoAttentionLayer


def tiny(arch="vilbert", **kw):
    return load_preset(f"{arch}-tiny", vocab_size=50, v_feature_size=12, v_target_size=7, **kw)


def inputs(B=3, T=6, R=5, F=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(1, 50, (B, T), generator=g),
        image_feat=torch.randn(B, R, F, generator=g),
        image_loc=torch.rand(B, R, 5, generator=g),
    )


def test_presets_load_and_base_matches_official_json():
    assert {"vilbert-base", "vilbert-tiny", "vlbert-base", "vlbert-tiny"} <= set(preset_names())
    c = load_preset("vilbert-base")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert (c.vocab_size, c.max_position_embeddings, c.type_vocab_size) == (30522, 512, 2)
    assert (c.v_hidden_size, c.v_num_hidden_layers, c.v_num_attention_heads,
            c.v_intermediate_size) == (1024, 6, 8, 1024)
    assert (c.v_feature_size, c.v_target_size) == (2048, 1601)
    assert (c.bi_hidden_size, c.bi_num_attention_heads, c.bi_intermediate_size) == (1024, 8, 1024)
    assert c.t_biattention_id == [6, 7, 8, 9, 10, 11] and c.v_biattention_id == [0, 1, 2, 3, 4, 5]
    assert c.fusion_method == "mul"
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("nope")


def test_official_json_reads_into_the_same_config(tmp_path):
    official = {
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512,
        "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522,
        "v_feature_size": 2048, "v_target_size": 1601, "v_hidden_size": 1024, "v_num_hidden_layers": 6,
        "v_num_attention_heads": 8, "v_intermediate_size": 1024, "bi_hidden_size": 1024,
        "bi_num_attention_heads": 8, "bi_intermediate_size": 1024, "bi_attention_type": 1,
        "v_attention_probs_dropout_prob": 0.1, "v_hidden_act": "gelu", "v_hidden_dropout_prob": 0.1,
        "v_initializer_range": 0.02, "v_biattention_id": [0, 1, 2, 3, 4, 5],
        "t_biattention_id": [6, 7, 8, 9, 10, 11], "pooling_method": "mul",
    }
    path = tmp_path / "bert_base_6layer_6conect.json"
    path.write_text(__import__("json").dumps(official))
    assert ViLBertConfig.from_official_json(path) == load_preset("vilbert-base")
    with pytest.raises(ValueError, match="hidden_act"):
        ViLBertConfig.from_official_dict({**official, "hidden_act": "relu"})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        ViLBertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="same length"):
        ViLBertConfig(v_biattention_id=[0], t_biattention_id=[6, 7])
    with pytest.raises(ValueError, match="arch"):
        ViLBertConfig(arch="lxmert")


@pytest.mark.parametrize("arch", ["vilbert", "vlbert"])
def test_output_shapes(arch):
    cfg = tiny(arch)
    model = ViLBert(cfg).eval()
    x = inputs()
    out = model(**x)
    Dv = cfg.v_hidden_size if arch == "vilbert" else cfg.hidden_size
    assert out.backbone.text.shape == (3, 6, cfg.hidden_size)
    assert out.backbone.image.shape == (3, 5, Dv)
    assert out.backbone.pooled_text.shape == out.backbone.pooled_image.shape == (3, cfg.bi_hidden_size)
    assert out.align_logits.shape == (3, 2)
    assert out.mlm_logits.shape == (3, 6, 50) and out.region_logits.shape == (3, 5, 7)
    if arch == "vilbert":
        assert (out.backbone.pooled_text >= 0).all() and (out.backbone.pooled_image >= 0).all()  # ReLU poolers
    else:  # VL-BERT's pooler is BERT's (tanh); its END element is an output too
        assert out.backbone.pooled_text.abs().max() < 1 and (out.backbone.pooled_text < 0).any()
        assert out.backbone.end.shape == (3, cfg.hidden_size)


@pytest.mark.parametrize("arch", ["vilbert", "vlbert"])
def test_padding_is_invisible(arch):
    """Changing padded tokens/regions must not change any output at real positions."""
    model = ViLBert(tiny(arch)).eval()
    x = inputs()
    attention_mask = torch.ones(3, 6, dtype=torch.long)
    attention_mask[0, 4:] = 0
    image_mask = torch.ones(3, 5, dtype=torch.long)
    image_mask[1, 3:] = 0
    a = model.backbone(**x, attention_mask=attention_mask, image_mask=image_mask)
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][0, 4:] = 7
    y["image_feat"][1, 3:] = 100.0
    y["image_loc"][1, 3:] = 0.5
    b = model.backbone(**y, attention_mask=attention_mask, image_mask=image_mask)
    t, r = attention_mask.bool(), image_mask.bool()
    torch.testing.assert_close(a.text[t], b.text[t])
    torch.testing.assert_close(a.image[r], b.image[r])
    torch.testing.assert_close(a.pooled_text, b.pooled_text)
    torch.testing.assert_close(a.pooled_image, b.pooled_image)
    # and the mask does matter: without it the padded content leaks in
    c = model.backbone(**y)
    assert not torch.allclose(a.text[0, :4], c.text[0, :4])


def test_base_runs_layers_in_the_official_order():
    model = ViLBert(load_preset("vilbert-base")).eval()
    enc = model.backbone.encoder
    order = []
    for name, layers in [("t", enc.text_layers), ("v", enc.visual_layers), ("c", enc.co_layers)]:
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, tag=f"{name}{i}": order.append(tag))
    with torch.no_grad():
        model.backbone(torch.randint(1, 100, (1, 4)), torch.randn(1, 3, 2048), torch.rand(1, 3, 5))
    expected = [f"t{i}" for i in range(6)] + ["c0"]
    for k in range(1, 6):
        expected += [f"t{5 + k}", f"v{k - 1}", f"c{k}"]
    expected += ["v5", "t11"]
    assert order == expected


def test_coattention_matches_hand_computation():
    """Visual queries attend to text keys/values and vice versa, each with its own weights."""
    cfg = tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, v_hidden_dropout_prob=0.0,
               v_attention_probs_dropout_prob=0.0)
    layer = CoAttentionLayer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 5, cfg.v_hidden_size, generator=g), torch.randn(2, 4, cfg.hidden_size, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()

    def attend(att, q_in, kv_in, kv_mask):
        h = cfg.bi_num_attention_heads
        q, k, v = att.query(q_in), att.key(kv_in), att.value(kv_in)
        d = q.shape[-1] // h
        outs = []
        for i in range(h):
            s = q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2) / math.sqrt(d)
            if kv_mask is not None:
                s = s.masked_fill(~kv_mask[:, None, :], float("-inf"))
            outs.append(torch.softmax(s, -1) @ v[..., i * d:(i + 1) * d])
        return torch.cat(outs, -1)

    def ln(x, norm):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, cfg.layer_norm_eps)

    img_ctx = attend(layer.visual_attention, image, text, text_mask)
    txt_ctx = attend(layer.text_attention, text, image, None)
    img_mid = ln(layer.visual_attention_output.dense(img_ctx) + image, layer.visual_attention_output.norm)
    txt_mid = ln(layer.text_attention_output.dense(txt_ctx) + text, layer.text_attention_output.norm)

    def ffn(x, f):
        return ln(f.output.dense(torch.nn.functional.gelu(f.intermediate(x))) + x, f.output.norm)

    got_img, got_txt = layer(image, None, text, text_mask[:, None, None, :])
    torch.testing.assert_close(got_img, ffn(img_mid, layer.visual_ffn), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, ffn(txt_mid, layer.text_ffn), atol=1e-5, rtol=1e-5)


def test_without_coattention_streams_are_independent():
    model = ViLBert(tiny(with_coattention=False)).eval()
    x = inputs()
    a = model.backbone(**x)
    y = dict(x, image_feat=torch.randn_like(x["image_feat"]))
    b = model.backbone(**y)
    torch.testing.assert_close(a.text, b.text)  # text never sees the image
    with_co = ViLBert(tiny()).eval()
    with_co.load_state_dict(model.state_dict())
    assert not torch.allclose(with_co.backbone(**x).text, with_co.backbone(**y).text)


def test_task_token_is_inserted_after_cls():
    model = ViLBert(tiny(task_specific_tokens=True)).eval()
    x = inputs()
    with pytest.raises(ValueError, match="task_ids"):
        model.backbone(**x)
    out = model.backbone(**x, task_ids=torch.full((3, 1), 2))
    assert out.text.shape[1] == 7
    other = model.backbone(**x, task_ids=torch.full((3, 1), 5))
    assert not torch.allclose(out.pooled_text, other.pooled_text)
