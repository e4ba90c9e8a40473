"""Random tensors with the names and shapes of official state dicts, written out by hand: the
official-checkpoint fixtures of the converter and task tests. vilbert-multi-task's `VILBertForVLTasks`
(`official_state`) and VL-BERT's models on precomputed features (`official_vlbert_state`)."""
import torch

from vilbert import load_preset

CFG = load_preset("vilbert-tiny", vocab_size=50, v_feature_size=12, v_target_size=7, max_position_embeddings=20)


def linear(state, name, out_dim, in_dim):
    state[f"{name}.weight"] = torch.randn(out_dim, in_dim)
    state[f"{name}.bias"] = torch.randn(out_dim)


def norm(state, name, dim):
    state[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim)
    state[f"{name}.bias"] = 0.1 * torch.randn(dim)


def bert_layer(state, p, H, I):
    for n in ("query", "key", "value"):
        linear(state, f"{p}.attention.self.{n}", H, H)
    linear(state, f"{p}.attention.output.dense", H, H)
    norm(state, f"{p}.attention.output.LayerNorm", H)
    linear(state, f"{p}.intermediate.dense", I, H)
    linear(state, f"{p}.output.dense", H, I)
    norm(state, f"{p}.output.LayerNorm", H)


def official_state(c=CFG, task_heads=True, task_tokens=False, answers=11):
    """Names and shapes of vilbert-multi-task's VILBertForVLTasks state dict, written out by hand."""
    torch.manual_seed(0)
    H, Hv, Bi, I, Iv = c.hidden_size, c.v_hidden_size, c.bi_hidden_size, c.intermediate_size, c.v_intermediate_size
    s = {}
    s["bert.embeddings.word_embeddings.weight"] = torch.randn(c.vocab_size, H)
    s["bert.embeddings.position_embeddings.weight"] = torch.randn(c.max_position_embeddings, H)
    s["bert.embeddings.token_type_embeddings.weight"] = torch.randn(c.type_vocab_size, H)
    norm(s, "bert.embeddings.LayerNorm", H)
    if task_tokens:
        s["bert.embeddings.task_embeddings.weight"] = torch.randn(20, H)
    linear(s, "bert.v_embeddings.image_embeddings", Hv, c.v_feature_size)
    linear(s, "bert.v_embeddings.image_location_embeddings", Hv, 5)
    norm(s, "bert.v_embeddings.LayerNorm", Hv)
    for i in range(c.num_hidden_layers):
        bert_layer(s, f"bert.encoder.layer.{i}", H, I)
    for i in range(c.v_num_hidden_layers):
        bert_layer(s, f"bert.encoder.v_layer.{i}", Hv, Iv)
    for i in range(len(c.v_biattention_id)):
        p = f"bert.encoder.c_layer.{i}"
        for n in ("query1", "key1", "value1"):
            linear(s, f"{p}.biattention.{n}", Bi, Hv)
        for n in ("query2", "key2", "value2"):
            linear(s, f"{p}.biattention.{n}", Bi, H)
        linear(s, f"{p}.biOutput.dense1", Hv, Bi)
        norm(s, f"{p}.biOutput.LayerNorm1", Hv)
        linear(s, f"{p}.biOutput.q_dense1", Hv, Bi)
        linear(s, f"{p}.biOutput.dense2", H, Bi)
        norm(s, f"{p}.biOutput.LayerNorm2", H)
        linear(s, f"{p}.biOutput.q_dense2", H, Bi)
        linear(s, f"{p}.v_intermediate.dense", Iv, Hv)
        linear(s, f"{p}.v_output.dense", Hv, Iv)
        norm(s, f"{p}.v_output.LayerNorm", Hv)
        linear(s, f"{p}.t_intermediate.dense", I, H)
        linear(s, f"{p}.t_output.dense", H, I)
        norm(s, f"{p}.t_output.LayerNorm", H)
    linear(s, "bert.t_pooler.dense", Bi, H)
    linear(s, "bert.v_pooler.dense", Bi, Hv)
    s["cls.predictions.bias"] = torch.randn(c.vocab_size)
    linear(s, "cls.predictions.transform.dense", H, H)
    norm(s, "cls.predictions.transform.LayerNorm", H)
    s["cls.predictions.decoder.weight"] = s["bert.embeddings.word_embeddings.weight"]
    linear(s, "cls.bi_seq_relationship", 2, Bi)
    linear(s, "cls.imagePredictions.transform.dense", Hv, Hv)
    norm(s, "cls.imagePredictions.transform.LayerNorm", Hv)
    linear(s, "cls.imagePredictions.decoder", c.v_target_size, Hv)
    if task_heads:
        for name, n_in, n_out in [("vil_prediction", Bi, answers), ("vil_prediction_gqa", Bi, 5),
                                  ("vil_binary_prediction", 2 * Bi, 2)]:
            linear(s, f"{name}.logit_fc.0", 2 * Bi, n_in)
            norm(s, f"{name}.logit_fc.2", 2 * Bi)
            linear(s, f"{name}.logit_fc.3", n_out, 2 * Bi)
        linear(s, "vil_logit", 1, Bi)
        linear(s, "vil_tri_prediction", 3, Bi)
        linear(s, "vision_logit", 1, Hv)
        linear(s, "linguisic_logit", 1, H)
    return s


