"""Convert official VL-BERT checkpoints (jackroos/VL-BERT) into a `ViLBert` with `arch: vlbert`.

The official trainer saves `{'state_dict': ..., 'optimizer': ..., ['validation_monitor': ...]}` with
every key under DataParallel's `module.`. Converted here: the models on precomputed bottom-up
features, i.e. the pretrained `vl-bert-{base,large}-prec.model` (what `cfgs/pretrain/*_prec_*.yaml`
writes as `vl-bert_base_res101_pretrain_multitask-EPOCH.model`) and the fine-tuned models made
from them (VQA, `cfgs/vqa/*`: their answer head `final_mlp` of CLASSIFIER_TYPE mlm becomes our
`vqa` head of kind `masked_answer`; the other layouts, 1fc and 2fc, are refused with the reason). The
end-to-end models (`*-e2e`, RefCOCO+, VCR) hold their own Fast R-CNN, whose features are not the
precomputed ones this model reads: refused with the reason.

Strict: every official key is mapped, or on the short list of keys deliberately not used
(`UNUSED`); our tensors may be left at their initial values only as whole parts that a kind of
official checkpoint does not have (`OPTIONAL_PARTS`: e.g. the pooler, absent from the pretraining
configs' `with_pooler: false`). Anything else raises.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from common.safe_load import refusal, regular_file

from .checkpoint import BERT_LAYER_RULES, LoadReport, apply_rules, check_finite
from .config import ViLBertConfig, load_preset
from .pretraining import ViLBert

# official key -> (our key, how the tensor changes). "row" = an nn.Embedding(1, D) that we hold as a
# vector; "swap" = the relationship head, whose class 1 is "the image's own caption" (ours: 0).
KEY_RULES = [
    (r"vlbert\.(word|position|token_type)_embeddings\.weight", r"backbone.embeddings.\1_embeddings.weight", None),
    (r"vlbert\.end_embedding\.weight", "backbone.embeddings.end_token", "row"),
    (r"vlbert\.embedding_LayerNorm\.(weight|bias)", r"backbone.embeddings.norm.\1", None),
    (r"vlbert\.visual_ln_text\.(weight|bias)", r"backbone.embeddings.text_visual_norm.\1", None),
    (r"vlbert\.visual_ln_object\.(weight|bias)", r"backbone.embeddings.object_visual_norm.\1", None),
    (r"object_linguistic_embeddings\.weight", "backbone.embeddings.img_token", "row"),
    (r"object_mask_word_embedding\.weight", "backbone.embeddings.mask_token", "row"),
    (r"object_mask_visual_embedding\.weight", "backbone.embeddings.mask_feature", "row"),
    (r"aux_text_visual_embedding\.weight", "backbone.embeddings.text_only_visual", "row"),
    (r"image_feature_extractor\.obj_downsample\.1\.(weight|bias)", r"backbone.embeddings.region_embedding.dense.\1",
     None),
    (r"vlbert\.pooler\.dense\.(weight|bias)", r"backbone.pooler.dense.\1", None),
    (r"vlbert\.mlm_head\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.transform.dense.\1", None),
    (r"vlbert\.mlm_head\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.transform.norm.\1", None),
    (r"vlbert\.mlm_head\.predictions\.bias", "mlm_head.bias", None),
    (r"vlbert\.mvrc_head\.transform\.dense\.(weight|bias)", r"region_head.dense.\1", None),
    (r"vlbert\.mvrc_head\.region_cls_pred\.(weight|bias)", r"region_head.decoder.\1", None),
    (r"vlbert\.relationsip_head\.caption_image_relationship\.(weight|bias)", r"alignment_head.classifier.\1", "swap"),
]
TIED_DECODER = "vlbert.mlm_head.predictions.decoder.weight"  # the word embeddings again (checked)
UNUSED = [re.escape(TIED_DECODER)]
# a fine-tuned VQA model's final_mlp (CLASSIFIER_TYPE mlm: BERT's MLM transform, Dropout, Linear)
VQA_HEAD_RULES = {
    "final_mlp.0.dense.weight": "transform.dense.weight", "final_mlp.0.dense.bias": "transform.dense.bias",
    "final_mlp.0.LayerNorm.weight": "transform.norm.weight", "final_mlp.0.LayerNorm.bias": "transform.norm.bias",
    "final_mlp.2.weight": "out.weight", "final_mlp.2.bias": "out.bias",
}
END_TO_END = r"image_feature_extractor\.(backbone|roi_head_feature_extractor|head|regularizing_predictor)\..+"

# Our parts that a kind of official checkpoint lacks as a whole: left at initialisation, reported.
OPTIONAL_PARTS = {
    "pooler (with_pooler: false in the pretraining configs)": r"backbone\.pooler\..+",
    "MLM head (fine-tuned models have none)": r"mlm_head\..+",
    "masked-RoI head (fine-tuned models have none)": r"region_head\..+",
    "relationship head (WITH_REL_LOSS: false in the released pretraining)": r"alignment_head\..+",
    "region-masking embeddings (pretraining only)": r"backbone\.embeddings\.(mask_token|mask_feature)",
    "text-only visual embedding (multitask pretraining only)": r"backbone\.embeddings\.text_only_visual",
}


def map_official_vlbert_key(key: str) -> tuple[str, str | None] | None:
    """Official name (without `module.`) -> (our name, transform), or None if it has no mapping."""
    for pattern, repl, how in KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key), how
    m = re.fullmatch(r"vlbert\.encoder\.layer\.(\d+)\.(.+)", key)
    if m:
        sub = apply_rules(m.group(2), BERT_LAYER_RULES)
        return (f"backbone.layers.{m.group(1)}.{sub}", None) if sub else None
    return None


def read_official_vlbert_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of an official `.model` file (or a bare state dict), read with
    torch.load(weights_only=True); the `module.` prefix is stripped."""
    path = regular_file(path, "official VL-BERT checkpoint")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: refuse, don't execute
        raise ValueError(refusal(path, e)) from None
    state = doc.get("state_dict", doc) if isinstance(doc, dict) else doc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected {{'state_dict': tensors}} (an official VL-BERT .model) or a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def config_from_state(state: dict[str, torch.Tensor]) -> ViLBertConfig:
    """The sizes an official state dict fixes; attention heads = hidden / 64 (BERT's head width:
    12 for base, 16 for large); the official geometry embedding (v_geometry_dim 256)."""
    def shape(key):
        if key not in state:
            raise ValueError(f"not an official VL-BERT state dict: no {key}")
        return tuple(state[key].shape)

    vocab, hidden = shape("vlbert.word_embeddings.weight")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"vlbert\.encoder\.layer\.(\d+)\.", k)))
    sizes = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=shape("vlbert.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=shape("vlbert.position_embeddings.weight")[0],
        type_vocab_size=shape("vlbert.token_type_embeddings.weight")[0] - 1,  # the last type is visual
        v_feature_size=shape("image_feature_extractor.obj_downsample.1.weight")[1] - 8 * 256,  # geometry: 4 x 2 x 256
        v_hidden_size=hidden, v_num_attention_heads=hidden // 64, bi_hidden_size=hidden,
        bi_num_attention_heads=hidden // 64,
    )
    if "vlbert.mvrc_head.region_cls_pred.weight" in state:
        sizes["v_target_size"] = shape("vlbert.mvrc_head.region_cls_pred.weight")[0]
    return load_preset("vlbert-base", v_geometry_dim=256, **sizes)


