"""VL-BERT as the official code builds it: the converter of official checkpoints (random tensors in the
official key layout, tests/official_state.py) and the input embedding, computed here by hand."""
import math
import os
import pickle

import pytest
import torch

from vilbert import ViLBert, load_official_vlbert_checkpoint, load_preset
from vilbert.embeddings import box_geometry_embedding
from vilbert.official_vlbert import config_from_state, convert_official_vlbert_state_dict

from official_state import VLBERT_CFG, official_vlbert_state

SPOT_CHECKS = [  # official key -> our key, both written out by hand
    ("vlbert.word_embeddings.weight", "backbone.embeddings.word_embeddings.weight"),
    ("vlbert.position_embeddings.weight", "backbone.embeddings.position_embeddings.weight"),
    ("vlbert.token_type_embeddings.weight", "backbone.embeddings.token_type_embeddings.weight"),
    ("vlbert.embedding_LayerNorm.bias", "backbone.embeddings.norm.bias"),
    ("vlbert.visual_ln_text.weight", "backbone.embeddings.text_visual_norm.weight"),
    ("vlbert.visual_ln_object.bias", "backbone.embeddings.object_visual_norm.bias"),
    ("image_feature_extractor.obj_downsample.1.weight", "backbone.embeddings.region_embedding.dense.weight"),
    ("vlbert.encoder.layer.1.attention.self.key.weight", "backbone.layers.1.attention.key.weight"),
    ("vlbert.encoder.layer.0.attention.output.LayerNorm.bias", "backbone.layers.0.attention_output.norm.bias"),
    ("vlbert.encoder.layer.1.intermediate.dense.weight", "backbone.layers.1.ffn.intermediate.weight"),
    ("vlbert.encoder.layer.1.output.dense.bias", "backbone.layers.1.ffn.output.dense.bias"),
    ("vlbert.mlm_head.predictions.transform.LayerNorm.weight", "mlm_head.transform.norm.weight"),
    ("vlbert.mlm_head.predictions.bias", "mlm_head.bias"),
    ("vlbert.mvrc_head.transform.dense.weight", "region_head.dense.weight"),
    ("vlbert.mvrc_head.region_cls_pred.bias", "region_head.decoder.bias"),
]
ROWS = [  # nn.Embedding(1, D) in the official code, a vector here
    ("vlbert.end_embedding.weight", "backbone.embeddings.end_token"),
    ("object_linguistic_embeddings.weight", "backbone.embeddings.img_token"),
    ("object_mask_word_embedding.weight", "backbone.embeddings.mask_token"),
    ("object_mask_visual_embedding.weight", "backbone.embeddings.mask_feature"),
    ("aux_text_visual_embedding.weight", "backbone.embeddings.text_only_visual"),
]


def convert(state, config=VLBERT_CFG):
    model, report = convert_official_vlbert_state_dict(state, config)
    return model.eval(), report


def test_every_official_tensor_lands_where_expected():
    state = official_vlbert_state()
    model, report = convert(dict(state))
    ours = model.state_dict()
    for official, our in SPOT_CHECKS:
        assert torch.equal(ours[our], state[official]), official
    for official, our in ROWS:
        assert torch.equal(ours[our], state[official][0]), official
    assert report.unused == ["vlbert.mlm_head.predictions.decoder.weight"]  # tied to the word embeddings
    assert len(report.loaded) == len(state) - 1
    # the released pretraining has no pooler (with_pooler: false) and no relationship head: those parts
    # stay at their initial values, reported
    assert report.missing == sorted(k for k in ours if k.startswith(("backbone.pooler.", "alignment_head.")))


def test_a_vqa_model_converts_without_the_pretraining_parts():
    state = official_vlbert_state(kind="vqa")
    model, report = convert(state)
    assert torch.equal(model.backbone.pooler.dense.weight, state["vlbert.pooler.dense.weight"])
    assert report.unused == []
    # final_mlp (CLASSIFIER_TYPE mlm) is our "vqa" head: MLM transform, Dropout, Linear over 11 answers
    assert model.task_heads.spec == {"vqa": ("masked_answer", 11)}
    head = model.task_heads.heads["vqa"]
    for official, ours in [("final_mlp.0.dense.weight", head.transform.dense.weight),
                           ("final_mlp.0.LayerNorm.bias", head.transform.norm.bias),
                           ("final_mlp.2.weight", head.out.weight), ("final_mlp.2.bias", head.out.bias)]:
        assert torch.equal(ours, state[official]), official
    heads = [k for k in model.state_dict() if k.startswith(("mlm_head.", "region_head.", "alignment_head."))]
    assert len(heads) == 2 + 1 + 4 + 4  # relationship, MLM (bias, dense, norm), MVRC (dense, decoder)
    assert report.missing == sorted(heads + ["backbone.embeddings.mask_token", "backbone.embeddings.mask_feature",
                                             "backbone.embeddings.text_only_visual"])


