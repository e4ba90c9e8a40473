"""Convert official ViLBERT checkpoints (vilbert-multi-task, vilbert_beta `pytorch_model.bin`).

The mapping is strict: every key of the checkpoint is either mapped to one of our tensors or on
a short list of known-unused official weights (reported); anything else raises.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from common.safe_load import refusal, regular_file

from .checkpoint import BERT_EMBEDDING_RULES, BERT_LAYER_RULES, MLM_HEAD_RULES, LoadReport, apply_rules, check_finite
from .config import ViLBertConfig, load_preset
from .official_vlbert import convert_official_vlbert_state_dict, is_official_vlbert_state
from .pretraining import ViLBert

# Official weights that the official forward pass never uses.
UNUSED_PATTERNS = [
    r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.(weight|bias)",
    r"cls\.predictions\.decoder\.weight",  # tied to the word embeddings
]

# Co-attention: official query1/key1/value1 read the visual stream, query2/key2/value2 the text
# stream. Our visual_attention = visual queries against text keys/values, and vice versa.
CO_LAYER_RULES = [
    (r"biattention\.query1\.(weight|bias)", r"visual_attention.query.\1"),
    (r"biattention\.key2\.(weight|bias)", r"visual_attention.key.\1"),
    (r"biattention\.value2\.(weight|bias)", r"visual_attention.value.\1"),
    (r"biattention\.query2\.(weight|bias)", r"text_attention.query.\1"),
    (r"biattention\.key1\.(weight|bias)", r"text_attention.key.\1"),
    (r"biattention\.value1\.(weight|bias)", r"text_attention.value.\1"),
    (r"biOutput\.dense1\.(weight|bias)", r"visual_attention_output.dense.\1"),
    (r"biOutput\.LayerNorm1\.(weight|bias)", r"visual_attention_output.norm.\1"),
    (r"biOutput\.dense2\.(weight|bias)", r"text_attention_output.dense.\1"),
    (r"biOutput\.LayerNorm2\.(weight|bias)", r"text_attention_output.norm.\1"),
    (r"v_intermediate\.dense\.(weight|bias)", r"visual_ffn.intermediate.\1"),
    (r"v_output\.dense\.(weight|bias)", r"visual_ffn.output.dense.\1"),
    (r"v_output\.LayerNorm\.(weight|bias)", r"visual_ffn.output.norm.\1"),
    (r"t_intermediate\.dense\.(weight|bias)", r"text_ffn.intermediate.\1"),
    (r"t_output\.dense\.(weight|bias)", r"text_ffn.output.dense.\1"),
    (r"t_output\.LayerNorm\.(weight|bias)", r"text_ffn.output.norm.\1"),
]

TOP_RULES = [
    (r"bert\.embeddings\.task_embeddings\.weight", r"backbone.embeddings.task_embeddings.weight"),
    (r"bert\.v_embeddings\.image_embeddings\.(weight|bias)", r"backbone.image_embeddings.feature_projection.\1"),
    (r"bert\.v_embeddings\.image_location_embeddings\.(weight|bias)",
     r"backbone.image_embeddings.location_projection.\1"),
    (r"bert\.v_embeddings\.LayerNorm\.(weight|bias)", r"backbone.image_embeddings.norm.\1"),
    (r"bert\.t_pooler\.dense\.(weight|bias)", r"backbone.text_pooler.dense.\1"),
    (r"bert\.v_pooler\.dense\.(weight|bias)", r"backbone.image_pooler.dense.\1"),
    (r"cls\.bi_seq_relationship\.(weight|bias)", r"alignment_head.classifier.\1"),
    (r"cls\.imagePredictions\.transform\.dense\.(weight|bias)", r"region_head.transform.dense.\1"),
    (r"cls\.imagePredictions\.transform\.LayerNorm\.(weight|bias)", r"region_head.transform.norm.\1"),
    (r"cls\.imagePredictions\.decoder\.(weight|bias)", r"region_head.decoder.\1"),
]

# vilbert-multi-task task heads: official module -> (our head name, kind).
TASK_HEADS = {
    "vil_prediction": ("vqa", "answer"),
    "vil_prediction_gqa": ("gqa", "answer"),
    "vil_binary_prediction": ("nlvr2", "pair"),
    "vil_logit": ("retrieval", "pooled_linear"),
    "vil_tri_prediction": ("entailment", "pooled_linear"),
    "vision_logit": ("refer", "region"),
    "linguisic_logit": ("token", "token"),
}
# SimpleClassifier layers: logit_fc.0 Linear, .1 GeLU, .2 LayerNorm, .3 Linear.
MLP_RULES = [
    (r"logit_fc\.0\.(weight|bias)", r"hidden.\1"),
    (r"logit_fc\.2\.(weight|bias)", r"norm.\1"),
    (r"logit_fc\.3\.(weight|bias)", r"out.\1"),
]


def map_official_key(key: str) -> str | None:
    """Official name -> our name, or None if the key is not part of the mapping."""
    sub = apply_rules(key, TOP_RULES)
    if sub:
        return sub
    if key.startswith("bert.embeddings."):
        sub = apply_rules(key[len("bert.embeddings."):], BERT_EMBEDDING_RULES)
        return f"backbone.embeddings.{sub}" if sub else None
    m = re.fullmatch(r"bert\.encoder\.(layer|v_layer|c_layer)\.(\d+)\.(.+)", key)
    if m:
        kind, idx, rest = m.groups()
        target = {"layer": "text_layers", "v_layer": "visual_layers", "c_layer": "co_layers"}[kind]
        sub = apply_rules(rest, CO_LAYER_RULES if kind == "c_layer" else BERT_LAYER_RULES)
        return f"backbone.encoder.{target}.{idx}.{sub}" if sub else None
    if key.startswith("cls."):
        return apply_rules(key[len("cls."):], MLM_HEAD_RULES)
    m = re.fullmatch(r"(\w+)\.(.+)", key)
    if m and m.group(1) in TASK_HEADS:
        name, kind = TASK_HEADS[m.group(1)]
        sub = m.group(2) if kind in ("pooled_linear", "region", "token") else apply_rules(m.group(2), MLP_RULES)
        return f"task_heads.heads.{name}.{sub}" if sub and re.fullmatch(r"[\w.]*(weight|bias)", sub) else None
    return None


def _fold_weight_norm(state: dict) -> dict:
    """vilbert_beta's weight-normed `vil_prediction.main.{0,3}` (dim=None: a scalar g) -> plain
    Linear weights, renamed to our ReluMLPClassifier (`hidden`, `out`)."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"vil_prediction\.main\.([03])\.(weight_g|weight_v|bias)", key)
        if not m:
            out[key] = value
            continue
        layer = {"0": "hidden", "3": "out"}[m.group(1)]
        prefix = f"task_heads.heads.vqa.{layer}"
        if m.group(2) == "bias":
            out[f"{prefix}.bias"] = value
        elif m.group(2) == "weight_v":
            g = state[key.replace("weight_v", "weight_g")]
            out[f"{prefix}.weight"] = value * (g / value.norm())
    return out