def _converted(tensor: torch.Tensor, how: str | None, key: str, source: str) -> torch.Tensor:
    if how == "row":
        if tensor.dim() != 2 or tensor.shape[0] != 1:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected one row (1, D)")
        return tensor[0]
    if how == "swap":
        return tensor.flip(0)  # official class 1 (own caption) -> our class 0 (aligned)
    return tensor


def convert_official_vlbert_state_dict(state: dict, config: ViLBertConfig | None = None,
                                       source: str = "checkpoint") -> tuple[ViLBert, LoadReport]:
    """Build a VL-BERT `ViLBert` holding the official weights (keys without `module.`). `config`:
    None = the sizes the checkpoint fixes (`config_from_state`)."""
    if any(re.fullmatch(END_TO_END, k) for k in state):
        raise ValueError(f"{source}: an end-to-end VL-BERT checkpoint (it holds its own Fast R-CNN, "
                         "image_feature_extractor.backbone.*): its region features come from that network, "
                         "not from precomputed bottom-up features; only the precomputed-feature (prec) models convert")
    check_finite({k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in UNUSED)}, source)
    config = config_from_state(state) if config is None else config
    if config.arch != "vlbert":
        raise ValueError(f"{source}: a VL-BERT checkpoint needs a config with arch 'vlbert', got {config.arch!r}")
    model = ViLBert(config, _task_head_spec(state, source))
    ours = model.state_dict()
    report, unknown = LoadReport(), []
    with torch.no_grad():
        for key, tensor in state.items():
            if key in VQA_HEAD_RULES:
                name = f"task_heads.heads.vqa.{VQA_HEAD_RULES[key]}"
                if ours[name].shape != tensor.shape:
                    raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(ours[name].shape)} for {name}")
                ours[name].copy_(tensor)
                report.loaded.append(name)
                continue
            if any(re.fullmatch(p, key) for p in UNUSED):
                report.unused.append(key)
                continue
            mapped = map_official_vlbert_key(key)
            if mapped is None or mapped[0] not in ours:
                unknown.append(key)
                continue
            name, how = mapped
            tensor = _converted(tensor, how, key, source)
            if ours[name].shape != tensor.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(ours[name].shape)} for {name}")
            ours[name].copy_(tensor)
            report.loaded.append(name)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys have no mapping: {unknown[:20]}")
    _check_tied_decoder(state, source)
    report.missing = _missing(set(ours), set(report.loaded), source)
    return model, report