def test_file_with_module_prefix_and_optimizer_loads_strictly(tmp_path):
    state = official_vlbert_state(pooler=True, relationship=True)
    doc = {"state_dict": {f"module.{k}": v for k, v in state.items()},
           "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                         "param_groups": [{"lr": 1e-7, "weight_decay": 1e-4, "params": [0]}]},
           "validation_monitor": {"best_epoch": 2, "best_val": 0.5}}
    torch.save(doc, tmp_path / "vl-bert_base_res101_pretrain_multitask-0009.model")
    model, report = load_official_vlbert_checkpoint(tmp_path / "vl-bert_base_res101_pretrain_multitask-0009.model",
                                                    VLBERT_CFG)
    direct, _ = convert(state)
    for k, v in direct.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert report.missing == [] and report.unused == ["vlbert.mlm_head.predictions.decoder.weight"]


def test_relationship_head_classes_follow_ours():
    """Official class 1 = the image's own caption; ours 0 = aligned: the rows are swapped."""
    state = official_vlbert_state(pooler=True, relationship=True)
    model, _ = convert(state)
    ids, feat, loc = torch.randint(1, 50, (3, 5)), torch.randn(3, 4, 12), boxes(3, 4)
    with torch.no_grad():
        out = model(ids, feat, loc)
        h_cls = out.backbone.text[:, 0]
    pooled = torch.tanh(h_cls @ state["vlbert.pooler.dense.weight"].T + state["vlbert.pooler.dense.bias"])
    W, b = (state[f"vlbert.relationsip_head.caption_image_relationship.{n}"] for n in ("weight", "bias"))
    official = pooled @ W.T + b  # (B, 2), column 1 = matched
    torch.testing.assert_close(out.align_logits, official[:, [1, 0]])


def test_unknown_missing_mis_shaped_and_foreign_keys_fail_loudly():
    state = official_vlbert_state()
    state["vlbert.visual_1x1_text.weight"] = torch.randn(16, 16)  # only when visual_size != hidden_size
    with pytest.raises(ValueError, match="no mapping: .*visual_1x1_text"):
        convert(state)
    state = official_vlbert_state()
    del state["vlbert.encoder.layer.1.attention.self.query.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 tensors: \['backbone.layers.1.attention.query.bias'\]"):
        convert(state)
    state = official_vlbert_state()
    del state["vlbert.mvrc_head.transform.dense.bias"]  # an optional part may be absent, not half there
    with pytest.raises(ValueError, match="masked-RoI head .* incomplete: .*region_head.dense.bias"):
        convert(state)
    state = official_vlbert_state()
    state["vlbert.token_type_embeddings.weight"] = torch.randn(2, 16)  # BERT's two types, no visual one
    with pytest.raises(ValueError, match="token_type_embeddings.weight has shape"):
        convert(state)
    state = official_vlbert_state()
    state["object_linguistic_embeddings.weight"] = torch.randn(81, 16)  # object_word_embed_mode 1
    with pytest.raises(ValueError, match="expected one row"):
        convert(state)
    state = official_vlbert_state()
    state["vlbert.mlm_head.predictions.decoder.weight"] = torch.randn(50, 16)
    with pytest.raises(ValueError, match="only the tied MLM decoder"):
        convert(state)
    state = official_vlbert_state()
    state["image_feature_extractor.backbone.conv1.weight"] = torch.randn(64, 3, 7, 7)
    with pytest.raises(ValueError, match="end-to-end VL-BERT checkpoint"):
        convert(state)
    with pytest.raises(ValueError, match="arch 'vlbert'"):
        convert(official_vlbert_state(), load_preset("vilbert-tiny"))


def test_sizes_come_from_the_checkpoint():
    c = load_preset("vlbert-tiny", vocab_size=40, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=96, max_position_embeddings=30, v_feature_size=20, v_target_size=9,
                    v_hidden_size=128, v_num_attention_heads=2, bi_hidden_size=128, bi_num_attention_heads=2)
    got = config_from_state(official_vlbert_state(c))
    assert (got.vocab_size, got.hidden_size, got.num_hidden_layers, got.num_attention_heads) == (40, 128, 3, 2)
    assert (got.intermediate_size, got.max_position_embeddings, got.type_vocab_size) == (96, 30, 2)
    assert (got.v_feature_size, got.v_target_size, got.v_geometry_dim, got.arch) == (20, 9, 256, "vlbert")
    model, _ = convert_official_vlbert_state_dict(official_vlbert_state(c))
    assert model.config == got


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickled_code_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "vl-bert-base-prec.model", "wb") as f:
        pickle.dump({"state_dict": {"module.vlbert.word_embeddings.weight": _Evil()}}, f, protocol=2)
    with pytest.raises(ValueError, match=r"vl-bert-base-prec.model: refused: .*\(it names (posix|os)\.system\).*"
                                         r"nothing from it was run"):
        load_official_vlbert_checkpoint(tmp_path / "vl-bert-base-prec.model", VLBERT_CFG)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "other.model")  # no state_dict
    with pytest.raises(ValueError, match=r"other.model: expected \{'state_dict': tensors\}"):
        load_official_vlbert_checkpoint(tmp_path / "other.model", VLBERT_CFG)