# ---- VL-BERT (jackroos/VL-BERT) ---------------------------------------------------------------

VLBERT_CFG = load_preset("vlbert-tiny", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=20, v_feature_size=12, v_target_size=7,
                         v_hidden_size=16, v_num_attention_heads=2, bi_hidden_size=16, bi_num_attention_heads=2,
                         v_geometry_dim=256)  # the official geometry embedding: 4 x 2 x 256


def official_vlbert_state(c=VLBERT_CFG, kind="pretrain", pooler=False, relationship=False, seed=0, answers=11):
    """The state dict of VL-BERT on precomputed features, keys without `module.`:
    kind "pretrain" = ResNetVLBERTForPretrainingMultitask (pretrain/modules/resnet_vlbert_for_pretraining_multitask.py:
    FastRCNN's obj_downsample, the [IMG] / mask / text-only embeddings, VisualLinguisticBertForPretraining with its
    MLM and MVRC heads; `pooler` / `relationship` as with_pooler / WITH_REL_LOSS), "vqa" = ResNetVLBERT
    (vqa/modules/resnet_vlbert_for_vqa.py: VisualLinguisticBert with its pooler, final_mlp of CLASSIFIER_TYPE mlm)."""
    torch.manual_seed(seed)
    H, I, F = c.hidden_size, c.intermediate_size, c.v_feature_size
    s = {}
    linear(s, "image_feature_extractor.obj_downsample.1", H, 2048 + F)  # [4 x 2 x 256 geometry ; feature]
    s["object_linguistic_embeddings.weight"] = torch.randn(1, H)
    if kind == "pretrain":
        s["object_mask_visual_embedding.weight"] = torch.randn(1, F)
        s["object_mask_word_embedding.weight"] = torch.randn(1, H)
        s["aux_text_visual_embedding.weight"] = torch.randn(1, H)
    s["vlbert.word_embeddings.weight"] = torch.randn(c.vocab_size, H)
    s["vlbert.end_embedding.weight"] = torch.randn(1, H)
    s["vlbert.position_embeddings.weight"] = torch.randn(c.max_position_embeddings, H)
    s["vlbert.token_type_embeddings.weight"] = torch.randn(c.type_vocab_size + 1, H)  # A, B, visual
    norm(s, "vlbert.embedding_LayerNorm", H)
    norm(s, "vlbert.visual_ln_text", H)
    norm(s, "vlbert.visual_ln_object", H)
    for i in range(c.num_hidden_layers):
        bert_layer(s, f"vlbert.encoder.layer.{i}", H, I)
    if pooler or kind == "vqa":
        linear(s, "vlbert.pooler.dense", H, H)
    if kind == "pretrain":
        if relationship:
            linear(s, "vlbert.relationsip_head.caption_image_relationship", 2, H)  # sic
        s["vlbert.mlm_head.predictions.bias"] = torch.randn(c.vocab_size)
        linear(s, "vlbert.mlm_head.predictions.transform.dense", H, H)
        norm(s, "vlbert.mlm_head.predictions.transform.LayerNorm", H)
        s["vlbert.mlm_head.predictions.decoder.weight"] = s["vlbert.word_embeddings.weight"]  # tied
        linear(s, "vlbert.mvrc_head.transform.dense", H, H)
        linear(s, "vlbert.mvrc_head.region_cls_pred", c.v_target_size, H)
    else:
        linear(s, "final_mlp.0.dense", H, H)
        norm(s, "final_mlp.0.LayerNorm", H)
        linear(s, "final_mlp.2", answers, H)
    return s