def _task_head_spec(state: dict) -> dict:
    spec = {}
    for module, (name, kind) in TASK_HEADS.items():
        if kind in ("answer", "pair") and f"{module}.logit_fc.3.weight" in state:
            spec[name] = (kind, state[f"{module}.logit_fc.3.weight"].shape[0])
        elif kind not in ("answer", "pair") and f"{module}.weight" in state:
            spec[name] = (kind, state[f"{module}.weight"].shape[0])
    if "task_heads.heads.vqa.out.weight" in state:  # folded vilbert_beta head
        spec["vqa"] = ("answer_relu", state["task_heads.heads.vqa.out.weight"].shape[0])
    return spec


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; strips a DataParallel `module.` prefix."""
    path = regular_file(path, "official checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: refuse, don't execute
        raise ValueError(refusal(path, e)) from None
    for wrapper in ("model_state_dict", "state_dict"):  # vilbert-multi-task's resumable file; VL-BERT's .model
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_official_state_dict(state: dict, config: ViLBertConfig,
                                source: str = "checkpoint") -> tuple[ViLBert, LoadReport]:
    """Build a `ViLBert` holding the official weights. Raises on any unknown key, shape mismatch
    or backbone tensor left unset, and on a NaN or infinite weight (naming the official key)."""
    check_finite({k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in UNUSED_PATTERNS)}, source)
    state = _fold_weight_norm(state)
    if "bert.embeddings.task_embeddings.weight" in state and not config.task_specific_tokens:
        config = ViLBertConfig.from_dict({**config.to_dict(), "task_specific_tokens": True,
                                          "num_task_tokens": state["bert.embeddings.task_embeddings.weight"].shape[0]})
    model = ViLBert(config, _task_head_spec(state))
    ours = model.state_dict()
    report, unknown = LoadReport(), []
    with torch.no_grad():
        for key, tensor in state.items():
            if key.startswith("task_heads."):  # already renamed by _fold_weight_norm
                name = key
            elif any(re.fullmatch(p, key) for p in UNUSED_PATTERNS):
                report.unused.append(key)
                continue
            else:
                name = map_official_key(key)
            if name is None or name not in ours:
                unknown.append(key)
                continue
            if ours[name].shape != tensor.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(ours[name].shape)} for {name}")
            ours[name].copy_(tensor)
            report.loaded.append(name)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys have no mapping: {unknown[:20]}")
    loaded = set(report.loaded)
    report.missing = sorted(k for k in ours if k not in loaded)
    if report.missing:
        raise ValueError(f"{source}: the checkpoint lacks {len(report.missing)} tensors: {report.missing[:20]}")
    return model, report


def load_official_checkpoint(path: str | Path,
                             config: ViLBertConfig | str | Path | None = None) -> tuple[ViLBert, LoadReport]:
    """Load `pytorch_model.bin` of vilbert-multi-task / vilbert_beta, or a jackroos/VL-BERT `.model`
    (recognised by its keys, converted by `vilbert.official_vlbert`).

    `config`: a ViLBertConfig, a path to the official config JSON, or None for `vilbert-base`
    (the released models use `bert_base_6layer_6conect.json`); a VL-BERT checkpoint fixes its own
    sizes (None, or a ViLBertConfig with arch vlbert)."""
    state = read_official_state_dict(path)
    if is_official_vlbert_state(state):
        if config is not None and not (isinstance(config, ViLBertConfig) and config.arch == "vlbert"):
            raise ValueError(f"{path}: a VL-BERT checkpoint fixes its own sizes; the config {config} is ViLBERT's "
                             "(leave out --official-config)")
        return convert_official_vlbert_state_dict(state, config, source=str(path))
    if config is None:
        config = load_preset("vilbert-base")
    elif not isinstance(config, ViLBertConfig):
        config = ViLBertConfig.from_official_json(regular_file(config, "official config JSON"))
    return convert_official_state_dict(state, config, source=str(path))