# ---- the embedding, by hand -----------------------------------------------------------------------

def boxes(B, R, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = 0.5 * torch.rand(B, R, 2, generator=g)
    x1y1x2y2 = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(B, R, 2, generator=g)], -1)
    area = (x1y1x2y2[..., 2] - x1y1x2y2[..., 0]) * (x1y1x2y2[..., 3] - x1y1x2y2[..., 1])
    return torch.cat([x1y1x2y2, area[..., None]], -1)  # (B, R, 5) as the batch contract


def test_geometry_embedding_by_hand():
    box = torch.tensor([0.1, 0.2, 0.5, 0.6])  # centre (30, 40) %, size (40, 40) %
    got = box_geometry_embedding(box, 256)
    assert got.shape == (2048,)
    for c, value in enumerate([30.0, 40.0, 40.0, 40.0]):  # per coordinate: 256 sines, then 256 cosines
        for k in (0, 1, 100, 255):
            wavelength = 1000 ** (k / 256)
            assert math.isclose(got[c * 512 + k].item(), math.sin(value / wavelength), abs_tol=1e-5)
            assert math.isclose(got[c * 512 + 256 + k].item(), math.cos(value / wavelength), abs_tol=1e-5)


def layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * w + b


def test_converted_model_embeds_text_regions_and_end_as_the_official_code():
    """Positions: words 0..n-1, every visual element n, END n + 1; segments: the words' own, then 2
    (visual) for regions and END; a masked region: mask feature (box kept) and mask token."""
    s = official_vlbert_state()
    model, _ = convert(dict(s))
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 11, 2, 0, 0]])  # row 1: three words, then padding
    types = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    text_mask = ids > 0
    feat, loc = torch.randn(2, 3, 12), boxes(2, 3)
    image_mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()  # row 0: region 2 is padding
    masked = torch.tensor([[False, False, False], [False, True, False]])  # row 1: region 1 masked
    with torch.no_grad():
        x, mask = model.backbone.embeddings(ids, types, text_mask, feat, loc, image_mask, masked)

    W, b = s["image_feature_extractor.obj_downsample.1.weight"], s["image_feature_extractor.obj_downsample.1.bias"]

    def visual(row, j):  # the official FastRCNN.obj_downsample on [coordinate embedding ; feature]
        f = s["object_mask_visual_embedding.weight"][0] if masked[row, j] else feat[row, j]
        x1, y1, x2, y2 = loc[row, j, :4].tolist()
        coords = [(x1 + x2) / 2 * 100, (y1 + y2) / 2 * 100, (x2 - x1) * 100, (y2 - y1) * 100]
        wl = 1000 ** (torch.arange(256) / 256)
        geometry = torch.cat([torch.cat([torch.sin(v / wl), torch.cos(v / wl)]) for v in coords])
        return torch.relu(W @ torch.cat([geometry, f]) + b)

    def ln(name, v):
        return layer_norm(v, s[f"vlbert.{name}.weight"], s[f"vlbert.{name}.bias"])

    P, TT = s["vlbert.position_embeddings.weight"], s["vlbert.token_type_embeddings.weight"]
    expected_positions = {0: ([0, 1, 2, 3, 4], 5, 6), 1: ([0, 1, 2], 3, 4)}
    for row, (word_positions, visual_position, end_position) in expected_positions.items():
        whole_image = ln("visual_ln_text", visual(row, 0))
        for i, p in enumerate(word_positions):
            e = s["vlbert.word_embeddings.weight"][ids[row, i]] + whole_image + P[p] + TT[types[row, i]]
            torch.testing.assert_close(x[row, i], ln("embedding_LayerNorm", e), atol=1e-5, rtol=1e-5)
        for j in range(3):
            if image_mask[row, j]:
                token = s["object_mask_word_embedding.weight" if masked[row, j] else
                          "object_linguistic_embeddings.weight"][0]
                e = token + ln("visual_ln_object", visual(row, j)) + P[visual_position] + TT[2]
                torch.testing.assert_close(x[row, 5 + j], ln("embedding_LayerNorm", e), atol=1e-5, rtol=1e-5)
        e = s["vlbert.end_embedding.weight"][0] + P[end_position] + TT[2]
        torch.testing.assert_close(x[row, -1], ln("embedding_LayerNorm", e), atol=1e-5, rtol=1e-5)
    assert mask.tolist() == [[True] * 5 + [True, True, False, True], [True] * 3 + [False] * 2 + [True] * 4]