def _task_head_spec(state: dict, source: str) -> dict[str, tuple[str, int]]:
    """The task head of a fine-tuned checkpoint: {"vqa": ("masked_answer", answers)}, or none."""
    head = sorted(k for k in state if k.startswith("final_mlp."))
    if not head:
        return {}
    if head != sorted(VQA_HEAD_RULES):
        raise ValueError(f"{source}: its final_mlp ({', '.join(head)}) is not the VQA head of CLASSIFIER_TYPE mlm "
                         "(final_mlp.0 = the MLM transform, final_mlp.2 = the answer layer), the only one converted")
    return {"vqa": ("masked_answer", int(state["final_mlp.2.weight"].shape[0]))}


def is_official_vlbert_state(state: dict) -> bool:
    """Whether a state dict (without `module.`) is jackroos/VL-BERT's rather than vilbert-multi-task's."""
    return "vlbert.word_embeddings.weight" in state


def _check_tied_decoder(state: dict, source: str) -> None:
    if TIED_DECODER in state and not torch.equal(state[TIED_DECODER], state["vlbert.word_embeddings.weight"]):
        raise ValueError(f"{source}: {TIED_DECODER} differs from vlbert.word_embeddings.weight; "
                         "only the tied MLM decoder of the official code is supported")


def _missing(ours: set[str], loaded: set[str], source: str) -> list[str]:
    """Our tensors the checkpoint did not set: fine for a whole optional part, an error otherwise."""
    missing = ours - loaded
    allowed = set()
    for part, pattern in OPTIONAL_PARTS.items():
        keys = {k for k in ours if re.fullmatch(pattern, k)}
        if keys <= missing:
            allowed |= keys
        elif keys & missing:
            raise ValueError(f"{source}: the {part} is incomplete: it lacks {sorted(keys & missing)}")
    rest = sorted(missing - allowed)
    if rest:
        raise ValueError(f"{source}: the checkpoint lacks {len(rest)} tensors: {rest[:20]}")
    return sorted(allowed)


def load_official_vlbert_checkpoint(path: str | Path, config: ViLBertConfig | str | None = None
                                    ) -> tuple[ViLBert, LoadReport]:
    """Load an official VL-BERT `.model` file. `config`: a ViLBertConfig, a preset name, or None for
    the sizes the checkpoint fixes. `report.missing` = our parts it does not have (at their initial
    values), `report.unused` = official keys not used (the tied decoder, a task head)."""
    if isinstance(config, str):
        config = load_preset(config)
    return convert_official_vlbert_state_dict(read_official_vlbert_state_dict(path), config, source=str(path))
