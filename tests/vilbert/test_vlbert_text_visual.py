"""VL-BERT's words carrying the visual feature of the element they refer to (`text_visual_index`, the
official VCR `_collect_obj_reps(text_tags, obj_reps)`): computed by hand from the official tensors, and
a change to one region's feature reaching exactly the words that name it."""
import torch

from vilbert.official_vlbert import convert_official_vlbert_state_dict

from official_state import VLBERT_CFG, official_vlbert_state


def layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * w + b


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 11, 12, 2, 0, 0]])  # row 1: four words, then padding
    types = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    feat = torch.randn(2, 4, VLBERT_CFG.v_feature_size, generator=g)  # element 0 = the whole image
    xy = 0.5 * torch.rand(2, 4, 2, generator=g)
    box = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(2, 4, 2, generator=g)], -1)
    loc = torch.cat([box, ((box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1]))[..., None]], -1)
    index = torch.tensor([[0, 2, 0, 3, 2, 0], [0, 1, 0, 0, 0, 0]])  # (B, T) the element each word carries
    return ids, types, feat, loc, index


def test_each_word_carries_its_elements_feature_as_collect_obj_reps():
    s = official_vlbert_state()
    model = convert_official_vlbert_state_dict(dict(s), VLBERT_CFG)[0].eval()
    ids, types, feat, loc, index = inputs()
    emb = model.backbone.embeddings
    image_mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        x, _ = emb(ids, types, ids > 0, feat, loc, image_mask, text_visual_index=index)
        default, _ = emb(ids, types, ids > 0, feat, loc, image_mask)
        zeros, _ = emb(ids, types, ids > 0, feat, loc, image_mask, text_visual_index=torch.zeros_like(index))
    assert torch.equal(zeros, default)  # index 0 everywhere = the default (the whole image)

    W, b = s["image_feature_extractor.obj_downsample.1.weight"], s["image_feature_extractor.obj_downsample.1.bias"]
    wl = 1000 ** (torch.arange(VLBERT_CFG.v_geometry_dim) / VLBERT_CFG.v_geometry_dim)

    def obj_rep(row, j):  # the official obj_downsample on [coordinate embedding ; feature]
        x1, y1, x2, y2 = loc[row, j, :4].tolist()
        coords = [(x1 + x2) / 2 * 100, (y1 + y2) / 2 * 100, (x2 - x1) * 100, (y2 - y1) * 100]
        geometry = torch.cat([torch.cat([torch.sin(v / wl), torch.cos(v / wl)]) for v in coords])
        return torch.relu(W @ torch.cat([geometry, feat[row, j]]) + b)

    P, TT, E = (s[f"vlbert.{n}.weight"] for n in ("position_embeddings", "token_type_embeddings", "word_embeddings"))
    for row in range(2):
        for i in range(int((ids[row] > 0).sum())):
            visual = layer_norm(obj_rep(row, index[row, i]), s["vlbert.visual_ln_text.weight"],
                                s["vlbert.visual_ln_text.bias"])
            e = E[ids[row, i]] + visual + P[i] + TT[types[row, i]]
            expected = layer_norm(e, s["vlbert.embedding_LayerNorm.weight"], s["vlbert.embedding_LayerNorm.bias"])
            torch.testing.assert_close(x[row, i], expected, atol=1e-5, rtol=1e-5)


def test_changing_one_regions_feature_changes_exactly_the_words_tagged_with_it():
    model = convert_official_vlbert_state_dict(official_vlbert_state(), VLBERT_CFG)[0].eval()
    ids, types, feat, loc, index = inputs(seed=1)
    image_mask = torch.ones(2, 4, dtype=torch.bool)
    other = feat.clone()
    other[:, 2] += 1.0  # region 2: named by words 1 and 4 of row 0, by no word of row 1
    with torch.no_grad():
        a, _ = model.backbone.embeddings(ids, types, ids > 0, feat, loc, image_mask, text_visual_index=index)
        b, _ = model.backbone.embeddings(ids, types, ids > 0, other, loc, image_mask, text_visual_index=index)
        out_a = model.backbone(ids, feat, loc, types, (ids > 0).long(), image_mask.long(), text_visual_index=index)
        out_b = model.backbone(ids, feat, loc, types, (ids > 0).long(), image_mask.long())
    T = ids.shape[1]
    changed = (a != b).any(-1)  # (B, T + R + 1)
    words = torch.zeros(2, T + 4 + 1, dtype=torch.bool)
    words[:, :T] = index == 2
    words[:, T + 2] = True  # the region's own element
    assert torch.equal(changed, words)
    assert not torch.allclose(out_a.text, out_b.text)  # the model reads the index