def test_padded_layout_gives_the_official_packed_sequence():
    """The official code packs each row as [words][regions][END] without padding; the encoder on that
    packed sequence gives our outputs at the real positions."""
    model, _ = convert(official_vlbert_state(pooler=True))
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 11, 2, 0, 0]])
    feat, loc = torch.randn(2, 4, 12), boxes(2, 4, seed=1)
    image_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        out = model.backbone(ids, feat, loc, attention_mask=(ids > 0).long(), image_mask=image_mask)
        x, mask = model.backbone.embeddings(ids, torch.zeros_like(ids), ids > 0, feat, loc, image_mask.bool())
        for row in range(2):
            h = x[row][mask[row]][None]  # (1, L, D) packed: words, regions, END
            for layer in model.backbone.layers:
                h = layer(h, None)
            n, r = int((ids[row] > 0).sum()), int(image_mask[row].sum())
            torch.testing.assert_close(out.text[row, :n], h[0, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.image[row][image_mask[row].bool()], h[0, n:n + r], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.end[row], h[0, -1], atol=1e-5, rtol=1e-5)
            pooled = torch.tanh(model.backbone.pooler.dense(h[0, [0, n]]))  # [CLS]; the whole image, for fusion
            torch.testing.assert_close(out.pooled_text[row], pooled[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.pooled_image[row], pooled[1], atol=1e-5, rtol=1e-5)


def test_text_only_rows_see_the_text_only_vector_and_no_regions():
    s = official_vlbert_state()
    model, _ = convert(dict(s))
    ids = torch.tensor([[1, 7, 8, 2], [1, 9, 10, 2]])
    feat, loc = torch.randn(2, 3, 12), boxes(2, 3)
    text_only = torch.tensor([False, True])
    with torch.no_grad():
        a = model.backbone(ids, feat, loc, text_only=text_only)
        b = model.backbone(ids, torch.randn(2, 3, 12), boxes(2, 3, seed=5), text_only=text_only)
        x, mask = model.backbone.embeddings(ids, torch.zeros_like(ids), ids > 0, feat, loc,
                                            torch.tensor([[1, 1, 1], [0, 0, 0]]).bool(), None, text_only)
    torch.testing.assert_close(a.text[1], b.text[1])  # the text-only row never sees its "image"
    assert not torch.allclose(a.text[0], b.text[0])
    visual = layer_norm(s["aux_text_visual_embedding.weight"][0], s["vlbert.visual_ln_text.weight"],
                        s["vlbert.visual_ln_text.bias"])
    P, TT = s["vlbert.position_embeddings.weight"], s["vlbert.token_type_embeddings.weight"]
    e = s["vlbert.word_embeddings.weight"][9] + visual + P[1] + TT[0]
    norm = s["vlbert.embedding_LayerNorm.weight"], s["vlbert.embedding_LayerNorm.bias"]
    torch.testing.assert_close(x[1, 1], layer_norm(e, *norm), atol=1e-5, rtol=1e-5)
    e = s["vlbert.end_embedding.weight"][0] + P[5] + TT[2]  # four words: END at position 5
    torch.testing.assert_close(x[1, -1], layer_norm(e, *norm), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="VL-BERT inputs"):
        ViLBert(load_preset("vilbert-tiny"))(ids, torch.randn(2, 3, 2048), loc, text_only=text_only)


def test_converted_model_round_trips_through_our_checkpoint_format(tmp_path):
    from vilbert import load_pretrained, save_pretrained

    model, _ = convert(official_vlbert_state(pooler=True))
    again = load_pretrained(save_pretrained(model, tmp_path / "ckpt")).eval()
    ids, feat, loc = torch.randint(1, 50, (2, 5)), torch.randn(2, 3, 12), boxes(2, 3)
    masked = torch.tensor([[False, True, False], [False, False, False]])
    with torch.no_grad():
        a, b = model(ids, feat, loc, masked_regions=masked), again(ids, feat, loc, masked_regions=masked)
    torch.testing.assert_close(a.backbone.text, b.backbone.text, rtol=0, atol=0)
    torch.testing.assert_close(a.region_logits, b.region_logits, rtol=0, atol=0)
    assert again.config.v_geometry_dim == 256 and again.config.arch == "vlbert"
